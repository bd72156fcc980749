"""When each part of `petalflow predict`'s start-up begins and ends, counted from the process's
start: the big imports (pandas, Prefect, TensorFlow, MLflow, MLflow's SQL store), the model's
preload and load, and the run's first use of the model, each with the thread that ran it.

It runs the console script's ``main`` in this process with an import hook that timestamps the
watched modules and wraps the watched functions, then prints one ``TRACE <s> [thread] what``
line per event on stderr. Give it the arguments of `petalflow predict`:

    .venv/bin/python bench/predict_timeline.py predict --model models:/petalflow-classifier/1 \
        --input flower_photos/daisy --output p.csv --timing
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import threading
import time

from petalflow.tasks.timing import process_started_at  # a light module: no big import

T0 = process_started_at()
MODULES = {"pandas", "prefect", "prefect.flow_engine", "tensorflow", "mlflow", "mlflow.pyfunc",
           "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy",
           "petalflow.flows.predict_flow", "petalflow.tasks.predict", "petalflow.tasks.serving"}
FUNCTIONS = {
    "petalflow.tasks.predict": ["preload_model", "load_model", "_load_model", "_load_checked",
                                "predict_files"],
    "petalflow.tasks.serving": ["import_tensorflow_without_keras"],
    "mlflow.pyfunc": ["load_model"],
}


def mark(what: str) -> None:
    print(f"TRACE {time.time() - T0:6.2f} [{threading.current_thread().name}] {what}",
          file=sys.__stderr__, flush=True)


def wrap(module, name: str) -> None:
    fn = getattr(module, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        mark(f"> {module.__name__}.{name}")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"< {module.__name__}.{name}")

    setattr(module, name, timed)


class Timestamps(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give a watched module."""

    def find_spec(self, name, path, target=None):
        if name not in MODULES and name not in FUNCTIONS:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def timed_exec(module):
            mark(f"import {name} start")
            try:
                exec_module(module)
            finally:
                mark(f"import {name} end")
                for fn in FUNCTIONS.get(name, []):
                    wrap(module, fn)

        spec.loader.exec_module = timed_exec
        return spec


def main() -> int:
    sys.meta_path.insert(0, Timestamps())
    from petalflow.flows.cli import main as cli_main

    sys.argv = ["petalflow", *sys.argv[1:]]
    mark("main")
    try:
        return cli_main()
    finally:
        mark("end")


if __name__ == "__main__":
    sys.exit(main())
