"""Retraining on an event: tell whether a dataset source differs from what the champion was
trained on, and announce it as the Prefect event ``petalflow.dataset.changed``.

The check is the cheap one the train flow makes first (a conditional request for a URL, whose
new bytes are kept for the training run; the listing of a folder); the event carries the train
flow's parameters, and ``deployment.yaml`` wires a trigger from it to the ``train`` deployment.
A user's own export job can emit the same event (see the README).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Optional

from prefect import task

from petalflow.tasks.common import (
    file_lock, read_json, redact_url, source_url, utc_now, write_json,
)
from petalflow.tasks.params import TrainParams

EVENT = "petalflow.dataset.changed"
RESOURCE_PREFIX = "petalflow.dataset."


def resource_id(data_url: str) -> str:
    """The event's resource id for a dataset source: stable per URL or path (a presigned
    URL signed again is one source: ``source_url``)."""
    return RESOURCE_PREFIX + hashlib.sha256(source_url(data_url).encode()).hexdigest()[:16]


def source_state(source: dict) -> Optional[str]:
    """What identifies the content of a source: the archive's sha256, or a folder's listing
    fingerprint."""
    return source.get("sha256") or source.get("listing_fingerprint")


def differs_from_champion(source: dict, champion: Optional[dict]) -> tuple[bool, str]:
    """(changed, reason): does ``source`` differ from what the champion (``champion_info``;
    a followed challenger's ``version_info``: its ``alias`` says which) was trained on?"""
    if champion is None:
        # The first model is trained on purpose (the `train` deployment, `petalflow train`):
        # a freshly started stack must not start a heavy training on the default data.
        return False, "no champion yet: train a first model; the watch follows changes after it"
    state = source_state(source)
    which = f"the {champion.get('alias', 'champion')} v{champion['version']}"
    # Versions record the URL without its secrets (``redact_url``; older ones as given): a
    # presigned URL signed again still names the same source (``source_url``).
    trained_url = champion.get("data_url")
    if trained_url is None or source_url(trained_url) != source_url(source["url"]):
        return True, f"{which} was trained on {redact_url(trained_url)}"
    trained_on = champion.get("archive_sha256") or champion.get("listing_fingerprint")
    if trained_on is None:
        return True, f"{which} records no source digest"
    contents = source.get("contents_sha256")
    if trained_on != state and contents and contents == champion.get("archive_contents_sha256"):
        return False, ("the archive's bytes changed, its files did not (the same names, sizes "
                       f"and CRC-32s as {which}'s): zipped again, nothing to retrain")
    if trained_on != state:
        return True, f"source is {state[:12]}, {which} was trained on {trained_on[:12]}"
    return False, f"source unchanged since {which} ({state[:12]})"


QUIET_S = 120.0  # a changed folder is announced once nothing in it changed for this long


def still_changing(source: dict, now: float) -> Optional[str]:
    """Why a changed folder source is not announced yet: something in it changed less than
    ``QUIET_S`` ago (``last_change``, the listing's latest ctime): a copy still in progress,
    of which a training now would take the photos copied so far, a half-written one and a
    class folder begun as the new data. None once it is quiet, and for an archive (its
    extraction finds one cut short). A last change far ahead of this clock (a file server's
    clock) tells nothing: None."""
    last = source.get("last_change")
    if source.get("kind") != "folder" or last is None:
        return None
    age = now - float(last)
    if age >= QUIET_S or age < -QUIET_S:
        return None
    return (f"something in the folder changed {max(age, 0.0):.0f} s ago (a copy still in "
            f"progress?): it is announced once nothing in it has changed for {QUIET_S:.0f} s, "
            "at a later check")


def _state_file(watch_dir: Path, data_url: str) -> Path:
    return Path(watch_dir) / (resource_id(data_url) + ".json")


def already_announced(watch_dir: Path, source: dict) -> Optional[str]:
    """When this very source state was announced before: its time, else None. A changed
    source is announced once; the weekly retraining is the safety net if that run failed."""
    last = read_json(_state_file(watch_dir, source["url"]))
    return last.get("announced_at") if last.get("state") == source_state(source) else None


def remember_announcement(watch_dir: Path, source: dict, event_id: str) -> None:
    path = _state_file(watch_dir, source["url"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"state": source_state(source), "event_id": event_id,
                      "announced_at": utc_now()})


def announce_once(watch_dir: Path, source: dict,
                  emit: Callable[[], str]) -> tuple[Optional[str], Optional[str]]:
    """Announce this source state once, also when watch runs overlap (a schedule's runs do
    when a check takes longer than its interval; a worker runs several at once): under a lock
    per source, a run that finds the state announced meanwhile emits nothing. Returns
    (event id, None) when this run emitted, else (None, when it was announced)."""
    path = _state_file(watch_dir, source["url"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        announced = already_announced(watch_dir, source)
        if announced:
            return None, announced
        event_id = emit()
        remember_announcement(watch_dir, source, event_id)
        return event_id, None


def event_payload(params: TrainParams) -> dict:
    """The train flow's parameters for the triggered run: those that differ from the
    defaults, plus the data URL."""
    return {"params": {**params.model_dump(mode="json", exclude_defaults=True),
                       "data_url": params.data_url}}


def emit_dataset_changed(params: TrainParams, source: dict, reason: str) -> str:
    """Emit ``petalflow.dataset.changed`` for ``params.data_url``; returns the event id."""
    from prefect.events import emit_event

    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(params.data_url),
                  "prefect.resource.name": redact_url(params.data_url),
                  "petalflow.data_url": redact_url(params.data_url)},
        payload={**event_payload(params), "reason": reason,
                 "source_state": source_state(source)},
    )
    if event is None:
        raise RuntimeError("Prefect events are disabled here; cannot announce the change")
    return str(event.id)


@task(name="check-source")
def check_source_task(source: Optional[dict], champion: Optional[dict], watch_dir: str) -> dict:
    """Thin wrapper: {"changed", "reason", "announced_at", "settling"} for the watch flow
    (``source`` None: not looked at, as there is no champion to compare it with)."""
    changed, reason = differs_from_champion(source, champion)
    announced = already_announced(Path(watch_dir), source) if changed else None
    settling = still_changing(source, time.time()) if changed and not announced else None
    return {"changed": changed, "reason": reason, "announced_at": announced,
            "settling": settling}


@task(name="announce-change")
def announce_change_task(params: TrainParams, source: dict, reason: str,
                         watch_dir: str) -> dict:
    """Thin wrapper: {"event_id", "announced_at"} (one of them None) for the watch flow."""
    event_id, announced = announce_once(
        Path(watch_dir), source, lambda: emit_dataset_changed(params, source, reason))
    return {"event_id": event_id, "announced_at": announced}
