"""Full disks: an error that says which disk filled, and what it holds, instead of a bare
``[Errno 28] No space left on device``.

The data grows; the disk that holds it does not. Every step that writes (the download, the
extraction, the scan's manifests, features, checkpoints and exports, the evaluation, the
MLflow store, the predictions) turns such a failure into ``DiskFull`` (``disk_full_said``):
named the disk and what lives there, with its free space; not retried (freeing space is the
user's to do). The download and the extraction also check first, as they know their sizes.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from petalflow.mlflow_artifacts import sqlite_database
from petalflow.tasks.common import error_chain, local_store_db, petalflow_home, short_size
from petalflow.tasks.errors import DiskFull

# DiskFull's own words: a training run on the gpu pool that failed so is quoted by the run
# that handed it over.
DISK_FULL = "no space left on the disk"
# How the disk's being full reads where no OSError carries the errno: TensorFlow's file
# errors, SQLite's (an MLflow store), a tracking server's answer, DiskFull quoted.
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "database or disk is full",
               DISK_FULL)


def no_space(exc: Optional[BaseException]) -> bool:
    """Whether ``exc`` (or an error it was raised from) says a disk is full or over quota."""
    for cause in error_chain(exc):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(cause) for words in _FULL_WORDS):
            return True
    return False


def _existing(path: Path) -> Path:
    """``path``, or its nearest folder that exists (a disk's usage needs one)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds (or would hold) ``path``."""
    return shutil.disk_usage(_existing(path)).free


def places() -> list[tuple[Path, str]]:
    """Where petalflow writes, each with its name: PETALFLOW_HOME, the embedded MLflow store
    (when no tracking server is set) and the temporary folder (MLflow and TensorFlow write
    there on the way)."""
    found = [(petalflow_home(), "PETALFLOW_HOME")]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    db = sqlite_database(uri) if uri else local_store_db()
    if db is not None:
        found.append((db.parent, "the MLflow store"))
    elif uri.startswith("file:") or "://" not in uri:
        found.append((Path(uri.removeprefix("file://").removeprefix("file:")),
                      "the MLflow store"))
    found.append((Path(tempfile.gettempdir()), "TMPDIR"))
    return found


def fullest(own: tuple = (), at: Optional[Path] = None) -> tuple[str, int, int]:
    """Of the disks of ``places`` and of the step's ``own`` folders ((folder, name) pairs),
    the one with the least free space, or the one holding ``at``: (the places on it, as
    "NAME (path)"; an own folder only where it lies in none of them), its free bytes, its
    size in bytes."""
    disks: dict[int, list] = {}
    for path, name, is_own in [(p, n, True) for p, n in own] + [(p, n, False)
                                                               for p, n in places()]:
        path = Path(path).absolute()
        try:
            found = _existing(path)
            usage = shutil.disk_usage(found)
            device = found.stat().st_dev
        except OSError:
            continue
        disks.setdefault(device, [[], usage.free, usage.total])[0].append((path, name, is_own))
    if not disks:  # none could be read (gone, or not ours to read)
        return "", 0, 0
    try:
        chosen = _existing(Path(at)).stat().st_dev if at is not None else None
    except OSError:
        chosen = None
    on_disk, free, total = disks[chosen] if chosen in disks else min(
        disks.values(), key=lambda entry: entry[1])
    known = [path for path, _name, is_own in on_disk if not is_own]
    shown = [f"{name} ({path})" for path, name, is_own in on_disk
             if not (is_own and any(p == path or p in path.parents for p in known))]
    return " and ".join(dict.fromkeys(shown)), free, total


def disk_full(doing: str, own: tuple = (), needed: Optional[int] = None,
              at: Optional[Path] = None) -> DiskFull:
    """The error for a disk found full while ``doing`` ("" when not known; ``own``: the step's
    own folders, and ``at`` the one known full, as in ``fullest``; ``needed``: the bytes the
    step needed there, if known)."""
    said = (DISK_FULL + (f" while {doing}" if doing else "")
            + (f" ({short_size(needed)} needed)" if needed else ""))
    where, free, total = fullest(own, at)
    if not where:
        return DiskFull(said)
    return DiskFull(f"{said}: the disk of {where} has {short_size(free)} free of "
                    f"{short_size(total)}" + ("" if needed else " now that the step stopped"))


def check_space(folder: Path, needed: int, doing: str, name: str) -> None:
    """DiskFull before writing ``needed`` bytes into ``folder`` (called ``name``) when its
    disk has less free."""
    if needed > free_bytes(folder):
        raise disk_full(doing, ((Path(folder), name),), needed, at=Path(folder))


@contextmanager
def disk_full_said(doing: str, *extra: tuple[Path, str]) -> Iterator[None]:
    """Around a step's work (``extra``: its own folders, as ``fullest``'s ``own``): an error
    that says a disk is full (``no_space``) is raised again as ``disk_full``'s DiskFull,
    from it."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not no_space(exc):
            raise
        raise disk_full_from(exc, doing, tuple(extra)) from exc


def disk_full_from(exc: BaseException, doing: str = "", own: tuple = ()) -> DiskFull:
    """``disk_full`` for an error that says a disk is full: the disk of the file it names,
    if it names one."""
    named = next((c.filename for c in error_chain(exc)
                  if isinstance(c, OSError) and isinstance(c.filename, str)), None)
    return disk_full(doing, own, at=Path(named).absolute().parent if named else None)
