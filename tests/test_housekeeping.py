"""What runs leave on disk: extractions an archive replaced behind its source, their manifests,
feature caches of superseded data, removed at the end of a run, never while a run uses them."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from petalflow.tasks.download import extract_archive
from tests.helpers import make_dataset, make_tgz, make_zip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extractions(datasets: Path) -> list[str]:
    return sorted(p.name for p in datasets.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_an_archive_replaced_behind_its_source_leaves_one_extraction(tmp_path):
    """Weekly retraining on data that changes: each new archive from the same URL was extracted
    beside the old ones, which stayed for ever (a full copy of the dataset per version). Once a
    run ends, the extractions no source uses any more are removed, never one a run still
    holds, nor another source's current one."""
    from petalflow.tasks.download import prune_extractions, release_extractions

    datasets = tmp_path / "datasets"
    url = "https://data.example/photos.tgz"
    v1 = make_tgz(make_dataset(tmp_path / "v1", per_class=3, seed=1), tmp_path / "v1.tgz")
    v2 = make_tgz(make_dataset(tmp_path / "v2", per_class=3, seed=2), tmp_path / "v2.tgz")
    other = make_zip(make_dataset(tmp_path / "o", per_class=3, seed=3), tmp_path / "other.zip")
    extract_archive(other, datasets, source=str(other))
    extract_archive(v1, datasets, source=url, holder="run-1")  # run 1: still going
    root2 = extract_archive(v2, datasets, source=url, holder="run-2")
    assert len(_extractions(datasets)) == 3
    release_extractions("run-2")
    assert prune_extractions(datasets) == []  # v1 is run 1's, v2 and the zip are current
    release_extractions("run-1")
    removed = prune_extractions(datasets)
    assert [name for name, _ in removed] == [_sha(v1)] and removed[0][1] > 0
    assert _sha(v2) in _extractions(datasets) and len(_extractions(datasets)) == 2
    assert sorted(p.name for p in root2.iterdir()) == ["blue", "green", "red"]
    assert not list(datasets.glob(".removing-*"))
    # The same archive again (a rollback) is extracted again; the one it replaced goes.
    extract_archive(v1, datasets, source=url)
    assert [name for name, _ in prune_extractions(datasets)] == [_sha(v2)]


def test_prune_leaves_an_extraction_in_progress_and_removes_a_killed_ones_staging(tmp_path):
    from petalflow.tasks.common import file_lock
    from petalflow.tasks.download import prune_extractions

    datasets = tmp_path / "datasets"
    killed = datasets / ".staging-aaaa-x1y2z3"  # its extraction's process was killed
    going = datasets / ".staging-bbbb-q9w8e7"  # another process extracts this one now
    stray = datasets / "cccc"  # made before extractions were recorded
    for folder in (killed, going, stray):
        (folder / "red").mkdir(parents=True)
        (folder / "red" / "a.jpg").write_bytes(b"x" * 10)
    with file_lock(datasets / ".bbbb.lock"):
        removed = prune_extractions(datasets)
    assert sorted(name for name, _ in removed) == [".staging-aaaa-x1y2z3", "cccc"]
    assert going.is_dir() and not killed.exists() and not stray.exists()


def test_manifests_of_dataset_folders_that_are_gone_are_removed(tmp_path):
    from petalflow.tasks.dataset import prepare_dataset, prune_manifests

    kept = make_dataset(tmp_path / "kept", per_class=3, seed=1)
    gone = make_dataset(tmp_path / "gone", per_class=3, seed=2)
    kept_info = prepare_dataset(kept, tmp_path / "manifests" / "k", 0.2, 0.2, 42)
    prepare_dataset(gone, tmp_path / "manifests" / "g", 0.2, 0.2, 42)
    shutil.rmtree(gone)
    removed, fingerprints = prune_manifests(tmp_path / "manifests")
    assert removed == 1 and fingerprints == {kept_info["fingerprint"]}
    assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == ["k"]
    assert (tmp_path / "manifests" / "k" / "manifest.csv").is_file()


def test_feature_caches_of_superseded_data_go_and_those_in_use_stay(tmp_path):
    """A feature cache holds one data version's features (a full copy, ~5 KB per image);
    each new version of a growing dataset made one more and none went away."""
    from petalflow.tasks.common import file_lock
    from petalflow.tasks.train import (
        FEATURE_BANKS, mark_feature_cache, prune_feature_caches,
    )

    root = tmp_path / "features"
    for name, fingerprint in (("old", "f1"), ("current", "f2"), ("computing", "f0")):
        mark_feature_cache(root / name, fingerprint)
        (root / name / "train.npz").write_bytes(b"x" * 100)
        (root / name / "train.npz.lock").touch()
    (root / "unmarked").mkdir()  # written before caches were marked: left alone
    (root / FEATURE_BANKS / "b").mkdir(parents=True)  # every image's features, by content
    with file_lock(root / "computing" / "train.npz.lock"):
        removed = prune_feature_caches(root, {"f2"})
    assert [name for name, _ in removed] == ["old"] and removed[0][1] > 100
    assert sorted(p.name for p in root.iterdir()) == [
        "computing", "current", FEATURE_BANKS, "unmarked"]
    assert [name for name, _ in prune_feature_caches(root, {"f2"})] == ["computing"]


def _attempt(runs: Path, key: str, name: str, *files: str) -> Path:
    folder = runs / key / name
    (folder / "export").mkdir(parents=True)
    (folder / "export" / "saved_model.pb").write_bytes(b"x" * 1000)
    for file in files:
        (folder / file).write_text("{}")
    return folder


def test_training_folders_of_ended_runs_go_and_those_still_needed_stay(tmp_path):
    """Each training left its folder under runs/ (the export, edge models, checkpoints and
    evaluation: a copy of what its MLflow run holds, the model's size each time) and none went
    away: a weekly retraining added one a week. Once its run has ended, a later run's
    housekeeping removes it; an attempt still needed stays."""
    from petalflow.tasks.common import file_lock
    from petalflow.tasks.train import (
        DONE_MARKER, SEEDED_MARKER, attempt_name, end_attempts, prune_attempts,
    )

    runs = tmp_path / "runs"
    ended = _attempt(runs, "k1", attempt_name("a"), DONE_MARKER)
    candidate = _attempt(runs, "k2", attempt_name("a"), DONE_MARKER)  # run a's sweep
    killed = _attempt(runs, "k1", attempt_name("b"))  # killed mid-training: seeds the next
    seeded = _attempt(runs, "k1", attempt_name("c"), SEEDED_MARKER)  # killed, and it did
    legacy = _attempt(runs, "k3", attempt_name("d"), DONE_MARKER)  # from before the mark
    retried = _attempt(runs, "k3", attempt_name("e"), DONE_MARKER)  # its run is retried
    end_attempts(runs, attempt_name("a"))
    end_attempts(runs, attempt_name("b"))  # its run failed before training finished
    end_attempts(runs, attempt_name("e"))
    mine = _attempt(runs, "k1", attempt_name("f"), DONE_MARKER)  # this run's
    end_attempts(runs, attempt_name("f"))
    with file_lock(retried / ".lock"):  # training again
        removed = prune_attempts(runs, keep=attempt_name("f"))
    assert sorted(name for name, _ in removed) == [
        "k1/run-a", "k1/run-c", "k2/run-a"] and all(size > 1000 for _, size in removed)
    assert not ended.exists() and not candidate.exists() and not seeded.exists()
    assert killed.is_dir() and legacy.is_dir() and retried.is_dir() and mine.is_dir()
    assert not list(runs.glob("*/.removing-*"))
    assert prune_attempts(runs, keep=attempt_name("g")) == [
        ("k1/run-f", 1002), ("k3/run-e", 1002)]
    assert prune_attempts(tmp_path / "nothing", keep="") == []


def test_prune_home_after_the_data_changed_behind_its_url(tmp_path):
    """The whole of it, as the training flow's last task does it."""
    from petalflow.tasks.dataset import prepare_dataset
    from petalflow.tasks.housekeeping import prune_home
    from petalflow.tasks.train import mark_feature_cache

    home = tmp_path / "home"
    url = "https://data.example/photos.tgz"
    infos = []
    for version in (1, 2):
        archive = make_tgz(make_dataset(tmp_path / f"v{version}", per_class=3, seed=version),
                           tmp_path / f"v{version}.tgz")
        root = extract_archive(archive, home / "datasets", source=url)
        info = prepare_dataset(root, home / "manifests" / f"m{version}", 0.2, 0.2, 42)
        mark_feature_cache(home / "features" / f"c{version}", info["fingerprint"])
        infos.append(info)
    removed = prune_home(home)
    assert removed["datasets"] == [_sha(tmp_path / "v1.tgz")] and removed["manifests"] == 1
    assert removed["features"] == ["c1"] and removed["bytes"] > 0
    assert sorted(p.name for p in (home / "manifests").iterdir()) == ["m2"]
    assert sorted(p.name for p in (home / "features").iterdir()) == ["c2"]
    assert Path(infos[1]["manifest"]).is_file()
    assert prune_home(home) == {"downloads": [], "datasets": [], "manifests": 0, "features": [],
                                "runs": [], "feature_bank_rows": 0, "bytes": 0}


def test_sources_no_run_used_for_weeks_are_let_go(tmp_path):
    """A deployment whose data_url moves to a dated archive each week (or a dataset retired)
    kept every archive it ever downloaded and each one's extraction for ever: only an archive
    replaced behind the same URL made one unused. The copies and extraction records of
    sources no run used for UNUSED_SOURCE_DAYS go with the run's housekeeping; a source
    watch-data still revalidates stays, as do one being downloaded and one just used; a
    source given again is downloaded again."""
    import json
    import os
    import time

    from petalflow.tasks.common import file_lock, utc_at
    from petalflow.tasks.download import UNUSED_SOURCE_DAYS, download_archive
    from petalflow.tasks.housekeeping import prune_home
    from tests.helpers import serve_directory

    home = tmp_path / "home"
    served = tmp_path / "served"
    for week in (1, 2, 3, 4):
        make_tgz(make_dataset(tmp_path / f"w{week}", per_class=2, seed=week),
                 served / f"photos-w{week}.tgz")
    old = utc_at(time.time() - (UNUSED_SOURCE_DAYS + 1) * 86400)

    def age(path: Path, key: str) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), key: old}))

    with serve_directory(served) as base:
        urls = [f"{base}/photos-w{week}.tgz" for week in (1, 2, 3, 4)]
        copies = [download_archive(url, home / "downloads") for url in urls]
        shas = [_sha(copy) for copy in copies]
        for url, copy in zip(urls, copies):
            extract_archive(copy, home / "datasets", source=url)
        # Week 1: nobody since. Week 2: trained long ago, watch-data revalidates it each
        # hour. Week 3: unused, but a download of it is under way. Week 4: this week's.
        age(copies[0].parent / "source.json", "checked_at")
        age(copies[2].parent / "source.json", "checked_at")
        for record in (home / "datasets" / ".sources").glob("*.json"):
            if json.loads(record.read_text())["source"] != urls[3]:
                age(record, "at")
        broken = home / "downloads" / "never-completed"  # a .part of a URL never given again
        broken.mkdir()
        (broken / "photos.tgz.part").write_bytes(b"x" * 100)
        os.utime(broken / "photos.tgz.part", (time.time() - 50 * 86400,) * 2)
        with file_lock(copies[2].parent / ".lock"):
            removed = prune_home(home)
        assert removed["downloads"] == sorted([copies[0].parent.name, "never-completed"])
        assert removed["datasets"] == [shas[0]]
        assert removed["bytes"] >= len((served / "photos-w1.tgz").read_bytes()) + 100
        assert not copies[0].exists() and [p.name for p in copies[0].parent.iterdir()] == [
            ".lock"]  # the lock a download may wait on stays
        assert copies[1].is_file() and copies[2].is_file() and copies[3].is_file()
        assert _extractions(home / "datasets") == sorted(shas[1:])
        assert [p.name for p in broken.iterdir()] == [".lock"]
        # Week 3's once its download is over; then nothing left to remove, and none said.
        later = prune_home(home)
        assert (later["downloads"], later["datasets"]) == ([copies[2].parent.name], [shas[2]])
        assert prune_home(home)["downloads"] == []
        # Given again: downloaded and extracted anew.
        again = download_archive(urls[0], home / "downloads")
        assert again == copies[0] and again.read_bytes() == (served / "photos-w1.tgz").read_bytes()
        assert extract_archive(again, home / "datasets", source=urls[0]).is_dir()


def test_only_the_prediction_records_used_last_are_kept(tmp_path):
    """Each evaluated version records its test predictions (``evaluate.prediction_record``);
    the folder keeps the PREDICTION_RECORDS written or used last, not one per version ever."""
    import os

    import pandas as pd

    from petalflow.tasks.evaluate import PREDICTION_RECORDS, _write_record

    rows = pd.DataFrame({"label": ["a"], "probability": [1.0], "error": [""]}, index=["0" * 64])
    records = tmp_path / "predictions"
    records.mkdir()
    for i in range(PREDICTION_RECORDS + 3):  # written one a second, long ago
        rows.to_csv(records / f"run{i:02d}.csv", index_label="sha256")
        os.utime(records / f"run{i:02d}.csv", (1_000_000 + i, 1_000_000 + i))
    os.utime(records / "run00.csv")  # used just now (a champion compared again)
    _write_record(records / "run99.csv", rows)
    kept = sorted(p.name for p in records.glob("*.csv"))
    assert len(kept) == PREDICTION_RECORDS and "run00.csv" in kept and "run99.csv" in kept
    assert kept == ["run00.csv"] + [f"run{i:02d}.csv" for i in range(5, 11)] + ["run99.csv"]


def _segment(bank: Path, name: str, shas: list, dim: int = 4) -> dict:
    """A feature-bank segment as a training writes it: each sha's row is made from the sha."""
    import numpy as np

    rows = {sha: np.frombuffer(bytes.fromhex(sha)[:4 * dim], np.uint8).astype(np.float32)[:dim]
            for sha in shas}
    bank.mkdir(parents=True, exist_ok=True)
    np.savez(bank / f"{name}.npz", features=np.stack([rows[s] for s in shas]),
             shas=np.array(shas))
    return rows


def _bank_rows(bank: Path) -> dict:
    import numpy as np

    rows = {}
    for segment in sorted(bank.glob("*.npz")):
        with np.load(segment) as data:
            rows.update((str(s), r) for s, r in zip(data["shas"], data["features"]))
    return rows


def test_the_feature_bank_holds_what_current_data_needs_as_data_rolls(tmp_path):
    """Scheduled retraining on rolling data (new photos in, old ones out): each training added
    a bank segment of its new images' features and none went away, so a bank grew with the
    data's history, not its size, and every training read all of it. At the end of a run, a
    bank most of whose rows are of images no current data holds, or with more than
    BANK_SEGMENTS segments, is rewritten as one segment of the rows current data needs; a bank
    a training is reading is left for a later run; the rows a training takes are unchanged."""
    import numpy as np

    from petalflow.tasks.common import file_lock
    from petalflow.tasks.dataset import prepare_dataset, split_shas
    from petalflow.tasks.housekeeping import prune_home
    from petalflow.tasks.train import BANK_LOCK, BANK_SEGMENTS, FEATURE_BANKS, _features_with_bank

    home = tmp_path / "home"
    root = extract_archive(make_tgz(make_dataset(tmp_path / "photos", per_class=4),
                                    tmp_path / "photos.tgz"), home / "datasets",
                           source="https://data.example/photos.tgz")
    info = prepare_dataset(root, home / "manifests" / "m", 0.2, 0.2, 42)
    live = sorted({sha for split in ("train", "val", "test") for sha in split_shas(info, split)})
    assert len(live) == 12
    gone = [hashlib.sha256(b"gone %d" % i).hexdigest() for i in range(40)]
    banks = home / "features" / FEATURE_BANKS
    # Rolled: 13 of its 25 rows are of photos no longer in the data.
    rolled = {**_segment(banks / "rolled", "a", live[:6] + gone[:10]),
              **_segment(banks / "rolled", "b", live[6:] + gone[10:13])}
    # Grown: 11 of its 23 rows stale, under half: left as it is.
    grown = {**_segment(banks / "grown", "a", live + gone[13:24])}
    # Many trainings' segments, none stale, five rows twice (two trainings computed them).
    many = {}
    for i, sha in enumerate(live + live[:BANK_SEGMENTS + 1 - len(live)]):
        many.update(_segment(banks / "many", f"s{i:02d}", [sha]))
    # A damaged segment (a disk error; a training skips it with a warning): the bank is
    # rewritten without it.
    damaged = {**_segment(banks / "damaged", "a", live)}
    (banks / "damaged" / "b.npz").write_bytes(b"PK\x03\x04 cut short")
    # Being read by a training: left alone.
    _segment(banks / "busy", "a", live[:2] + gone[24:40])
    busy_before = sorted(p.name for p in (banks / "busy").glob("*.npz"))
    with file_lock(banks / "busy" / BANK_LOCK):
        removed = prune_home(home)

    assert removed["feature_bank_rows"] == 13 + 5 and removed["bytes"] > 18 * 4 * 4
    for name, rows in (("rolled", rolled), ("many", many), ("damaged", damaged)):
        segments = list((banks / name).glob("*.npz"))
        assert len(segments) == 1, name
        kept = _bank_rows(banks / name)
        assert sorted(kept) == live, name
        assert all(np.array_equal(kept[sha], rows[sha]) for sha in live), name
    assert [p.name for p in (banks / "grown").glob("*.npz")] == ["a.npz"]
    assert sorted(_bank_rows(banks / "grown")) == sorted(grown)
    assert sorted(p.name for p in (banks / "busy").glob("*.npz")) == busy_before

    # The training's read of a compacted bank: every current image from it, none computed.
    def no_backbone(*_):
        raise AssertionError("computed features the bank holds")

    features, banked = _features_with_bank(no_backbone, [f"{s}.jpg" for s in live], live,
                                           None, "train", banks / "rolled", exif=False)
    assert banked == 12 and np.array_equal(features, np.stack([rolled[s] for s in live]))

    # Once nobody reads it, the next run's housekeeping compacts the busy bank too.
    assert prune_home(home)["feature_bank_rows"] == 16
    assert sorted(_bank_rows(banks / "busy")) == live[:2]


def test_a_second_training_of_a_model_waits_for_the_first_and_is_told_which(tmp_path,
                                                                             monkeypatch):
    """Two trainings of one model at once (the weekly schedule and a watch-data event, or Run
    clicked twice) both trained, and the later one ended as challenger. The later one now
    waits for the other's turn, told which run holds it; another model's training does not
    wait; a killed holder's turn ends with its process."""
    import subprocess
    import sys
    import threading
    import time

    from petalflow.tasks import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    said: list = []
    monkeypatch.setattr(registry, "log", lambda message, *args, **kw: said.append(message % args))
    home = tmp_path / "home"
    lock = registry.training_lock_path(home, "flowers/v2 ünï")
    assert lock.parent == home / "locks" and lock.name.startswith("train-flowers_v2_")
    assert registry.training_lock_path(home, "flowers/v2 ünï") == lock
    assert registry.training_lock_path(home, "flowers/v2 uni") != lock
    # One SQLite store, named relatively or absolutely, is one store.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow/mlflow.db")
    relative = registry.training_lock_path(home, "cats")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert registry.training_lock_path(home, "cats") == relative
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert registry.training_lock_path(home, "cats") != relative

    first_in, first_go, order = threading.Event(), threading.Event(), []

    def first():
        with registry.training_turn(home, "flowers/v2 ünï", "flow run 'first-run'") as turn:
            order.append(("first", turn.waited))
            first_in.set()
            first_go.wait(30)
            order.append(("first ends", None))

    worker = threading.Thread(target=first)
    worker.start()
    assert first_in.wait(30)
    assert "flow run 'first-run', since " in lock.read_text()
    # Another model trains at once.
    with registry.training_turn(home, "cats", "flow run 'cats'") as turn:
        assert turn.waited == 0.0 and turn.left_by is None
    threading.Timer(1.0, first_go.set).start()
    with registry.training_turn(home, "flowers/v2 ünï", "flow run 'second-run'") as turn:
        order.append(("second", turn.waited))
        assert turn.left_by is None  # the first ended its turn
        assert "flow run 'second-run', since " in lock.read_text()
    worker.join(30)
    assert [o[0] for o in order] == ["first", "first ends", "second"]
    assert order[0][1] == 0.0 and order[2][1] >= 0.5
    assert len(said) == 2, said
    assert said[0].startswith("model 'flowers/v2 ünï': another training of it is running "
                              "(flow run 'first-run', since ")
    assert "waits for it to end, then checks again whether there is anything new" in said[0]
    assert said[1].startswith("model 'flowers/v2 ünï': the other training ended; this run "
                              "waited ")
    assert lock.read_text() == ""  # nobody holds it

    # A holder killed mid-training (a cancelled run, a dead worker): the turn is free again.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('flow run killed'); f.flush(); "
         "print('held', flush=True); time.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said.clear()
    threading.Timer(1.0, holder.kill).start()
    began = time.monotonic()
    with registry.training_turn(home, "flowers/v2 ünï", "flow run 'third'") as turn:
        assert turn.waited >= 0.5 and time.monotonic() - began < 30
        # Its text stays in the lock: the next holder is told that it was killed.
        assert turn.left_by == "flow run killed"
        assert turn.holder.startswith("flow run 'third', since ")
    holder.wait(30)
    assert "(flow run killed)" in said[0]
    assert said[1] == ("model 'flowers/v2 ünï': the training before this one (flow run killed) "
                        "ended without ending its turn: its process was killed (the "
                        "out-of-memory killer, its machine or worker gone)")


def test_the_runs_a_killed_training_left_running_are_ended_killed_saying_what_it_registered(
        workspace, monkeypatch):
    """The MLflow runs made in a killed training's turn (its text left in the lock) and still
    RUNNING, in any experiment, are ended KILLED, saying why and whether it had registered a version (killed
    between its registration and the end of its run); those of other turns, and its ended
    ones, are left as they are."""
    from petalflow.tasks import registry

    said = []
    monkeypatch.setattr(registry, "log", lambda message, *args, **kw: said.append(message % args))
    client = registry.mlflow_client()
    exp = registry.ensure_experiment(client, "petalflow")
    left_by = "flow run 'gone-fox' (1234), since 2026-12-05T00:00:00+00:00"
    turn = {registry.TURN_TAG: registry.turn_tag(left_by)}
    plain, made, finished = (client.create_run(exp, tags=turn).info.run_id for _ in range(3))
    client.set_terminated(finished, status="FINISHED")
    other = client.create_run(exp, tags={
        registry.TURN_TAG: registry.turn_tag("flow run 'alive' (99), since now")}).info.run_id
    (workspace / "model").mkdir()
    client.create_registered_model("cats")
    client.create_model_version("cats", str(workspace / "model"), run_id=made)
    # The killed run logged to another experiment than the next run of the model does.
    elsewhere = client.create_run(registry.ensure_experiment(client, "before-the-rename"),
                                  tags=turn).info.run_id

    ended = registry.end_abandoned_runs(left_by, "flow run 'next-owl' (5678)")
    assert sorted(ended) == sorted([plain, made, elsewhere])
    assert said == [f"the MLflow runs it left RUNNING are ended KILLED, saying why: "
                    f"{', '.join(ended)}"]
    why = ("its run was killed before it ended (the out-of-memory killer, its machine or worker "
           f"gone: {left_by}); ")
    runs = {run_id: client.get_run(run_id) for run_id in (plain, made, finished, other)}
    assert runs[plain].info.status == runs[made].info.status == "KILLED"
    assert runs[plain].data.tags["petalflow.failure"] == (
        why + "nothing of it was registered. Ended by flow run 'next-owl' (5678)")
    assert runs[made].data.tags["petalflow.failure"] == (
        why + "it had registered cats version 1. Ended by flow run 'next-owl' (5678)")
    assert runs[made].data.tags["mlflow.note.content"].startswith("**Killed:** its run was")
    assert runs[finished].info.status == "FINISHED"
    assert runs[other].info.status == "RUNNING"  # another turn's: maybe still at work
    assert client.get_run(elsewhere).info.status == "KILLED"
    assert registry.end_abandoned_runs(left_by, "x") == []  # none left


def test_the_removal_line_names_only_what_was_removed_in_the_singular_or_plural():
    """The line every training run ends with said "removed 0 download(s) … 1 training
    folder(s) …": it now names what there was, counted."""
    from petalflow.tasks.housekeeping import removed_sentence

    nothing = {"downloads": [], "datasets": [], "manifests": 0, "features": [], "runs": [],
               "feature_bank_rows": 0, "bytes": 0}
    assert removed_sentence(nothing) == ""
    one_run = dict(nothing, runs=["r1"], bytes=int(3.6 * 2**20))
    assert removed_sentence(one_run) == "removed 1 training folder of ended runs (3.6 MiB freed)"
    several = dict(nothing, downloads=["a"], datasets=["d1"], features=["f1", "f2"],
                   runs=["r1", "r2"], feature_bank_rows=1, bytes=10 * 2**20)
    assert removed_sentence(several) == (
        "removed 1 download of sources no run used for 45 days; 1 dataset extraction and 2 "
        "feature caches of data no source uses any more; 2 training folders of ended runs; "
        "1 feature bank row of images no data holds now (10.0 MiB freed)")
