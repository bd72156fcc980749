"""Interleaved A/B: ``petalflow train`` then ``petalflow predict`` with this checkout's code and
with another checkout's (an earlier commit), alternating, so both see the same spell of a noisy
machine. Each run is cold (fresh PETALFLOW_HOME and MLflow store, the archive over local HTTP),
measured like ``run_bench.py`` (wall time, peak RSS of the process tree), with the train run's
phase table, test accuracy and the ``--timing`` line of predict (first prediction, images/s
after it).

    git worktree add ../petalflow-old <commit>
    .venv/bin/python bench/ab_bench.py --old ../petalflow-old --archive flower_photos_1500.tgz \
        --backbone mobilenet_v2_035_224_feature_vector --repeats 2 --json ab.json

``--retrain`` adds a third command to each side: ``petalflow train --learning-rate 0.002`` in
the same PETALFLOW_HOME (a retraining on unchanged data: its features come from the cache).

Both sides run in this environment (.venv); the old side's ``petalflow`` package is that
checkout's ``petalflow/``, ``tasks/`` and ``flows/``, in the command's process and in those it
starts (``old_side``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from run_bench import BIN, Server, measure

# Runs the petalflow CLI with the ``petalflow`` package taken from another checkout.
OLD_LAUNCHER = """\
import sys
import petalflow
petalflow.__path__[:] = [sys.argv.pop(1)]
from petalflow.flows import cli
assert cli.__file__.startswith(petalflow.__path__[0]), cli.__file__
sys.exit(cli.main())
"""


def old_package(checkout: Path, into: Path) -> Path:
    """A ``petalflow`` folder whose ``tasks``/``flows`` are ``checkout``'s (as pyproject maps)."""
    pkg = into / "petalflow"
    pkg.mkdir(parents=True)
    for item in (checkout / "petalflow").glob("*.py"):
        (pkg / item.name).symlink_to(item.resolve())
    for name in ("tasks", "flows"):
        (pkg / name).symlink_to((checkout / name).resolve())
    return pkg


def old_side(checkout: Path, into: Path) -> tuple[list, dict]:
    """The command line and environment that run ``checkout``'s petalflow: in the command's
    process (``OLD_LAUNCHER``) and in those it starts (Prefect's temporary server, ``python -m
    petalflow.temporary_server``: a ``sitecustomize`` on PYTHONPATH points the package there;
    before the twenty-seventh session the old side's server ran this checkout's code)."""
    pkg = old_package(checkout, into)
    launcher = into / "old_cli.py"
    launcher.write_text(OLD_LAUNCHER)
    site = into / "old-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import petalflow\npetalflow.__path__[:] = [{str(pkg)!r}]\n")
    return [str(BIN / "python"), str(launcher), str(pkg)], {"PYTHONPATH": str(site)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path, help="the other checkout")
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--backbone", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--retrain", action="store_true",
                    help="after predict, train again in the same PETALFLOW_HOME with another "
                         "learning rate (a retraining on unchanged data: features cached)")
    args = ap.parse_args()

    archive = args.archive.resolve()
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ab-bench-") as tmp:
        old_cmd, old_env = old_side(args.old.resolve(), Path(tmp) / "old")
        commands = {"old": old_cmd, "new": [str(BIN / "petalflow")]}
        server = Server(archive.parent)
        url = f"http://127.0.0.1:{server.port}/{archive.name}"
        try:
            for repeat in range(args.repeats):
                for code, cmd in commands.items():
                    work = Path(tempfile.mkdtemp(prefix=f"{code}-", dir=tmp))
                    env = {**base_env, "PETALFLOW_HOME": str(work / "home"),
                           **(old_env if code == "old" else {})}
                    try:
                        row = _pair(cmd, url, sha, args.backbone.resolve(), work, env,
                                    args.retrain)
                    except SystemExit as exc:  # run_bench.measure: a failed command is a row
                        said = str(exc).splitlines()  # the command, then its log's tail
                        row = {"failed": said[0][:500], "log_tail": "\n".join(said[1:])[-2000:]}
                    row = {"code": code, "repeat": repeat, **row}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(work)
        finally:
            server.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))


def _pair(cmd: list, url: str, sha: str, backbone: Path, work: Path, env: dict,
          retrain: bool = False) -> dict:
    """``petalflow train`` then ``petalflow predict`` on the training's photos, measured; with
    ``retrain``, then ``petalflow train --learning-rate 0.002`` in the same home."""
    train = measure(cmd + ["train", "--data-url", url, "--data-sha256", sha,
                           "--backbone", str(backbone),
                           "--summary-json", str(work / "summary.json")],
                    work, env, work / "train.log")
    summary = json.loads((work / "summary.json").read_text())
    dataset = next((work / "home" / "manifests").rglob("dataset.json"))
    photos = json.loads(dataset.read_text())["data_root"]
    predict = measure(cmd + ["predict", "--model", "models:/petalflow-classifier/1",
                             "--input", photos, "--output", str(work / "p.csv"), "--timing"],
                      work, env, work / "predict.log")
    log = (work / "predict.log").read_text()
    first = re.search(r"first prediction written ([\d.]+) s", log)
    after = re.search(r"timing: first prediction.*\(([\d.]+) images/s", log)
    row = {"train": train, "predict": predict,
           "first_prediction_s": float(first[1]) if first else None,
           "images_per_s_after_first": float(after[1]) if after else None,
           "test_accuracy": summary["test_metrics"]["test_accuracy"],
           "timings": summary["timings"], "edge": summary.get("edge")}
    if retrain:
        again = measure(cmd + ["train", "--data-url", url, "--data-sha256", sha,
                               "--backbone", str(backbone), "--learning-rate", "0.002",
                               "--summary-json", str(work / "retrain.json")],
                        work, env, work / "retrain.log")
        summary = json.loads((work / "retrain.json").read_text())
        row["retrain"] = {**again, "test_accuracy": summary["test_metrics"]["test_accuracy"],
                          "timings": summary["timings"],
                          "features": summary["training"]["features"]}
    return row


if __name__ == "__main__":
    main()
