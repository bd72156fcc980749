"""Retraining that follows the data: a real HTTP server whose archive changes behind the same URL
(it sends ETag/Last-Modified and counts requests), the real flow on the Prefect test server,
MLflow on a SQLite store or a real MLflow server, and promotion that compares like with like."""

from __future__ import annotations

import http.server
import json
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from petalflow.tasks.params import TrainParams
from petalflow.tasks.train import RUN_ENDED, attempt_name
from tests.helpers import (
    COLOURS, base_url, free_port, make_dataset, make_random_label_dataset, make_tgz,
    prefect_events, revalidating_server, serve_handler, write_image,
)

pytestmark = pytest.mark.e2e
MODEL = "petalflow-classifier"


def _params(url: str, backbone, **kw) -> TrainParams:
    base = dict(data_url=url, backbone=str(backbone), image_size=32, epochs=6, batch_size=8,
                learning_rate=0.05, min_accuracy=0.5, val_fraction=0.2, test_fraction=0.2)
    return TrainParams(**{**base, **kw})


def _archive(tmp: Path, name: str, per_class: int, seed: int) -> bytes:
    src = make_dataset(tmp / f"{name}-src", per_class=per_class, seed=seed)
    return make_tgz(src, tmp / f"{name}.tgz").read_bytes()


def _extractions(workspace: Path) -> list[str]:
    return sorted(p.name for p in (workspace / "home" / "datasets").iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def _client():
    import mlflow

    from petalflow.tasks.registry import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def test_changed_archive_behind_the_same_url_is_retrained(workspace, tiny_backbone,
                                                          prefect_harness):
    from petalflow.flows.train_flow import train_and_register

    first_bytes = _archive(workspace, "v1", per_class=12, seed=0)
    newer = _archive(workspace, "v2", per_class=15, seed=4)  # other photos, more per class
    with revalidating_server() as site:
        url = site.put("/export/photos.tgz", first_bytes)
        first = train_and_register(_params(url, tiny_backbone))
        assert (first["status"], first["model_version"]) == ("trained", "1")
        assert first["source"]["outcome"] == "downloaded" and first["source"]["etag"]
        downloaded = site.body_bytes

        same = train_and_register(_params(url, tiny_backbone))
        assert same["status"] == "nothing to do"
        assert same["source"]["outcome"] == "not modified"
        assert site.body_bytes == downloaded, "an unchanged source was downloaded again"
        assert site.requests[-1][1] == first["source"]["etag"]  # If-None-Match sent

        site.put("/export/photos.tgz", newer)
        changed = train_and_register(_params(url, tiny_backbone))
    assert changed["status"] == "trained" and changed["model_version"] == "2"
    assert changed["source"]["outcome"] == "downloaded"
    # One extraction on disk, the new archive's (the first was a whole copy of the old data),
    # and one manifest, of the new data (the first is in its MLflow run).
    assert _extractions(workspace) == [changed["source"]["sha256"]]
    assert changed["housekeeping"]["datasets"] == [first["source"]["sha256"]]
    assert changed["housekeeping"]["manifests"] == 1 and changed["housekeeping"]["bytes"] > 0
    # The first training's folder (its export, checkpoints, evaluation: all in its MLflow
    # run) went once its run had ended and another began; the last run's stays.
    runs = (workspace / "home" / "runs").resolve()
    first_attempt = Path(first["workdir"]).relative_to(runs)
    assert same["housekeeping"]["runs"] == [first_attempt.as_posix()]
    assert {k: same["housekeeping"][k] for k in ("datasets", "manifests", "features")} == {
        "datasets": [], "manifests": 0, "features": []} and same["housekeeping"]["bytes"] > 0
    assert changed["housekeeping"]["runs"] == []
    assert [p.parent for p in runs.glob("*/*/train.json")] == [Path(changed["workdir"])]
    manifests = sorted((workspace / "home" / "manifests").iterdir())
    assert [(m / "manifest.csv").resolve() for m in manifests] == [
        Path(changed["manifest"]).resolve()]
    # And one feature cache: the new data's (every image's features stay in the bank).
    caches = [p.resolve() for p in (workspace / "home" / "features").iterdir()
              if p.name not in ("feature-banks", "frozen-backbones")]
    assert caches == [Path(changed["training"]["features"]["dir"]).resolve()]
    assert [(workspace / "home" / "features" / name).resolve()
            for name in changed["housekeeping"]["features"]] == [
        Path(first["training"]["features"]["dir"]).resolve()]
    assert changed["dataset"]["fingerprint"] != first["dataset"]["fingerprint"]
    assert changed["dataset"]["used"] == 45 and first["dataset"]["used"] == 36
    assert site.body_bytes == downloaded + len(newer)
    # Validators and the archive's digest are on the MLflow run and the version.
    client = _client()
    run = client.get_run(changed["mlflow_run_id"])
    assert run.data.tags["petalflow.source_etag"] == changed["source"]["etag"]
    assert run.data.tags["petalflow.source_last_modified"] == changed["source"]["last_modified"]
    mv = client.get_model_version(MODEL, "2")
    assert mv.tags["archive_sha256"] == changed["source"]["sha256"]
    # Same classes: the champion was evaluated on the new split, and both figures are named.
    assert changed["comparison"]["champion_version"] == "1"
    assert changed["comparison"]["champion_accuracy"] is not None
    assert not (Path(changed["workdir"]) / "champion-model").exists()  # its download, removed
    assert "this run's test split" in changed["alias_reason"]
    # The model card is logged with the version's run and is the version's description.
    card = client.download_artifacts(changed["mlflow_run_id"], "model_card.md")
    text = Path(card).read_text()
    for needle in ("ETag", changed["dataset"]["fingerprint"], "Images per class",
                   "Confusion matrix", "Champion comparison", changed["alias_reason"]):
        assert needle in text, needle
    assert mv.description.startswith("# Model card")
    # Its confusion matrix: beside the file, evaluation/; in the MLflow UI, where that UI
    # fetches the run's artifacts (the browser test sees it load).
    assert "![confusion matrix](evaluation/confusion.png)" in text
    assert ("![confusion matrix](./get-artifact?path=evaluation%2Fconfusion.png&run_uuid="
            f"{changed['mlflow_run_id']})") in mv.description
    assert f"- [MLflow run](./#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})" \
        in mv.description  # a page of whichever UI shows the store; not in the file
    assert "[MLflow run]" not in text


def test_data_that_rolls_behind_the_url_keeps_the_feature_bank_to_what_it_needs(
        workspace, tiny_backbone, prefect_harness):
    """Scheduled retraining on data that rolls (other photos each time, the old ones gone):
    the feature bank kept every image's features ever computed, growing with the data's
    history. Once most of its rows are of photos no data holds now, the run's housekeeping
    rewrites it with the current data's rows only, and says how many it removed."""
    import numpy as np

    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks.dataset import load_manifest

    banks = workspace / "home" / "features" / "feature-banks"

    def bank_shas() -> list[str]:
        shas = []
        for segment in banks.glob("*/*.npz"):
            with np.load(segment) as data:
                shas += [str(s) for s in data["shas"]]
        return shas

    runs = []
    with revalidating_server() as site:
        for seed in (0, 1, 2):  # other photos each time, same classes
            url = site.put("/export/photos.tgz", _archive(workspace, f"r{seed}", 6, seed))
            runs.append(train_and_register(_params(url, tiny_backbone)))
    assert [r["status"] for r in runs] == ["trained"] * 3
    computed = [r["training"]["features"]["computed"] for r in runs]
    assert [r["training"]["features"]["from_earlier"] for r in runs] == [0, 0, 0]
    # The second run's bank: half its rows are the first data's, not most: kept.
    assert runs[1]["housekeeping"]["feature_bank_rows"] == 0
    # The third: two data versions' rows of three are gone, the current data's kept.
    assert runs[2]["housekeeping"]["feature_bank_rows"] == computed[0] + computed[1]
    current = load_manifest(Path(runs[2]["manifest"]))
    kept = bank_shas()
    assert len(kept) == computed[2] and set(kept) <= set(current["sha256"])
    assert len(list(banks.glob("*/*.npz"))) == 1


def test_a_sign_in_page_behind_the_url_fails_the_run_saying_so_and_keeps_the_champion(
        workspace, tiny_backbone, prefect_harness):
    """The archive's URL starts answering 200 with a web page (an expired share link's
    sign-in page): the run fails saying the URL gave a web page, not an archive; the champion
    and its version stay; once the URL serves the archive again, nothing needs retraining."""
    from petalflow.flows.train_flow import train_and_register
    from petalflow.flows.watch_flow import watch_data
    from petalflow.tasks.errors import ArchiveError, WebPageNotArchive

    data = _archive(workspace, "d", per_class=12, seed=0)
    page = (b"\n<!DOCTYPE html>\n<html lang=\"en\"><head><title>Sign in</title></head>"
            b"<body><form>Sign in to download photos.tgz</form></body></html>\n")
    with revalidating_server() as site:
        url = site.put("/share/photos.tgz", data)
        first = train_and_register(_params(url, tiny_backbone))
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        site.put("/share/photos.tgz", page)
        with pytest.raises(ArchiveError) as failed:
            train_and_register(_params(url, tiny_backbone))
        assert str(failed.value) == (
            "photos.tgz is a web page (HTML), not an archive: the URL answered with a page (a "
            "sign-in, a download confirmation or an error page?) instead of the file; use the "
            "URL that downloads the archive itself")
        # The watch sees new bytes behind the URL, but they are no data: it fails saying so,
        # and announces nothing (no training started to fail the same way).
        with pytest.raises(WebPageNotArchive):
            watch_data(_params(url, tiny_backbone))
        assert not list((workspace / "home" / "watch").glob("*.json"))  # nothing announced
        client = _client()
        versions = client.search_model_versions(f"name='{MODEL}'")
        assert [str(v.version) for v in versions] == ["1"]
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
        site.put("/share/photos.tgz", data)
        again = train_and_register(_params(url, tiny_backbone))
    assert again["status"] == "nothing to do" and again["source"]["outcome"] == "downloaded"


def test_a_damaged_archive_behind_the_url_fails_the_run_saying_so_and_keeps_the_champion(
        workspace, tiny_backbone, prefect_harness):
    """The URL's archive is replaced by a damaged one (one byte of gzip's CRC-32 changed: it
    decompresses to the same tar, read whole before this check): the run fails calling it
    damaged, extracts and trains nothing, keeps the champion and the extraction it was
    trained on, and removes the damaged download; once a whole archive is behind the URL, it
    is downloaded and trained. The watch announced the damaged archive as new data (a
    training started to fail on it); it now fails the same way and announces nothing."""
    from petalflow.flows.train_flow import train_and_register
    from petalflow.flows.watch_flow import watch_data
    from petalflow.tasks.errors import DamagedArchive

    first_bytes = _archive(workspace, "v1", per_class=12, seed=0)
    newer = _archive(workspace, "v2", per_class=15, seed=4)
    damaged = newer[:-8] + bytes([newer[-8] ^ 0xFF]) + newer[-7:]  # its CRC-32's first byte
    with revalidating_server() as site:
        url = site.put("/export/photos.tgz", first_bytes)
        first = train_and_register(_params(url, tiny_backbone))
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        site.put("/export/photos.tgz", damaged)
        with pytest.raises(DamagedArchive) as watched:
            watch_data(_params(url, tiny_backbone))
        assert str(watched.value).startswith("archive photos.tgz is damaged (CRC check failed")
        assert not list((workspace / "home" / "watch").glob("*.json"))  # nothing announced
        assert not list((workspace / "home" / "downloads").rglob("photos.tgz"))
        with pytest.raises(DamagedArchive) as failed:
            train_and_register(_params(url, tiny_backbone))
        assert str(failed.value).startswith("archive photos.tgz is damaged (CRC check failed")
        assert str(failed.value).endswith("the downloaded copy was removed, and the next run "
                                          "downloads it again")
        assert not list((workspace / "home" / "downloads").rglob("photos.tgz"))
        assert _extractions(workspace) == [first["source"]["sha256"]]
        client = _client()
        assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
        site.put("/export/photos.tgz", newer)
        fixed = train_and_register(_params(url, tiny_backbone))
    assert fixed["status"] == "trained" and fixed["model_version"] == "2"
    assert fixed["source"]["outcome"] == "downloaded"
    assert fixed["dataset"]["used"] == 45


def test_runs_that_follow_the_champion_retrain_and_watch_its_own_data_with_its_settings(
        workspace, tiny_backbone, prefect_harness):
    """retrain-weekly and watch-data as deployed (follow_champion): they ran on the form's
    defaults, the flowers' URL, whatever the champion had been trained on: a model trained
    from the UI on the user's archive got a flowers training by itself (watch-data within 15
    minutes, the schedule every Monday), and its own data was never watched nor retrained.
    They now follow the champion: its data URL and its training settings; before there is
    one, the challenger (a first model below the gate); nothing with neither; one whose
    recorded URL cannot download fails saying so."""
    from datetime import datetime, timezone

    from petalflow.flows.train_flow import train_and_register
    from petalflow.flows.watch_flow import watch_data
    from petalflow.tasks.errors import FollowChampionError

    as_deployed = TrainParams(follow_champion=True)
    since = datetime.now(timezone.utc).isoformat()
    home = workspace / "home"
    with revalidating_server() as site:
        url = site.put("/mine/photos.tgz", _archive(workspace, "v1", per_class=12, seed=0))
        idle = train_and_register(as_deployed)
        assert idle["status"] == "no champion"
        assert idle["reason"].startswith(
            f"{MODEL} has no champion to follow yet (nor a challenger, a version below the "
            "gate): train its first model with follow_champion off")
        assert watch_data(as_deployed)["reason"] == (
            "no champion yet: train a first model; the watch follows changes after it")
        assert not list((home / "downloads").glob("*")), "nothing is downloaded"
        assert not _client().search_registered_models()
        # The first model, from the train form: the user's archive and settings.
        first = train_and_register(_params(url, tiny_backbone, epochs=4, seed=7))
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        asked = len(site.requests)
        unchanged = train_and_register(as_deployed)
        assert (unchanged["status"], unchanged["model_version"]) == ("nothing to do", "1")
        assert watch_data(as_deployed)["reason"].startswith("source unchanged since the "
                                                            "champion v1")
        assert len(site.requests) == asked + 2  # each revalidated the user's URL
        site.put("/mine/photos.tgz", _archive(workspace, "v2", per_class=15, seed=4))
        announced = watch_data(as_deployed)
        assert announced["changed"] is True and announced["data_url"] == url
        [event] = [e for e in prefect_events("petalflow.dataset.changed", since)
                   if e["id"] == announced["event_id"]]
        told = event["payload"]["params"]  # what the train deployment's trigger runs
        assert (told["data_url"], told["epochs"], told["seed"], told["backbone"]) == (
            url, 4, 7, str(tiny_backbone))
        assert "follow_champion" not in told
        second = train_and_register(as_deployed)
        assert second["status"] == "trained" and second["model_version"] == "2"
        recorded = json.loads(_client().get_model_version(MODEL, "2").tags["params"])
        assert (recorded["data_url"], recorded["epochs"], recorded["seed"],
                recorded["image_size"]) == (url, 4, 7, 32)
        # A first model below its gate (a challenger, no champion yet) is followed, so that
        # the data behind its URL may grow until a version passes (with the gate it set).
        noise = make_random_label_dataset(workspace / "noise", per_class=20)
        growing = site.put("/growing.tgz",
                           make_tgz(noise, workspace / "noise.tgz").read_bytes())
        below = train_and_register(_params(growing, tiny_backbone, model_name="growing",
                                           min_accuracy=0.9, seed=7))
        assert (below["model_version"], below["alias"]) == ("1", "challenger")
        following_it = TrainParams(follow_champion=True, model_name="growing")
        assert watch_data(following_it)["reason"].startswith(
            "source unchanged since the challenger v1")
        same = train_and_register(following_it)
        assert (same["status"], same["alias"]) == ("nothing to do", "challenger")
        site.put("/growing.tgz", _archive(workspace, "learnable", per_class=12, seed=5))
        passed = train_and_register(following_it)
        assert (passed["model_version"], passed["alias"]) == ("2", "champion")
        assert passed["alias_reason"].endswith(">= 0.9)"), passed["alias_reason"]
        # A champion whose URL was recorded without its credentials cannot be followed.
        secret = url.replace("http://", "http://user:pw@")
        train_and_register(_params(secret, tiny_backbone, model_name="private"))
        downloads = sorted(p.name for p in (home / "downloads").iterdir())
        with pytest.raises(FollowChampionError) as failed:
            train_and_register(TrainParams(follow_champion=True, model_name="private"))
    assert str(failed.value).startswith(
        "follow_champion: the champion v1 of private was trained with data_url "
        f"'{secret.replace('user:pw', '***')}', which cannot be used here: this URL holds '***'")
    assert sorted(p.name for p in (home / "downloads").iterdir()) == downloads
    assert len(_client().search_model_versions("name='private'")) == 1


def test_a_folder_zipped_anew_on_every_download_is_announced_only_when_its_files_change(
        workspace, tiny_backbone, prefect_harness):
    """A server that zips a folder on every request (a cloud drive's or Nextcloud's folder
    download) gives new bytes each time (the members' times), with the same files: the watch
    announced new data on every check, and every triggered run ended "nothing to do". It now
    compares the files (names, sizes, CRC-32s from the zip's directory) with the champion's;
    one photo changed is announced. A training on it keeps the one extraction and its scan."""
    import io
    import zipfile

    from petalflow.flows.train_flow import train_and_register
    from petalflow.flows.watch_flow import watch_data

    src = make_dataset(workspace / "folder", per_class=12, seed=0)

    def zipped(when: tuple) -> bytes:  # the folder as the server zips it at time ``when``
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for path in sorted(src.rglob("*.jpg")):
                info = zipfile.ZipInfo(f"photos/{path.relative_to(src).as_posix()}", when)
                zf.writestr(info, path.read_bytes())
        return buf.getvalue()

    with revalidating_server(validators=False) as site:
        url = site.put("/folder.zip", zipped((2026, 11, 1, 10, 0, 0)))
        first = train_and_register(_params(url, tiny_backbone))
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        site.put("/folder.zip", zipped((2026, 11, 30, 9, 15, 0)))
        same = watch_data(_params(url, tiny_backbone))
        assert same["changed"] is False and same["event_id"] is None
        assert same["reason"] == (
            "the archive's bytes changed, its files did not (the same names, sizes and CRC-32s "
            "as the champion v1's): zipped again, nothing to retrain")
        assert not list((workspace / "home" / "watch").glob("*.json"))  # nothing announced
        # The weekly run on it: downloaded (new bytes), not extracted nor scanned again.
        again = train_and_register(_params(url, tiny_backbone))
        assert again["status"] == "nothing to do"
        assert len(_extractions(workspace)) == 1
        write_image(src / "red" / "000.jpg", COLOURS["red"], seed=4242)  # one photo replaced
        site.put("/folder.zip", zipped((2026, 11, 30, 9, 30, 0)))
        changed = watch_data(_params(url, tiny_backbone))
    assert changed["changed"] is True and changed["event_id"]


def test_a_folder_still_being_copied_into_is_announced_once_it_is_quiet(
        workspace, tiny_backbone, prefect_harness, monkeypatch):
    """Photos copied into a folder source arrive one by one: the watch announced the first
    change it saw, and the training it started took the photos copied so far (a half-written
    one, a class folder just begun) as the new data. A changed folder is announced once
    nothing in it has changed for ``watch.QUIET_S``, at a later check."""
    import re
    import time

    from petalflow.flows.train_flow import train_and_register
    from petalflow.flows.watch_flow import watch_data
    from petalflow.tasks import watch

    src = make_dataset(workspace / "folder", per_class=12, seed=0)
    first = train_and_register(_params(str(src), tiny_backbone))
    assert (first["model_version"], first["alias"]) == ("1", "champion")
    write_image(src / "red" / "100.jpg", COLOURS["red"], seed=100)  # the copy has begun
    state = watch_data(_params(str(src), tiny_backbone), return_state=True)
    copying = state.result()
    assert copying["changed"] is True and copying["event_id"] is None
    assert state.message == f"changed ({copying['reason']}); not announced yet: " + copying[
        "settling"]
    assert re.fullmatch(r"something in the folder changed [0-9]+ s ago \(a copy still in "
                        r"progress\?\): it is announced once nothing in it has changed for "
                        r"120 s, at a later check", copying["settling"]), copying["settling"]
    assert not list((workspace / "home" / "watch").glob("*.json"))  # nothing announced
    monkeypatch.setattr(watch, "QUIET_S", 1.0)
    time.sleep(1.1)  # the copy is done: quiet
    quiet = watch_data(_params(str(src), tiny_backbone))
    assert quiet["changed"] is True and quiet["settling"] is None and quiet["event_id"]
    assert len(list((workspace / "home" / "watch").glob("*.json"))) == 1


def test_secrets_in_the_data_url_stay_out_of_the_registry_and_the_model_card(
        workspace, tiny_backbone, prefect_harness):
    """A private archive's URL with a user and password and a presigned query (what other
    teams read of a version: its tags, parameters, run and model card must not hold them);
    the download uses them. Its next signature names the same source for the watch."""
    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks.errors import DownloadError
    from petalflow.tasks.registry import champion_info
    from petalflow.tasks.report import run_result
    from petalflow.tasks.watch import differs_from_champion, resource_id

    data = _archive(workspace, "d", per_class=12, seed=0)
    with revalidating_server() as site:
        signed_at = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 60))
        query = (f"X-Amz-Credential=AKIDSECRET1&X-Amz-Date={signed_at}&X-Amz-Expires=3600&"
                 "X-Amz-Signature=f00dSECRET2")
        site.put(f"/private/photos.tgz?{query}", data)  # the test server matches the query too
        host = site.url.split("://", 1)[1]
        url = f"http://alice:hunter2SECRET3@{host}/private/photos.tgz?{query}"
        first = train_and_register(_params(url, tiny_backbone))
        # Signed again (presigned URLs expire): a new date and signature, the same source,
        # revalidated, not downloaded.
        resigned_at = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time()))
        resigned_query = query.replace("f00dSECRET2", "beefSECRET4").replace(signed_at,
                                                                             resigned_at)
        site.put(f"/private/photos.tgz?{resigned_query}", data)
        again = train_and_register(_params(url.replace(query, resigned_query), tiny_backbone))
        assert (again["status"], again["source"]["outcome"]) == ("nothing to do", "not modified")
        # A signature the server refuses: the error (the flow's state, the Prefect UI) names
        # no secret.
        with pytest.raises(DownloadError) as expired:
            train_and_register(_params(url.replace("f00dSECRET2", "deadSECRET5"), tiny_backbone))
        # A public link that redirects to the presigned URL (a release page's asset): the
        # summary (printed by the command, the run's result) and the run's tags name where it
        # led without the signature.
        # The watch's result (the Prefect UI's) names the source without them too.
        from petalflow.flows.watch_flow import watch_data

        watched = watch_data(_params(url.replace(query, resigned_query), tiny_backbone))
        assert watched["changed"] is False
        site.redirects["/latest.tgz"] = f"{site.url}/private/photos.tgz?{resigned_query}"
        redirected = train_and_register(_params(f"{site.url}/latest.tgz", tiny_backbone,
                                                force=True))
    assert redirected["source"]["redirected_to"].endswith("&X-Amz-Signature=***")
    assert _client().get_run(redirected["mlflow_run_id"]).data.tags[
        "petalflow.source_redirected_to"] == redirected["source"]["redirected_to"]
    assert (first["model_version"], first["alias"]) == ("1", "champion")
    client = _client()
    mv = client.get_model_version(MODEL, "1")
    run = client.get_run(first["mlflow_run_id"])
    recorded = json.dumps([mv.tags, mv.description, run.data.tags, run.data.params,
                           Path(client.download_artifacts(first["mlflow_run_id"],
                                                          "model_card.md")).read_text()])
    sources = {d.dataset.source for d in run.inputs.dataset_inputs}  # "Datasets used"
    recorded += json.dumps(sorted(sources))
    recorded += run_result(first) + str(expired.value)  # the Prefect UI's result, the error
    # What the command prints and --summary-json writes (the source's URL was as given).
    recorded += json.dumps([first, again, redirected, watched])
    recorded += json.dumps(_client().get_run(redirected["mlflow_run_id"]).data.tags)
    assert str(expired.value).startswith("HTTP 404 from http://***@")
    for secret in ("AKIDSECRET1", "f00dSECRET2", "hunter2SECRET3", "alice", "deadSECRET5",
                   "beefSECRET4"):
        assert secret not in recorded, secret
    shown = (f"http://***@{host}/private/photos.tgz?X-Amz-Credential=***&X-Amz-Date={signed_at}"
             "&X-Amz-Expires=3600&X-Amz-Signature=***")
    assert mv.tags["data_url"] == run.data.params["data_url"] == shown
    assert sources == {json.dumps({"url": shown})}
    assert json.loads(mv.tags["params"])["data_url"] == shown
    assert f"- Source: `{shown}` (http)" in mv.description
    resigned = {**first["source"], "url": url.replace(query, resigned_query)}
    assert resource_id(url) == resource_id(resigned["url"])  # the watch's events: one source
    assert differs_from_champion(resigned, champion_info(MODEL)) == (
        False, f"source unchanged since the champion v1 ({first['source']['sha256'][:12]})")
    # A retraining on drift gets the version's recorded parameters: refused before any
    # request, saying why (it was an HTTP 401 from the server, or S3's 403).
    from petalflow.tasks.drift import training_params_of

    handed_on = training_params_of(f"models:/{MODEL}/1")
    assert handed_on["data_url"] == shown
    with pytest.raises(ValueError, match="holds '\\*\\*\\*' where petalflow hid its "
                                         "credentials when it recorded it"):
        TrainParams(**handed_on)
    for record in (f"https://***@{host}/p.tgz", f"https://{host}/p.tgz?sig=***&a=1"):
        with pytest.raises(ValueError, match="a record cannot download"):
            TrainParams(data_url=record)
    assert TrainParams(data_url=f"https://{host}/a***b.tgz?q=x***").data_url  # not a record


def test_a_private_backbones_credentials_are_used_and_recorded_nowhere(
        workspace, tiny_backbone, prefect_harness):
    """A backbone on a private server, its URL holding a user, a password and a presigned
    query: the training fetches it with them (it failed with "Name or service not known"
    after four retries, the password in every message), and nothing other teams read of the
    version holds them: its tags and parameters, its run's, the model card, the model's own
    files and what the command prints. Signed again, it is the same training. A retraining
    handed the version's recorded parameters is refused saying why."""
    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks.drift import training_params_of
    from petalflow.tasks.report import run_result
    from tests.helpers import make_hub_tarball, private_server

    tarball = make_hub_tarball(tiny_backbone, workspace / "tiny.tar.gz").read_bytes()
    src = make_dataset(workspace / "photos", per_class=12)
    secrets = ("hunter2SECRET6", "AKIDSECRET7", "f00dSECRET8", "beefSECRET9")
    with private_server({"/private/tiny.tar.gz": tarball}, "bob", secrets[0]) as server:
        host = base_url(server).split("://")[1]
        query = f"X-Amz-Credential={secrets[1]}&X-Amz-Signature={secrets[2]}"
        backbone = f"http://bob:{secrets[0]}@{host}/private/tiny.tar.gz?{query}"
        first = train_and_register(_params(str(src), backbone))
        again = train_and_register(_params(str(src), backbone.replace(secrets[2], secrets[3])))
    assert (first["model_version"], first["alias"]) == ("1", "champion")
    assert again["status"] == "nothing to do", again["status"]
    fetched = [path for path, _ in server.seen]
    assert len(fetched) == 2 and all(auth == server.authorization for _, auth in server.seen)
    shown = (f"http://***@{host}/private/tiny.tar.gz?X-Amz-Credential=***"
             "&X-Amz-Signature=***")
    import mlflow

    client = _client()
    mv = client.get_model_version(MODEL, "1")
    run = client.get_run(first["mlflow_run_id"])
    assert mv.tags["backbone"] == run.data.params["backbone"] == shown
    assert run.data.tags["petalflow.backbone"] == json.loads(mv.tags["params"])["backbone"]
    model = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1",
                                                     dst_path=str(workspace / "pulled")))
    assert mlflow.models.get_model_info(f"models:/{MODEL}/1").metadata["backbone"] == shown
    recorded = json.dumps([mv.tags, mv.description, run.data.tags, run.data.params, first,
                           again, run_result(first)])
    recorded += Path(client.download_artifacts(first["mlflow_run_id"],
                                               "model_card.md")).read_text()
    files = b"".join(path.read_bytes() for path in model.rglob("*") if path.is_file())
    for secret in secrets:
        assert secret not in recorded and secret.encode() not in files, secret
    with pytest.raises(ValueError, match="holds '\\*\\*\\*' where petalflow hid its "
                                         "credentials when it recorded it"):
        TrainParams(**training_params_of(f"models:/{MODEL}/1"))


def test_better_than_the_stored_figure_but_worse_on_the_same_split_is_not_promoted(
        workspace, tiny_backbone, prefect_harness):
    """The champion's stored accuracy was measured on another split (here: a figure far below
    what it scores now); the challenger beats that figure but loses on this run's split."""
    from petalflow.flows.train_flow import train_and_register

    data = _archive(workspace, "d", per_class=12, seed=0)
    with revalidating_server() as site:
        url = site.put("/d.tgz", data)
        champion = train_and_register(_params(url, tiny_backbone))
        assert champion["alias"] == "champion"
        client = _client()
        client.set_model_version_tag(MODEL, "1", "test_accuracy", "0.100000")
        weak = train_and_register(_params(url, tiny_backbone, learning_rate=1e-4, epochs=1,
                                          min_accuracy=0.0))
    challenger_acc = weak["test_metrics"]["test_accuracy"]
    champion_now = weak["comparison"]["champion_accuracy"]
    assert 0.1 < challenger_acc < champion_now, (challenger_acc, champion_now)
    assert (weak["model_version"], weak["alias"]) == ("2", "challenger")
    assert f"{challenger_acc:.4f}" in weak["alias_reason"]
    assert f"{champion_now:.4f}" in weak["alias_reason"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_a_challenger_on_data_that_did_not_change_again_is_not_retrained_every_week(
        workspace, tiny_backbone, prefect_harness):
    """The data changed behind the URL and its model did not beat the champion: registered as
    challenger. Every later scheduled run on the same data with the same parameters trained the
    same model again and registered one more identical challenger (v3, v4, ... one a week).
    Such a run now ends "nothing to do", naming the challenger and why it was not promoted;
    `force` or another gate trains again."""
    from petalflow.flows.train_flow import train_and_register

    with revalidating_server() as site:
        url = site.put("/p.tgz", _archive(workspace, "a", per_class=12, seed=0))
        first = train_and_register(_params(url, tiny_backbone))
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        site.put("/p.tgz", _archive(workspace, "b", per_class=13, seed=0))  # a photo more
        grown = train_and_register(_params(url, tiny_backbone))
        assert (grown["model_version"], grown["alias"]) == ("2", "challenger")
        assert "does not beat" in grown["alias_reason"]
        weekly = train_and_register(_params(url, tiny_backbone), return_state=True)
        summary = weekly.result()
        assert (summary["status"], summary["alias"], summary["model_version"]) == (
            "nothing to do", "challenger", "2")
        assert grown["alias_reason"] in summary["alias_reason"]
        assert "the champion v1 stays" in summary["alias_reason"]
        assert weekly.message.startswith("nothing to do: unchanged data and parameters since "
                                         "the challenger v2")
        other_gate = train_and_register(_params(url, tiny_backbone, min_improvement=0.01))
        assert (other_gate["status"], other_gate["model_version"]) == ("trained", "3")
    assert len(_client().search_model_versions(f"name='{MODEL}'")) == 3


def test_a_class_gone_from_the_data_behind_the_url_does_not_take_it_from_the_champion(
        workspace, tiny_backbone, prefect_harness, caplog, capsys):
    """An upload that missed a class folder, behind the URL the scheduled retraining reads:
    its model (the class list changed, so no comparison) was promoted on the gate alone, and
    @champion's consumers lost the class and its prob_ column. Such a version is now
    registered as challenger, the reason naming the class and what to do; the next run on the
    same data does not register it again; allow_dropped_classes promotes it. A dataset with
    none of the champion's classes (another problem under the same name) is still promoted on
    the gate alone (test_flow_e2e::test_aliases_follow_the_quality_gate)."""
    from petalflow.flows.cli import main
    from petalflow.flows.train_flow import train_and_register

    two = {k: v for k, v in COLOURS.items() if k != "blue"}
    src = make_dataset(workspace / "two-src", per_class=12, colours=two, seed=0)
    missing_blue = make_tgz(src, workspace / "two.tgz").read_bytes()
    with revalidating_server() as site:
        url = site.put("/p.tgz", _archive(workspace, "a", per_class=12, seed=0))
        first = train_and_register(_params(url, tiny_backbone))
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        site.put("/p.tgz", missing_blue)
        two_class = {"epochs": 30}  # 16 training photos: 6 epochs are 12 steps, too few
        with caplog.at_level("WARNING", logger="petalflow"):
            held = train_and_register(_params(url, tiny_backbone, **two_class))
        assert (held["status"], held["model_version"], held["alias"]) == (
            "trained", "2", "challenger")
        assert held["alias_reason"].startswith(
            "champion v1 predicts classes this data lacks (gone: blue): not promoted, so "
            "@champion keeps predicting them; put their folders back, or train with "
            "allow_dropped_classes (--allow-dropped-classes) to promote a version without them "
            "(test accuracy "), held["alias_reason"]
        assert ("classes the champion (v1) predicts are not in the data any more: blue"
                in caplog.text)
        client = _client()
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
        # A weekly run on the same data: the same decision, not one more challenger.
        weekly = train_and_register(_params(url, tiny_backbone, **two_class))
        assert (weekly["status"], weekly["model_version"]) == ("nothing to do", "2")
        # `petalflow models` showed a challenger more accurate than the champion and no why.
        capsys.readouterr()
        assert main(["models"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].split() == [
            "version", "aliases", "test_accuracy", "classes", "created", "dataset_fingerprint",
            "run_id"]
        assert [line.split()[:2] + line.split()[3:4] for line in out.splitlines()[1:3]] == [
            ["2", "challenger", "2"], ["1", "champion", "3"]]
        assert out.endswith(f"\nv2, challenger; at registration: {held['alias_reason']}\n"
                            f"v1, champion; at registration: {first['alias_reason']}\n"), out
        allowed = train_and_register(_params(url, tiny_backbone, allow_dropped_classes=True,
                                             **two_class))
    assert (allowed["status"], allowed["model_version"], allowed["alias"]) == (
        "trained", "3", "champion")
    assert allowed["alias_reason"].startswith(
        "the class list changed from champion v1's (gone: blue); promoted on the gate alone "
        "(allow_dropped_classes) ("), allowed["alias_reason"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "3"
    assert json.loads(client.get_model_version(MODEL, "3").tags["class_names"]) == [
        "green", "red"]


def test_a_class_folder_renamed_behind_the_url_is_said_to_be_renamed_not_lost(
        workspace, tiny_backbone, prefect_harness):
    """The same photos behind the URL, the folder "blue" renamed "navy": the version was held
    with the advice for a lost folder ("put their folders back"). The reason now says where
    the class's photos are (looked up in the champion run's manifest) and that a renamed folder
    is promoted with allow_dropped_classes, whose run's reason names the move too."""
    from petalflow.flows.train_flow import train_and_register

    src = make_dataset(workspace / "src", per_class=12, seed=0)
    first_archive = make_tgz(src, workspace / "first.tgz").read_bytes()
    (src / "blue").rename(src / "navy")
    renamed = make_tgz(src, workspace / "renamed.tgz").read_bytes()
    with revalidating_server() as site:
        url = site.put("/p.tgz", first_archive)
        first = train_and_register(_params(url, tiny_backbone))
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        site.put("/p.tgz", renamed)
        held = train_and_register(_params(url, tiny_backbone))
        assert (held["model_version"], held["alias"]) == ("2", "challenger")
        assert held["alias_reason"].startswith(
            "champion v1 predicts classes this data lacks (gone: blue): not promoted, so "
            "@champion keeps predicting them; their photos are in other class folders now, "
            "blue -> navy (all 12 photos): if you renamed or merged those folders, train with "
            "allow_dropped_classes (--allow-dropped-classes) to promote a version with the "
            "classes as they are now, or put the folders back as they were (test accuracy "), \
            held["alias_reason"]
        allowed = train_and_register(_params(url, tiny_backbone, allow_dropped_classes=True))
    assert (allowed["model_version"], allowed["alias"]) == ("3", "champion")
    assert allowed["alias_reason"].startswith(
        "the class list changed from champion v1's (gone: blue; new: navy; photos moved: blue "
        "-> navy (all 12 photos)); promoted on the gate alone (allow_dropped_classes) ("), \
        allowed["alias_reason"]
    assert str(_client().get_model_version_by_alias(MODEL, "champion").version) == "3"


def test_the_champion_runs_only_on_test_images_it_has_not_classified_before(
        workspace, tiny_backbone, prefect_harness, monkeypatch):
    """Every retraining ran the champion over the whole test split to compare like with like,
    though data that grew keeps most of its test images (ranked by their digests). Each
    version's test predictions are recorded by image digest; the champion now runs only on the
    images it has not classified, and is not even downloaded when there are none: the same
    figure as running it over the whole split."""
    import pandas as pd

    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks import registry
    from petalflow.tasks.evaluate import evaluate_model

    def test_shas(summary) -> set:
        rows = pd.read_csv(summary["manifest"], keep_default_na=False, dtype=str)
        return set(rows.loc[rows["split"] == "test", "sha256"])

    with revalidating_server() as site:
        url = site.put("/g.tgz", _archive(workspace, "a", per_class=12, seed=0))
        first = train_and_register(_params(url, tiny_backbone))
        before = test_shas(first)
        site.put("/g.tgz", _archive(workspace, "b", per_class=16, seed=0))  # 4 photos more
        grown = train_and_register(_params(url, tiny_backbone, min_improvement=1.0))
        after = test_shas(grown)
        comparison = grown["comparison"]
        assert 0 < len(before & after) < len(after)
        assert comparison["champion_predictions_recorded"] == len(before & after)
        records = workspace / "home" / "predictions"  # where the README says
        assert len(list(records.glob(f"{first['mlflow_run_id']}-tensorflow-*.csv"))) == 1
        # The champion run over the whole split gives the same figure.
        champion = registry.download_model(first["model_uri"], workspace / "champion")
        data_info = json.loads((Path(grown["manifest"]).parent / "dataset.json").read_text())
        whole = evaluate_model(Path(champion), data_info, workspace / "whole", latency_images=0)
        assert whole["recorded"] == 0
        assert comparison["champion_accuracy"] == whole["metrics"]["test_accuracy"]
        assert comparison["champion_metrics"] == whole["metrics"]
        # Now every test image has the champion's prediction: it is not downloaded at all.
        monkeypatch.setattr(registry, "download_model", lambda *a: pytest.fail("downloaded"))
        again = train_and_register(_params(url, tiny_backbone, min_improvement=1.0,
                                           force=True))
    assert again["comparison"]["champion_version"] == first["model_version"]
    assert again["comparison"]["champion_predictions_recorded"] == len(after)
    assert again["comparison"]["champion_metrics"] == whole["metrics"]


def test_a_tie_keeps_the_champion_and_min_improvement_is_honoured(workspace, tiny_backbone,
                                                                  prefect_harness):
    from petalflow.flows.train_flow import train_and_register

    data = _archive(workspace, "t", per_class=12, seed=0)
    with revalidating_server() as site:
        url = site.put("/t.tgz", data)
        first = train_and_register(_params(url, tiny_backbone))
        again = train_and_register(_params(url, tiny_backbone, force=True))
    # Same data, same parameters: the same figure on the same split is a tie, not a win.
    assert again["test_metrics"]["test_accuracy"] == pytest.approx(
        again["comparison"]["champion_accuracy"])
    assert again["alias"] == "challenger" and "does not beat" in again["alias_reason"]
    assert str(_client().get_model_version_by_alias(MODEL, "champion").version) == first[
        "model_version"]


def test_the_champion_is_compared_only_on_test_images_it_did_not_learn_from(
        workspace, tiny_backbone, prefect_harness):
    """Another seed (or test_fraction) splits the same photos anew, and most of the new test
    split had been the champion's training and validation images. It was evaluated on all of
    them: by hand with the flowers, champion v1 (0.862 on its own held-out photos) scored
    0.9378 on the split of a run with another seed, whose model (0.8133) "did not beat" it, as
    no model trained with another seed could. Both are now compared on the test images the
    champion was not trained on (its run's manifest says which), and the reason says so."""
    import pandas as pd

    from petalflow.flows.train_flow import train_and_register

    def rows(manifest) -> pd.DataFrame:
        return pd.read_csv(manifest, keep_default_na=False, dtype=str)

    def accuracy(predictions: Path, shas: set) -> float:
        table = rows(predictions)
        table = table[table["sha256"].isin(shas)]
        return float((table["label"] == table["true_label"]).mean())

    with revalidating_server() as site:
        url = site.put("/s.tgz", _archive(workspace, "s", per_class=30, seed=0))
        first = train_and_register(_params(url, tiny_backbone))
        other = train_and_register(_params(url, tiny_backbone, seed=7))
    client = _client()
    learned_from = rows(client.download_artifacts(first["mlflow_run_id"], "dataset/manifest.csv",
                                                  str(workspace)))
    learned = set(learned_from.loc[learned_from["split"] == "train", "sha256"])
    test = set(rows(other["manifest"]).query("split == 'test'")["sha256"])
    unseen = test - learned
    assert 0 < len(unseen) < len(test), (len(unseen), len(test))
    comparison = other["comparison"]
    assert comparison["compared_images"] == len(unseen)
    workdir = Path(other["workdir"])
    assert comparison["champion_accuracy"] == accuracy(
        workdir / "champion-evaluation" / "predictions.csv", unseen)
    assert comparison["accuracy"] == accuracy(workdir / "evaluation" / "predictions.csv", unseen)
    basis = (f"the {len(unseen)} of this run's {len(test)} test images that champion v1 was "
             "not trained on")
    assert comparison["basis"] == basis
    assert basis in other["alias_reason"]
    assert f"{comparison['champion_accuracy']:.4f}" in other["alias_reason"]


class _FailAliasReads(http.server.BaseHTTPRequestHandler):
    """A proxy in front of a real MLflow server that answers 503 to reads of a model alias
    (what an overloaded or restarting registry does) and passes everything else through."""

    upstream = ""
    failed: list = []

    def log_message(self, *args):
        pass

    def _proxy(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if "registered-models/alias" in self.path and self.command == "GET":
            type(self).failed.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
        resp = httpx.request(self.command, self.upstream + self.path, content=body,
                             headers=headers, timeout=60)
        self.send_response(resp.status_code)
        for key, value in resp.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection",
                                   "content-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy


@contextmanager
def _alias_failing_proxy(upstream: str):
    handler = type("H", (_FailAliasReads,), {"upstream": upstream, "failed": []})
    with serve_handler(handler) as server:
        yield base_url(server), handler


def test_registry_error_reading_the_alias_fails_the_run_and_moves_no_alias(
        tmp_path, monkeypatch, tiny_backbone, prefect_harness):
    from petalflow.stack import Stack, down, start_mlflow_server
    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks import registry

    st = Stack(stack_dir=tmp_path / "stack", mlflow_port=free_port(),
               mlflow_dir=tmp_path / "mlflow", petalflow_home=tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PETALFLOW_HOME", str(tmp_path / "home"))
    # MLflow's own HTTP retries would hide the 503 for minutes; the task's retries remain.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for t in (registry.champion_info_task, registry.unchanged_since_champion_task):
        monkeypatch.setattr(t, "retry_delay_seconds", [0, 0, 0])
    data = _archive(tmp_path, "r", per_class=12, seed=0)
    try:
        start_mlflow_server(st)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", st.mlflow_uri)
        with revalidating_server() as site:
            url = site.put("/r.tgz", data)
            first = train_and_register(_params(url, tiny_backbone))
            assert first["alias"] == "champion"
            with _alias_failing_proxy(st.mlflow_uri) as (proxy, handler):
                monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy)
                state = train_and_register(_params(url, tiny_backbone, force=True,
                                                   min_accuracy=0.0), return_state=True)
        assert state.is_failed(), state
        assert "503" in str(state.result(raise_on_failure=False))
        assert len(handler.failed) == 4  # the first try and the task's three retries
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=st.mlflow_uri, registry_uri=st.mlflow_uri)
        versions = client.search_model_versions(f"name='{MODEL}'")
        assert [str(v.version) for v in versions] == ["1"]
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
        runs = client.search_runs([client.get_experiment_by_name("petalflow").experiment_id],
                                  order_by=["attributes.start_time DESC"])
        assert runs[0].info.status == "FAILED"  # the attempt is recorded, not lost
        # Its training is done with (a flow hook marked it, as the first run's end did its):
        # the next run's housekeeping removes both, and leaves the champion as it was.
        ended = sorted([attempt_name(state.state_details.flow_run_id),
                        Path(first["workdir"]).name])
        assert sorted(p.parent.name for p in (tmp_path / "home" / "runs").glob(
            f"*/*/{RUN_ENDED}")) == ended
        monkeypatch.setenv("MLFLOW_TRACKING_URI", st.mlflow_uri)
        with revalidating_server() as site:
            url = site.put("/r.tgz", data)
            later = train_and_register(_params(url, tiny_backbone))
        assert later["status"] == "nothing to do" and later["model_version"] == "1"
        assert sorted(name.split("/")[1] for name in later["housekeeping"]["runs"]) == ended
        assert not list((tmp_path / "home" / "runs").glob("*/run-*"))
    finally:
        down(st)




def test_models_trained_through_the_stacks_server_are_used_and_trained_on_without_it(
        tmp_path, monkeypatch, tiny_backbone, prefect_harness):
    """Train from the stack (its MLflow server keeps artifacts behind itself: experiments get
    mlflow-artifacts:/ locations, files under mlflow/artifacts/), then, the stack down or its
    environment not sourced, `petalflow predict` and `train` in that folder use the same
    mlflow/ store embedded. Both failed with MLflow's "the tracking URI must be a valid http or
    https URI" (train after 30 s of retries). They now read and write those artifacts in
    mlflow/artifacts/, and the server, started again, serves what they wrote."""
    import mlflow

    from petalflow.flows.cli import main
    from petalflow.flows.train_flow import train_and_register
    from petalflow.stack import Stack, down, start_mlflow_server

    st = Stack(stack_dir=tmp_path / "stack", mlflow_port=free_port(),
               mlflow_dir=tmp_path / "mlflow", petalflow_home=tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PETALFLOW_HOME", str(tmp_path / "home"))
    data = _archive(tmp_path, "s", per_class=12, seed=3)
    with revalidating_server() as site:
        url = site.put("/s.tgz", data)
        try:
            start_mlflow_server(st)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", st.mlflow_uri)
            first = train_and_register(_params(url, tiny_backbone))
            served = mlflow.MlflowClient(st.mlflow_uri, st.mlflow_uri)
            assert served.get_model_version_download_uri(MODEL, "1").startswith(
                "mlflow-artifacts:/")
        finally:
            down(st)
        assert first["alias"] == "champion"

        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the embedded store: ./mlflow/mlflow.db
        photos = tmp_path / "photos"
        for name, rgb in COLOURS.items():
            write_image(photos / f"{name}.jpg", rgb, seed=90)
        out = tmp_path / "predictions.csv"
        assert main(["predict", "--input", str(photos), "--output", str(out)]) == 0
        import csv

        rows = list(csv.DictReader(out.open()))
        assert len(rows) == len(COLOURS)
        assert all(r["label"] in COLOURS and r["error"] == "" for r in rows), rows

        second = train_and_register(_params(url, tiny_backbone, force=True, min_accuracy=0.0))
        assert second["model_version"] == "2"
    try:
        start_mlflow_server(st)
        got = mlflow.artifacts.download_artifacts(
            f"models:/{MODEL}/2", dst_path=str(tmp_path / "pulled"), tracking_uri=st.mlflow_uri)
        assert (Path(got) / "MLmodel").is_file()
        assert served.get_model_version_download_uri(MODEL, "2").startswith(
            "mlflow-artifacts:/")
    finally:
        down(st)


def test_a_version_registered_by_hand_from_a_training_run_is_the_champion_its_run_describes(
        workspace, tiny_backbone, prefect_harness):
    """A user registers a training run's model by hand (the MLflow UI's "Register model",
    ``mlflow.register_model``) and makes that version the champion. It carries none of the
    tags petalflow sets when it registers. Before: the next run on the same data retrained
    anyway and promoted its version over the hand-picked one on the gate alone ("the class list
    changed from champion v2's (its classes unknown)"), a followed run failed ("records no
    training parameters") and `petalflow models` showed no accuracy or classes. Now its run's
    record stands in for the tags."""
    import mlflow

    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks.registry import champion_info, list_model_versions

    data = _archive(workspace, "d", per_class=12, seed=0)
    newer = _archive(workspace, "e", per_class=15, seed=1)
    with revalidating_server() as site:
        url = site.put("/d.tgz", data)
        first = train_and_register(_params(url, tiny_backbone, epochs=4))
        client = _client()
        by_hand = mlflow.register_model(client.get_model_version(MODEL, "1").source, MODEL)
        assert str(by_hand.version) == "2" and not {"params", "class_names"} & set(by_hand.tags)
        client.set_registered_model_alias(MODEL, "champion", "2")
        same = train_and_register(_params(url, tiny_backbone, epochs=4))
        followed = train_and_register(TrainParams(follow_champion=True))
        info = champion_info(MODEL)
        site.put("/d.tgz", newer)
        changed = train_and_register(TrainParams(follow_champion=True))
    assert (same["status"], same["model_version"]) == ("nothing to do", "2")
    assert (followed["status"], followed["model_version"]) == ("nothing to do", "2")
    assert info["class_names"] == sorted(COLOURS) and info["data_url"] == url
    assert info["stored_test_accuracy"] == pytest.approx(
        first["test_metrics"]["test_accuracy"], abs=1e-6)
    # New data behind the URL: trained with v2's settings, compared with v2 on the same split.
    assert changed["status"] == "trained" and changed["model_version"] == "3"
    assert changed["comparison"]["champion_version"] == "2"
    assert changed["comparison"]["champion_accuracy"] is not None
    assert "classes unknown" not in changed["alias_reason"]
    assert json.loads(_client().get_model_version(MODEL, "3").tags["params"])["epochs"] == 4
    listed = list_model_versions(MODEL).set_index("version")
    assert listed.loc[2, "classes"] == len(COLOURS)
    assert listed.loc[2, "test_accuracy"] == pytest.approx(
        first["test_metrics"]["test_accuracy"], abs=1e-6)
