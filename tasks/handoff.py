"""The training step handed to a deployment (the train parameter ``training_deployment``):
which deployment takes it, checked before any work, and waiting for its runs, saying why one
does not start.

A run of a deployment starts only when a worker of its work pool takes it. Prefect leaves a run
no worker takes ``Late`` for ever, and the run that handed its training over waited with it,
saying nothing, holding its model's training turn and a worker slot of its own pool: a gpu
worker that was stopped (its machine down, never started) left scheduled retraining hanging,
one more run each week. Here the waiting run says so as soon as the pool has no worker online,
and after ``NO_WORKER_LIMIT_S`` without one it cancels the training run and fails saying why.
A training deployment on the run's own pool is not handed to at all: the run is already on
such a worker, and its training could wait for a slot the run itself holds (two runs on a
pool of two slots, each waiting for the other's). A training run that has been running longer
than the run's ``max_training_hours`` is cancelled (its worker stops its process, hung or
not), and the run fails saying so (``TrainingTimeLimit``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

from prefect import task

from petalflow.tasks.common import log, wait_words
from petalflow.tasks.errors import TrainingHandoffError, TrainingTimeLimit
from petalflow.tasks.params import TRAINING_FLOW

# How long a handed-over training may wait while its pool has no worker online before the
# run cancels it and fails (a worker restarting, a GPU machine rebooting, fit well inside).
NO_WORKER_LIMIT_S = 15 * 60
# A training run waiting this long for a busy pool's worker is said to wait (once).
BUSY_NOTE_S = 60.0
# How long a training run cancelled for its time limit is given to stop (its worker kills its
# process) before it is marked cancelled all the same, so that the run waiting for it ends (a
# worker that is gone or hung itself never reports it).
CANCEL_GRACE_S = 5 * 60
# The state message of a training run stopped for running longer than its limit begins so.
OVER_TIME = "stopped: it ran longer than max_training_hours"
# How often a handed-over training run looks whether the run that handed it over still waits
# for it (``ends_with_its_parent``).
PARENT_POLL_S = 10.0
# A handed-over training run stops itself this long after its max_training_hours: later than
# the run waiting for it stops it (at max_training_hours, then CANCEL_GRACE_S for its worker),
# so it acts only when that run is gone without its end being known (its machine lost).
BACKSTOP_S = CANCEL_GRACE_S + 5 * 60
# The state message of a training run that stopped because the run that handed it over ended.
PARENT_ENDED = "cancelled: the run that handed this training over ended before it"


def hours_said(hours: float) -> str:
    """``24`` -> ``24 hours``; ``0.5`` -> ``0.5 hours = 30 minutes``."""
    said = f"{hours:g} hour{'' if hours == 1 else 's'}"
    return said if hours >= 1 else f"{said} = {wait_words(hours * 3600)}"


def over_time_said(hours: float) -> str:
    """The state message of a training run stopped for running longer than ``hours``."""
    return (f"{OVER_TIME} ({hours_said(hours)}) allows: hung (a stalled GPU driver or "
            "network disk), or more data than the limit was set for; nothing it trained is "
            "registered")


def time_limit_error(hours: float, what: str, whole_run: bool = True) -> TrainingTimeLimit:
    """The error when a training step (``what``: "the training step", "the training step,
    handed to train-model/train-gpu (run X),") ran longer than ``hours``: the run's
    (``whole_run``), or one sweep candidate's, whose run goes on with the others."""
    said = f"{what} ran longer than max_training_hours ({hours_said(hours)}) allows and was stopped"
    if not whole_run:
        return TrainingTimeLimit(said)
    return TrainingTimeLimit(
        f"{said}; nothing was registered: the champion is as it was, and the runs of this "
        "model waiting for its turn go on. Data that takes longer to train needs a larger "
        "max_training_hours (--max-training-hours); the data prepared and the features "
        "computed so far are kept for the next run")


def ended_training_error(run, target: str, max_hours: float,
                         whole_run: bool = True) -> Exception:
    """Why a handed-over training run that did not complete failed the run (``whole_run``)
    or its sweep candidate: ``TrainingTimeLimit`` for one stopped for running longer than
    ``max_hours``, else a RuntimeError quoting its state."""
    message = run.state.message if run.state is not None else None
    if _stopped_over_time(run.id):
        return time_limit_error(max_hours, f"the training step, handed to {target} (run "
                                           f"{run.name}),", whole_run)
    return RuntimeError(f"training run {run.name} ({target}) ended {run.state_name}"
                        + (f": {message}" if message else ""))


def start_worker_advice(pool: str) -> str:
    """What makes a run of ``pool`` start, or the run train without it."""
    return (f"start a worker of pool {pool!r} where training should run (`prefect worker start "
            f"--pool {pool} --limit 1`; `petalflow stack up` starts one), or set the run's "
            "training_deployment to local to train in the run's own process")


def _pool_said(status, pool: str) -> str:
    """A work pool's status, as a reason no run of it starts."""
    value = getattr(status, "value", status)
    if value == "PAUSED":
        return f"the pool is paused (`prefect work-pool resume {pool}` resumes it)"
    return "no worker of it is online"


def training_handoff(target: Optional[str], flow_run_id=None) -> Optional[dict]:
    """The deployment that trains (``{"name": "train-model/...", "pool": ...}``), or None to
    train in this process: ``target`` (``params.training_target``) read from the Prefect server
    before any work. A deployment the server does not have fails the run at once, naming the
    ones it has; one on the work pool of this run (``flow_run_id``) trains here instead."""
    if target is None:
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id) if flow_run_id else None
        try:
            deployment = client.read_deployment_by_name(target)
        except ObjectNotFound:
            deployed = run is not None and run.deployment_id is not None
            raise TrainingHandoffError(_missing(client, target, deployed)) from None
    pool = deployment.work_pool_name
    if run is not None and run.work_pool_name is not None and pool == run.work_pool_name:
        log("training_deployment %s is on this run's own work pool (%r): the training step runs "
            "in this run's process (a run of it would wait for a slot of that pool, which this "
            "run may hold itself)", target, pool)
        return None
    return {"name": target, "pool": pool}


def _missing(client, target: str, deployed: bool) -> str:
    """Why ``target`` cannot take the training step: not on this server; what is (``deployed``:
    whether the run asking was started from a deployment)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL

    there = client.read_deployments(flow_filter=FlowFilter(
        name=FlowFilterName(any_=[TRAINING_FLOW])))
    listed = ", ".join(f"{TRAINING_FLOW}/{d.name} (pool {d.work_pool_name})"
                       for d in sorted(there, key=lambda d: d.name)) or "none"
    where = f"the Prefect server this run reports to ({PREFECT_API_URL.value()})"
    if not deployed:
        where += (" (a run not started from a deployment, such as `petalflow train` without "
                  "PREFECT_API_URL, reports to a temporary server of its own, which has no "
                  "deployments)")
    return (f"training_deployment {target}: no such deployment on {where}; its deployments of "
            f"the {TRAINING_FLOW} flow: {listed}. Deploy it (`prefect deploy --prefect-file "
            "deployment.yaml --name train-gpu` deploys train-model/train-gpu), name one of those, "
            "or set training_deployment to local to train in the run's own process; nothing "
            "was downloaded or trained")


def _stopped_over_time(flow_run_id) -> bool:
    """Whether the run was cancelled for its time limit: one of its states carries
    ``over_time_said``'s message (the one it ends in is its worker's: "Flow run was cancelled
    successfully")."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return any((state.message or "").startswith(OVER_TIME)
                   for state in client.read_flow_run_states(flow_run_id))


def wait_for_training_runs(ids: list, handoff: dict, poll_s: float = 2.0,
                           max_hours: Optional[float] = None) -> list:
    """The flow runs ``ids`` (in that order) once every one of them is in a final state.

    One that has been running for ``max_hours`` (counted from when this wait first sees it
    running) is set Cancelling with ``over_time_said`` as its message (its worker stops its
    process); one its worker has not stopped ``CANCEL_GRACE_S`` after that is set Cancelled.

    While some wait for a worker (scheduled, not taken) and the deployment's pool has none
    online, the log says so at once; after ``NO_WORKER_LIMIT_S`` of that they are cancelled
    (their state message says why). If none of ``ids`` had started, this raises
    ``TrainingHandoffError``; otherwise (a sweep's candidates) the others are waited for and
    the cancelled ones end as they are. A run that waits for a busy pool is said once, after
    ``BUSY_NOTE_S``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType, WorkPoolStatus

    no_worker_limit_s = NO_WORKER_LIMIT_S
    only = FlowRunFilter(id=FlowRunFilterId(any_=list(ids)))
    pool, name = handoff["pool"], handoff["name"]
    unmanned_since: Optional[float] = None
    waiting_since: dict = {}
    running_since: dict = {}
    stopped_at: dict = {}
    told_busy: set = set()
    started = time.monotonic()
    with get_client(sync_client=True) as client, _ended_with_this_run(client, ids):
        while True:
            runs = {run.id: run for run in client.read_flow_runs(flow_run_filter=only)}
            if len(runs) == len(ids) and all(
                    run.state is not None and run.state.is_final() for run in runs.values()):
                return [runs[i] for i in ids]
            if max_hours is not None:
                _stop_over_time(client, runs.values(), max_hours, running_since, stopped_at)
            waiting = [run for run in runs.values()
                       if run.state is not None and run.state.type == StateType.SCHEDULED]
            status = client.read_work_pool(pool).status if waiting and pool else None
            now = time.monotonic()
            if status is None or status == WorkPoolStatus.READY:
                if unmanned_since is not None:
                    log("a worker of pool %r is online now; the training waits no longer for "
                        "one", pool)
                unmanned_since = None
                for run in waiting if pool else []:  # a served deployment has no pool
                    since = waiting_since.setdefault(run.id, now)
                    if now - since >= BUSY_NOTE_S and run.id not in told_busy:
                        told_busy.add(run.id)
                        log("training run %s (%s) has waited %.0f s for a free worker of pool "
                            "%r: its workers are busy with other runs (one training each)",
                            run.name, name, now - since, pool)
            elif unmanned_since is None:
                unmanned_since = now
                log("training run %s (%s) waits for a worker of pool %r, and %s: %s. Without "
                    "one within %s this run cancels it and fails (the data prepared "
                    "so far is kept for the next run)",
                    ", ".join(run.name for run in waiting), name, pool,
                    _pool_said(status, pool), start_worker_advice(pool),
                    wait_words(no_worker_limit_s), level=30)
            elif now - unmanned_since >= no_worker_limit_s:
                why = (f"no worker of pool {pool!r} took it in "
                       f"{wait_words(now - unmanned_since)} ({_pool_said(status, pool)}); "
                       f"nothing was trained: {start_worker_advice(pool)}")
                _cancel(client, waiting, why)
                if len(waiting) == len(ids):
                    names = ", ".join(run.name for run in waiting)
                    raise TrainingHandoffError(
                        f"the training step, handed to {name} (run {names}), never started: "
                        f"{why}; it was cancelled after {wait_words(now - started)}, and "
                        "nothing was registered: the champion is as it was")
                unmanned_since = None
            time.sleep(poll_s)


def _stop_over_time(client, runs, max_hours: float, running_since: dict,
                    stopped_at: dict) -> None:
    """``wait_for_training_runs``' time limit, one look at ``runs``: those running for
    ``max_hours`` are set Cancelling; those still not ended ``CANCEL_GRACE_S`` after that,
    Cancelled."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Cancelling

    now = time.monotonic()
    for run in runs:
        if run.state is None or run.state.is_final():
            continue
        if run.id in stopped_at:
            if now - stopped_at[run.id] >= CANCEL_GRACE_S:
                client.set_flow_run_state(run.id, Cancelled(message=(
                    f"{over_time_said(max_hours)} (its worker had not stopped it "
                    f"{wait_words(CANCEL_GRACE_S)} after it was cancelled)")), force=True)
                stopped_at[run.id] = float("inf")
            continue
        if run.state.type != StateType.RUNNING:
            continue
        since = running_since.setdefault(run.id, now)
        if now - since >= max_hours * 3600:
            log("training run %s has run for %s, longer than max_training_hours (%s) allows: "
                "it is cancelled (its worker stops it)", run.name, wait_words(now - since),
                hours_said(max_hours), level=30)
            client.set_flow_run_state(run.id, Cancelling(message=over_time_said(max_hours)))
            stopped_at[run.id] = now


@contextmanager
def ends_with_its_parent(max_hours: float, poll_s: float = PARENT_POLL_S):
    """The body of a handed-over training run (a ``train-model`` run of a deployment, started
    by a train run that waits for it), stopped when nobody waits for it any more.

    The run that handed it over cancels it when it ends itself (``_ended_with_this_run``), but
    a run killed outright (the out-of-memory killer, its machine or worker gone) does nothing:
    Prefect marks it Crashed (its worker, or the missing heartbeats), and cancels the subflow
    runs of a cancelled run only, not of a crashed one. Its training trained on for nobody
    (nothing it makes is registered), holding a gpu worker; hung, for ever. Here a thread looks
    every ``poll_s`` at that run: once it has ended, or once this run has run ``max_hours``
    plus ``BACKSTOP_S`` (that run gone without its end being known), this run sets itself
    Cancelling, saying why, and its worker stops its process, as the UI's Cancel does. Outside
    a deployment run (the training in the run's own process) it does nothing."""
    import threading

    from prefect.context import FlowRunContext
    from prefect.runtime import flow_run

    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    parent_id = flow_run.parent_flow_run_id if run is not None and run.deployment_id else None
    if parent_id is None:
        yield
        return
    from prefect.logging import get_run_logger

    done = threading.Event()
    watcher = threading.Thread(
        target=_watch_parent, name="petalflow-parent-watch", daemon=True,
        args=(run.id, parent_id, max_hours, poll_s, done, get_run_logger()))
    watcher.start()
    try:
        yield
    finally:
        done.set()


def _watch_parent(run_id, parent_id, max_hours: float, poll_s: float, done,
                  logger) -> None:
    """``ends_with_its_parent``'s thread, until ``done`` or this run is cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelling

    deadline = time.monotonic() + max_hours * 3600 + BACKSTOP_S
    with get_client(sync_client=True) as client:
        while not done.wait(poll_s):
            try:
                parent = client.read_flow_run(parent_id)
            except Exception as exc:  # noqa: BLE001 - the server away for a while: look again
                logger.debug("could not read the run that handed this training over: %s", exc)
                continue
            if parent.state is not None and parent.state.is_final():
                said = (f"{PARENT_ENDED} ({parent.name} ended {parent.state.name}"
                        + (f": {parent.state.message}" if parent.state.message else "")
                        + "), so nothing it trains would be registered; it is stopped to "
                        "free its worker")
            elif time.monotonic() >= deadline:
                said = (f"{over_time_said(max_hours)}; the run that handed it over "
                        f"({parent.name}, {parent.state_name}) had not stopped it "
                        f"{wait_words(BACKSTOP_S)} after that")
            else:
                continue
            try:
                result = client.set_flow_run_state(run_id, Cancelling(message=said))
            except Exception as exc:  # noqa: BLE001 - the server away for a while: again
                logger.debug("could not cancel this training run: %s", exc)
                continue
            if result.status == SetStateStatus.ACCEPT:  # else it was ended by then
                logger.warning("%s", said)
            return


# The state message of a training run cancelled because the run that handed it over ended.
ENDED_FIRST = (f"{PARENT_ENDED} (cancelled, interrupted or failed), so nothing it trained "
               "would be registered")


@contextmanager
def _ended_with_this_run(client, ids: list):
    """Training runs ``ids`` end with the run waiting for them: when the wait ends with an
    exception but the training runs' own (cancelled from the UI, a signal, Ctrl-C, an error),
    those not in a final state are cancelled (a running one by its worker, one not taken yet at
    once), not left to train on for nobody, holding a GPU worker."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Cancelling

    try:
        yield
    except TrainingHandoffError:
        raise  # the runs no worker took are cancelled already, the others waited for
    except BaseException:
        for run_id in ids:
            try:
                state = client.read_flow_run(run_id).state
                if state is not None and state.type == StateType.SCHEDULED:
                    client.set_flow_run_state(run_id, Cancelled(message=ENDED_FIRST),
                                              force=True)
                elif state is None or not state.is_final():
                    client.set_flow_run_state(run_id, Cancelling(message=ENDED_FIRST))
            except Exception as exc:  # noqa: BLE001 - the run's own error is what it ends with
                log("could not cancel training run %s: %s", run_id, exc, level=30)
        raise


@task(name="training-handoff")
def training_handoff_task(target: Optional[str], flow_run_id=None) -> Optional[dict]:
    """Thin wrapper; no retries: a deployment that is not there stays so."""
    return training_handoff(target, flow_run_id)


def _cancel(client, runs: list, why: str) -> None:
    """Cancel runs no worker took, with ``why`` as their state message."""
    from prefect.states import Cancelled

    for run in runs:
        client.set_flow_run_state(run.id, Cancelled(message=why), force=True)
