"""watch-data: retrain when the data changes, not only on a clock.

Inputs: the same ``TrainParams`` the triggered training will use (only ``data_url``,
``data_sha256`` and ``model_name`` matter to the check; with ``follow_champion``, as deployed, the
champion's own data URL and settings, and nothing to watch before there is a champion). Steps:
revalidate the source (the conditional request of the train flow's download step; new bytes are
kept for the training) -> compare it with what the champion was trained on -> when it differs (a
folder: and nothing in it changed for ``watch.QUIET_S``, so that a copy in progress is not trained
on), extract it (as the training will: an archive it could not open fails this run instead) and
emit the Prefect event ``petalflow.dataset.changed`` (once per source state), which the ``train``
deployment's trigger in deployment.yaml turns into a training run with these parameters. Output:
the decision, also the final state's message.

Deployed as ``watch-data`` (interval schedule, default 15 min) by ``deployment.yaml``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from petalflow.tasks.common import petalflow_home, redact_url
from petalflow.tasks.download import (
    describe_source_task, download_archive_task, extract_archive_task, source_identity,
)
from petalflow.tasks.params import TrainParams, expected_sha256
from petalflow.tasks.registry import champion_info_task, followed_champion_task
from petalflow.tasks.watch import announce_change_task, check_source_task


@flow(name="watch-data", log_prints=True)
def watch_data(params: TrainParams = TrainParams()):
    home = petalflow_home()
    champion = None
    if params.follow_champion:
        # The champion's own source (and settings, for the training it announces); before
        # there is a champion, the challenger's.
        following = followed_champion_task(params)
        if following is None:
            return _done({**check_source_task(None, None, str(home / "watch")),
                          "data_url": None, "event_id": None})
        params, champion = following
    archive = download_archive_task(params.data_url, str(home / "downloads"),
                                    expected_sha256(params))
    source = describe_source_task(params.data_url, archive)
    if champion is None:
        champion = champion_info_task(params.model_name)
    check = check_source_task(source, champion, str(home / "watch"))
    result = {**check, "data_url": redact_url(params.data_url), "event_id": None}
    if check["changed"] and not check["announced_at"] and not check["settling"]:
        # Extracted as the training's first step extracts it (found in place there): an
        # archive the training could not open (damaged, cut short by an upload in progress,
        # password-protected) fails this run, announced to no training.
        extract_archive_task(archive, str(home / "datasets"), params.max_extract_bytes,
                             source_identity(params.data_url))
        # A watch run beside this one may have announced it meanwhile: then announced_at.
        result.update(announce_change_task(params, source, check["reason"],
                                           str(home / "watch")))
    return _done(result)


def _done(result: dict):
    """The run's end: its decision logged and as the final state's message."""
    from prefect.states import Completed

    if not result["changed"]:
        message = f"unchanged: {result['reason']}"
    elif result["announced_at"]:
        message = (f"changed ({result['reason']}); already announced at {result['announced_at']}, "
                   "not announced again")
    elif result["settling"]:
        message = f"changed ({result['reason']}); not announced yet: {result['settling']}"
    else:
        message = f"changed ({result['reason']}); emitted petalflow.dataset.changed"
    get_run_logger().info(message)
    return Completed(message=message, data=result)
