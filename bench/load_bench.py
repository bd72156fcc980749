"""Load figures for the deployed stack (RELIABILITY.md), SQLite and PostgreSQL side by side.

For each backend it starts a fresh stack (`petalflow stack up` with 2 `cpu` workers, 1 `gpu`
worker, the default worker limits), trains and registers a model on the archive (the `train`
deployment, started through the REST API), then:

1. burst: ``--runs`` `batch-predict` runs (each on its own small folder of the archive's photos)
   created at once through the REST endpoint the UI's Run button uses, one thread per run, each
   trying up to 5 times 1 s apart on a 5xx; counts runs created, refused (every try answered
   5xx), completed, failed, crashed and lost (created but never final), the client-visible
   5xx answers, the time from the first request until every run was final, the most runs
   Running at once and the machine's lowest available memory;
2. serve: ``mlflow models serve`` of the champion, ``--clients`` threads posting one base64
   photo per request for ``--seconds``: requests/s, p50/p99 latency, errors, the server's RSS;
3. kill: ``--kill-runs`` `batch-predict` runs on large folders; once one is Running, one `cpu`
   worker and the runs it started are SIGKILLed; the runs it held must end Crashed (heartbeats
   stop, or a run left Pending: the stack's automations, here with 45 s and 60 s), and a
   rerun of each must complete.

    .venv/bin/python bench/load_bench.py --archive ARCHIVE.tgz --backbone SAVEDMODEL_DIR \
        [--backends sqlite postgres] [--runs 40] [--clients 16] [--seconds 60] [--json OUT]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from petalflow.stack import (  # noqa: E402
    Stack, create_zombie_automation, deploy, descendant_pids, down, free_port, start_database,
    start_mlflow_server, start_prefect_server, start_workers,
)
from tests.helpers import prefect_request  # noqa: E402

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def mem_available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mib(pid: int) -> float:
    total = 0
    for p in descendant_pids(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def deployment_id(st: Stack, flow: str, name: str) -> str:
    return prefect_request(st, "GET", f"/deployments/name/{flow}/{name}").json()["id"]


def create_run(st: Stack, dep: str, parameters: dict) -> tuple[int, str]:
    """One POST as the UI sends it, no retry: (status, flow run id or '')."""
    resp = httpx.post(f"{st.prefect_api}/deployments/{dep}/create_flow_run", timeout=60,
                      json={"parameters": parameters, "state": {"type": "SCHEDULED"}})
    return resp.status_code, resp.json().get("id", "") if resp.status_code == 201 else ""


def create_run_retrying(st: Stack, dep: str, parameters: dict) -> str:
    """A run created the way Prefect's client does it (retrying 429/502/503 with backoff)."""
    resp = prefect_request(st, "POST", f"/deployments/{dep}/create_flow_run", attempts=10,
                           json={"parameters": parameters, "state": {"type": "SCHEDULED"}})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def read_runs(st: Stack, ids: list[str]) -> list[dict]:
    return prefect_request(st, "POST", "/flow_runs/filter",
                           json={"flow_runs": {"id": {"any_": ids}}, "limit": 200}).json()


def wait_final(st: Stack, ids: list[str], timeout_s: float, sample=None) -> list[dict]:
    deadline = time.time() + timeout_s
    while True:
        runs = read_runs(st, ids)
        if sample:
            sample(runs)
        if all(r["state"]["type"] in FINAL for r in runs) and len(runs) == len(ids):
            return runs
        if time.time() > deadline:
            return runs
        time.sleep(2)


def photo_folders(archive: Path, work: Path, count: int, per_folder: int) -> list[Path]:
    """``count`` folders of ``per_folder`` photos each, cycling through the archive's photos."""
    src = work / "photos"
    if not src.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
    photos = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    folders = []
    for i in range(count):
        folder = work / f"in-{per_folder}-{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_folder):
            photo = photos[(i * per_folder + j) % len(photos)]
            target = folder / f"{j:04d}{photo.suffix}"
            if not target.exists():
                target.symlink_to(photo)
        folders.append(folder)
    return folders


def start_stack(database: str, work: Path) -> Stack:
    st = Stack(stack_dir=work / "stack", prefect_port=free_port(), mlflow_port=free_port(),
               mlflow_dir=work / "mlflow", petalflow_home=work / "home", database=database,
               workers={"cpu": 2, "gpu": 1})
    os.environ["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    start_database(st)
    start_prefect_server(st)
    start_mlflow_server(st)
    start_workers(st)
    create_zombie_automation(st, within_s=45, pending_within_s=60)  # shorter than the defaults
    deploy(st)
    return st


def train(st: Stack, args, url: str) -> None:
    dep = deployment_id(st, "train-and-register", "train")
    run = create_run_retrying(st, dep, {"params": {
        "data_url": url, "backbone": args.backbone, "epochs": 2, "edge_export": False,
        "min_accuracy": 0.0}})
    [final] = wait_final(st, [run], 900)
    if final["state"]["type"] != "COMPLETED":
        raise SystemExit(f"training run ended {final['state']}")


def burst(st: Stack, folders: list[Path], work: Path) -> dict:
    dep = deployment_id(st, "batch-predict", "batch-predict")
    results: list = [None] * len(folders)
    barrier = threading.Barrier(len(folders))

    def fire(i: int) -> None:
        params = {"params": {"input": [str(folders[i])],
                             "output": str(work / f"burst-{i:03d}.csv")}}
        barrier.wait()
        statuses = []
        for _ in range(5):  # what a script would do: try again after a 5xx
            try:
                status, run = create_run(st, dep, params)
            except httpx.HTTPError as exc:
                status, run = f"error {type(exc).__name__}", ""
            statuses.append(status)
            if run:
                break
            time.sleep(1)
        results[i] = (statuses, run)

    started = time.time()
    threads = [threading.Thread(target=fire, args=(i,)) for i in range(len(folders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [run for _statuses, run in results if run]
    five_xx = sum(1 for statuses, _ in results for s in statuses
                  if isinstance(s, int) and s >= 500)
    low_mem, most_running = [mem_available_mib()], [0]

    def sample(runs):
        low_mem[0] = min(low_mem[0], mem_available_mib())
        most_running[0] = max(most_running[0],
                              sum(r["state"]["type"] == "RUNNING" for r in runs))

    runs = wait_final(st, created, 1800, sample)
    drained = time.time() - started
    kinds = [r["state"]["type"] for r in runs]
    outputs = sum((work / f"burst-{i:03d}.csv").exists() for i in range(len(folders)))
    return {
        "runs": len(folders), "created": len(created),
        "refused": len(folders) - len(created),  # every try answered 5xx: the client was told
        "completed": kinds.count("COMPLETED"),
        "failed": kinds.count("FAILED"), "crashed": kinds.count("CRASHED"),
        "lost": len(created) - sum(k in FINAL for k in kinds),  # accepted, never finished
        "client_5xx": five_xx, "drain_s": round(drained, 1), "outputs_written": outputs,
        "most_running": most_running[0], "min_mem_available_mib": round(low_mem[0]),
    }


def serve(st: Stack, args, photos: list[Path], work: Path) -> dict:
    port = free_port()
    env = {**st.env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([st.bin("mlflow"), "models", "serve", "-m",
                             "models:/petalflow-classifier@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[
            base64.b64encode(p.read_bytes()).decode()]]}}) for p in photos[:64]]
        latencies: list[float] = []
        errors = [0]
        stop = time.time() + args.seconds
        peak_rss = [tree_rss_mib(proc.pid)]

        def client(k: int) -> None:
            with httpx.Client(timeout=60) as http:
                i = k
                while time.time() < stop:
                    t0 = time.perf_counter()
                    try:
                        resp = http.post(f"{url}/invocations", content=bodies[i % len(bodies)],
                                         headers={"Content-Type": "application/json"})
                        ok = resp.status_code == 200 and resp.json()["predictions"][0]["label"]
                    except (httpx.HTTPError, ValueError, KeyError):
                        ok = False
                    latencies.append(time.perf_counter() - t0)
                    errors[0] += 0 if ok else 1
                    i += args.clients

        def watch() -> None:
            while time.time() < stop:
                peak_rss[0] = max(peak_rss[0], tree_rss_mib(proc.pid))
                time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        threads.append(threading.Thread(target=watch))
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        qs = statistics.quantiles(latencies, n=100)
        return {"clients": args.clients, "seconds": round(elapsed, 1),
                "requests": len(latencies), "requests_per_s": round(len(latencies) / elapsed, 1),
                "p50_ms": round(qs[49] * 1000, 1), "p99_ms": round(qs[98] * 1000, 1),
                "errors": errors[0], "server_peak_rss_mib": round(peak_rss[0])}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def kill_worker(st: Stack, args, folders: list[Path], work: Path) -> dict:
    dep = deployment_id(st, "batch-predict", "batch-predict")
    ids = []
    for i, folder in enumerate(folders):
        ids.append(create_run_retrying(st, dep, {"params": {
            "input": [str(folder)], "output": str(work / f"kill-{i}.csv")}}))
    pidfile = st.pids / "worker-cpu.pid"
    victim = int(pidfile.read_text())
    deadline = time.time() + 300
    running: list = []
    while time.time() < deadline and len(running) < min(len(ids), 3):
        running = [r["id"] for r in read_runs(st, ids) if r["state"]["type"] == "RUNNING"]
        time.sleep(0.5)
    if not running:
        return {"error": "no run reached Running"}
    killed_at = time.time()
    for pid in descendant_pids(victim):  # the worker and the flow runs it started, at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The runs Running at that moment: the killed worker's end Crashed (no more heartbeats),
    # the other worker's complete.
    finals = wait_final(st, running, 600)
    crashed = [r for r in finals if r["state"]["type"] == "CRASHED"]
    crashed_after = time.time() - killed_at
    # The rest: the other worker's, and any the killed worker had submitted (Pending) but not
    # started, which the Pending automation crashes.
    others = wait_final(st, [i for i in ids if i not in running], 900)
    crashed += [r for r in others if r["state"]["type"] == "CRASHED"]
    pidfile.unlink(missing_ok=True)
    start_workers(st)  # the stack brings the worker back
    reruns = []
    for run in crashed:
        reruns.append(create_run_retrying(st, dep, {"params": run["parameters"]["params"]}))
    rerun_finals = wait_final(st, reruns, 900)
    return {
        "runs": len(ids), "running_at_kill": len(running),
        "running_at_kill_final": [r["state"]["type"] for r in finals],
        "crash_messages": sorted({r["state"]["message"] for r in crashed}),
        "seconds_until_all_final": round(crashed_after, 1),
        "other_runs_final": [r["state"]["type"] for r in others],
        "reruns_final": [r["state"]["type"] for r in rerun_finals],
    }


def run_backend(database: str, args, url: str, root: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"petalflow-load-{database}-", dir=root))
    work.chmod(0o755)
    st = start_stack(database, work)
    try:
        t0 = time.time()
        train(st, args, url)
        out = {"database": database, "train_s": round(time.time() - t0, 1)}
        folders = photo_folders(Path(args.archive), work, args.runs, args.photos_per_run)
        out["burst"] = burst(st, folders, work)
        print(json.dumps(out, indent=2), flush=True)
        photos = sorted(p for p in (work / "photos").rglob("*.jpg"))
        out["serve"] = serve(st, args, photos, work)
        print(json.dumps(out["serve"], indent=2), flush=True)
        big = photo_folders(Path(args.archive), work, args.kill_runs, 400)
        out["kill"] = kill_worker(st, args, big, work)
        print(json.dumps(out["kill"], indent=2), flush=True)
        return out
    finally:
        down(st)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, help="folder-per-class .tgz (photos)")
    ap.add_argument("--backbone", required=True, help="TF Hub feature-vector SavedModel folder")
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"],
                    choices=["sqlite", "postgres"])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--photos-per-run", type=int, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--kill-runs", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folders")
    args = ap.parse_args()
    args.backbone = str(Path(args.backbone).resolve())
    archive = Path(args.archive).resolve()
    root = Path(tempfile.gettempdir())
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               str(port := free_port())], cwd=archive.parent,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    results = {"command": " ".join(sys.argv), "machine": {
        "cpus": os.cpu_count(), "mem_total_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version()}, "backends": []}
    try:
        for database in args.backends:
            results["backends"].append(run_backend(
                database, args, f"http://127.0.0.1:{port}/{archive.name}", root))
    finally:
        server.terminate()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
