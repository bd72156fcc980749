"""Per-phase wall time of a run, so every overhead has a number (MLflow metrics ``time_<phase>_s``
and the summary's ``timings``).

Phases: start-up (process start to flow start, when the ``petalflow`` command started the run),
backbone (fetch + load), download, scan (extract + scan/split), queued (waiting while another run
trained the same model; only when it did), tracking (MLflow: the store opened,
and created with its schema on first use, unless the ``petalflow`` command did that during its
start-up; the champion's check; the run started), training
hand-off (starting the training step: a process on the gpu pool when deployed), features,
epochs, export, edge export (TFLite conversion), evaluation (the new model, its edge models and
the champion), registration, and the run's total.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Optional

STARTED_ENV = "PETALFLOW_STARTED_AT"  # set by the CLI at process start (epoch seconds)
PHASES = ("start-up", "backbone", "download", "scan", "queued", "tracking", "training hand-off",
          "features", "epochs", "export", "edge export", "evaluation", "registration")


def process_started_at() -> float:
    """When this process started, in epoch seconds (Linux: from ``/proc``, to the kernel's
    clock tick; elsewhere: now). The ``petalflow`` command counts its start-up phase and its
    first prediction from here: the interpreter's start and the CLI's own imports (~0.15 s)
    come before its ``main`` runs."""
    try:
        with open("/proc/self/stat", "rb") as fh:  # field 22, starttime: ticks after boot
            ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


class PhaseTimer:
    """Accumulates wall seconds per phase: ``with timer.phase("download"): ...``."""

    def __init__(self) -> None:
        self.started = time.time()
        self.seconds: dict[str, float] = {}
        cli_start = os.environ.get(STARTED_ENV)
        if cli_start:
            self.seconds["start-up"] = max(0.0, self.started - float(cli_start))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def split_training(self, training_seconds: float, inner: Optional[dict]) -> None:
        """Break the training step's wall time into backbone load, features, epochs (head and
        fine-tuning) and export from its own record (``train.json`` timings); what is left is
        the training hand-off: starting the training run's process when it is a deployment on
        the gpu pool (imports included), subflow bookkeeping, metrics and checkpoints."""
        inner = inner or {}
        parts = {
            "backbone": inner.get("load_backbone", 0.0),
            "features": inner.get("val_features", 0.0) + inner.get("train_features", 0.0),
            "epochs": inner.get("train_head", 0.0) + inner.get("fine_tune", 0.0),
            "export": inner.get("export", 0.0),
            "edge export": inner.get("edge_export", 0.0),
        }
        for name, seconds in parts.items():
            self.add(name, seconds)
        self.add("training hand-off", max(0.0, training_seconds - sum(parts.values())))

    def table(self) -> dict:
        """{phase: seconds} in pipeline order (phases that did not run are left out), plus
        the total from flow start."""
        out = {p: round(self.seconds[p], 2) for p in PHASES if p in self.seconds}
        out["total"] = round(time.time() - self.started + self.seconds.get("start-up", 0.0), 2)
        return out


def markdown(timings: dict) -> str:
    rows = "\n".join(f"| {phase} | {seconds:.2f} |" for phase, seconds in timings.items())
    return "| phase | seconds |\n|---|---|\n" + rows
