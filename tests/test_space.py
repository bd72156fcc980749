"""A full disk (tasks/space.py): the kernel's own ENOSPC, on small tmpfs disks mounted for the
test (root: the CI machines run as root; elsewhere the disk tests are skipped, saying why)."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.helpers import make_dataset, make_tgz, revalidating_server, write_image


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(name, kib)``: a tmpfs of ``kib`` KiB mounted at tmp_path/name, unmounted
    after the test."""
    mounted = []

    def mount(name: str, kib: int) -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"a small disk is a tmpfs mount, refused here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> None:
    """Write a file of the user's onto ``disk`` until it is full."""
    with open(disk / "other-files.bin", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(os.urandom(4096))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_what_says_a_disk_is_full_is_told_from_other_errors():
    from petalflow.tasks.space import no_space, short_size

    assert no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:  # raised from it, as MLflow and the tasks raise their own errors
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as exc:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full") from exc
    except RuntimeError as wrapped:
        assert no_space(wrapped)
    # TensorFlow's file errors say it in words
    assert no_space(RuntimeError("/x/variables.data-00000-of-00001.tempstate; No space left on "
                                 "device"))
    assert not no_space(OSError(errno.EACCES, "Permission denied"))
    assert not no_space(OSError(errno.EROFS, "Read-only file system"))
    assert not no_space(RuntimeError("disk"))
    assert [short_size(n) for n in (0, 1023, 1536, 45 * 1024**2 + 1)] == [
        "0 bytes", "1023 bytes", "1.5 KiB", "45.0 MiB"]


def test_the_disk_named_is_the_one_checked_or_else_the_fullest(small_disk, monkeypatch,
                                                                  tmp_path):
    """A check before writing names the disk it checked, even when another place petalflow
    writes to (here TMPDIR) is fuller; a failure that names no file names the fullest one,
    with every place on it."""
    import tempfile

    from petalflow.tasks.errors import DiskFull
    from petalflow.tasks.space import check_space, disk_full_said

    home = small_disk("home", 1024)
    tmp = small_disk("tmp", 64)
    _fill(tmp)
    monkeypatch.setenv("PETALFLOW_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(DiskFull) as checked:
        check_space(home / "downloads" / "k", 2 * 1024**2, "downloading a.tgz", "the download")
    assert str(checked.value) == (
        "no space left on the disk while downloading a.tgz (2.0 MiB needed): the disk of "
        f"PETALFLOW_HOME ({home}) and the MLflow store ({home / 'mlflow'}) has 1.0 MiB "
        "free of 1.0 MiB")
    with pytest.raises(DiskFull) as said:
        with disk_full_said("training", (home / "runs" / "r", "the run's folder")):
            raise RuntimeError("saving: No space left on device")
    assert str(said.value) == ("no space left on the disk while training: the disk of TMPDIR "
                               f"({tmp}) has 0 bytes free of 64.0 KiB now that the step stopped")
    with pytest.raises(DiskFull) as named:  # the OSError names its file: that file's disk
        with disk_full_said("training", (home / "runs" / "r", "the run's folder")):
            raise OSError(errno.ENOSPC, "No space left on device", str(home / "runs" / "x"))
    assert f"the disk of PETALFLOW_HOME ({home}) and the MLflow store" in str(named.value)
    with pytest.raises(ValueError):  # other errors pass as they are
        with disk_full_said("training"):
            raise ValueError("not the disk")


def test_the_command_says_a_full_disk_with_exit_status_7_wherever_it_was_raised(
        monkeypatch, tmp_path):
    """The command's line and status for a full disk: a step's DiskFull as it is; a training
    run on the gpu pool that failed so, as the run that handed it over quotes it (that
    worker's disk, not this machine's); one raised outside any step (the store's creation),
    naming the fullest of this machine's places."""
    from petalflow.flows.cli import EXIT_NO_SPACE, explain_failure
    from petalflow.tasks.errors import DiskFull

    monkeypatch.setenv("PETALFLOW_HOME", str(tmp_path / "home"))
    step = DiskFull("no space left on the disk while training: the disk of PETALFLOW_HOME "
                    "(/w) has 0 bytes free of 1.0 GiB")
    said = explain_failure(step)
    assert (said.code, str(said)) == (EXIT_NO_SPACE, str(step))
    assert said.hint.startswith("free space on that disk, or point what it holds at a bigger")
    quoted = RuntimeError(f"training run a-b (train-model/train-gpu) ended Failed: Flow run "
                          f"encountered an exception: DiskFull: {step}")
    assert (explain_failure(quoted).code, str(explain_failure(quoted))) == (EXIT_NO_SPACE,
                                                                            str(quoted))
    import sqlite3

    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as exc:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full") from exc
    except RuntimeError as outside:
        said = explain_failure(outside)
    assert said.code == EXIT_NO_SPACE
    assert str(said).startswith("no space left on the disk: the disk of "), str(said)
    assert explain_failure(OSError(errno.EACCES, "Permission denied")).code != EXIT_NO_SPACE


def _archive(tmp: Path, name: str, seed: int, ballast_kib: int = 0) -> bytes:
    """An archive of class folders; ``ballast_kib``: a file of random bytes beside them (an
    export's other files), so its size, packed and unpacked, is known."""
    src = make_dataset(tmp / f"{name}-src", per_class=12, seed=seed)
    if ballast_kib:
        (src / "raw-export.bin").write_bytes(os.urandom(ballast_kib * 1024))
    return make_tgz(src, tmp / f"{name}.tgz").read_bytes()


@pytest.mark.e2e
def test_a_full_disk_is_named_with_its_free_space_and_loses_nothing(
        workspace, tiny_backbone, prefect_harness, small_disk, monkeypatch, capsys):
    """The data behind the URL grows past what PETALFLOW_HOME's disk holds: the download of
    the new archive, then (on a disk with room for the archive only) its extraction, are
    refused before writing, naming the disk, its free space and what was needed (a bare
    "[Errno 28] No space left on device" before, the download's .part filling the disk and
    kept; the extraction's error came with the hint to check the archive's layout);
    exit status 7. The champion stays. A prediction job whose output disk is full: the same,
    and no file, not even the .part (kept before: its close failed first)."""
    from petalflow.flows.cli import EXIT_NO_SPACE, main
    from petalflow.tasks.registry import champion_info
    from petalflow.tasks.space import short_size

    first = _archive(workspace, "v1", seed=0)
    grown = _archive(workspace, "v2", seed=4, ballast_kib=400)
    with revalidating_server() as site:
        url = site.put("/export/photos.tgz", first)
        train = ["train", "--data-url", url, "--backbone", str(tiny_backbone),
                 "--image-size", "32", "--epochs", "6", "--batch-size", "8",
                 "--learning-rate", "0.05", "--min-accuracy", "0.5"]
        assert main(train) == 0
        capsys.readouterr()
        assert champion_info("petalflow-classifier")["version"] == "1"
        site.put("/export/photos.tgz", grown)

        small = small_disk("small-home", 256)  # less than the archive
        monkeypatch.setenv("PETALFLOW_HOME", str(small))
        assert main(train) == EXIT_NO_SPACE
        err = capsys.readouterr().err
        assert err.startswith(
            "petalflow train: error: no space left on the disk while downloading photos.tgz "
            f"({short_size(len(grown))} needed): the disk of PETALFLOW_HOME ({small}) has "), err
        assert "hint: free space on that disk, or point what it holds at a bigger one" in err
        assert "layout" not in err and "Traceback" not in err
        left = [p for p in small.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
        assert left == []  # no .part, nothing half written

        roomier = small_disk("roomier-home", 640)  # the archive fits, its files do not
        monkeypatch.setenv("PETALFLOW_HOME", str(roomier))
        assert main(train) == EXIT_NO_SPACE
        err = capsys.readouterr().err
        assert err.startswith(
            "petalflow train: error: no space left on the disk while extracting photos.tgz ("
        ), err
        assert f" needed): the disk of PETALFLOW_HOME ({roomier}) has " in err
        assert "layout" not in err
        datasets = roomier / "datasets"
        assert [p.name for p in datasets.iterdir() if not p.name.startswith(".")] == []
        assert not list(datasets.glob(".staging-*"))
        assert (roomier / "downloads").is_dir()  # the download is kept for the next run

    assert champion_info("petalflow-classifier")["version"] == "1"  # nothing registered

    photos = workspace / "to-classify"
    for i in range(20):
        write_image(photos / f"{i}.jpg", (200, 30, 30), seed=i)
    out = small_disk("full-out", 64)
    _fill(out)
    assert main(["predict", str(photos), "--output", str(out / "predictions.csv")]) \
        == EXIT_NO_SPACE
    err = capsys.readouterr().err
    assert err.startswith("petalflow predict: error: no space left on the disk while writing "
                          f"the predictions: the disk of the predictions ({out}) has "), err
    assert sorted(p.name for p in out.iterdir()) == ["other-files.bin"]

    # `petalflow pull` into a disk too small for the model: that disk is named (the
    # fullest of the others, a disk with room, was before), and nothing is left there
    small_dest = small_disk("small-dest", 64)
    assert main(["pull", "--dest", str(small_dest / "model")]) == EXIT_NO_SPACE
    err = capsys.readouterr().err
    assert err.startswith("petalflow pull: error: no space left on the disk while pulling the "
                          f"model: the disk of --dest ({small_dest}) has "), err
    assert list(small_dest.iterdir()) == []
