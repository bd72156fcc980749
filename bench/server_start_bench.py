"""How soon Prefect's temporary server answers: petalflow's launch (``python -m
petalflow.temporary_server``: full collections deferred during its imports, then frozen)
against Prefect's app under uvicorn as launched before (the same app, options and settings,
Python's default collector), alternating, each in a fresh process on a free loopback port.
It reports the seconds from the launch to the first answer of ``/api/health`` and the
server's RSS then.

    .venv/bin/python bench/server_start_bench.py --repeats 5 --json server_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PLAIN = """\
import sys, uvicorn
uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
            port=int(sys.argv[1]), log_level="error", lifespan="on")
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def start(kind: str) -> dict:
    from petalflow.temporary_server import _healthy, free_port

    port = free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = ([sys.executable, "-m", "petalflow.temporary_server", str(port), str(os.getpid())]
           if kind == "petalflow" else [sys.executable, "-c", PLAIN, str(port)])
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env)
    try:
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() - started > 60:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.02)
        ready = time.monotonic() - started
        return {"server": kind, "ready_s": round(ready, 3), "rss_mib": rss_mib(proc.pid)}
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for r in range(args.repeats):
        for kind in (("plain", "petalflow") if r % 2 == 0 else ("petalflow", "plain")):
            rows.append(start(kind))
            print(json.dumps(rows[-1]), flush=True)
    summary = {kind: {"ready_s": [row["ready_s"] for row in rows if row["server"] == kind],
                      "rss_mib": [row["rss_mib"] for row in rows if row["server"] == kind]}
               for kind in ("plain", "petalflow")}
    for kind, figures in summary.items():
        print(f"{kind}: ready {statistics.median(figures['ready_s']):.2f} s median "
              f"({min(figures['ready_s']):.2f}-{max(figures['ready_s']):.2f}), RSS "
              f"{statistics.median(figures['rss_mib']):.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv),
                                         "machine": platform.processor() or platform.machine(),
                                         "cpus": os.cpu_count(), "rows": rows,
                                         "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
