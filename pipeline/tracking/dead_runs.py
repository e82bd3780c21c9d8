"""The runs a training left RUNNING when its process died, found by the lock it held and marked KILLED."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import mlflow

from pipeline.tracking.store import store_calls

# The lock a run's training held, as host:absolute path (lock_tag): a run still RUNNING under the lock
# that a new training of its net holds was left by a process that died (close_dead_runs).
LOCK_TAG = "training_lock"
# The run's description in MLflow's UI.
NOTE_TAG = "mlflow.note.content"


def lock_tag(lock: Path) -> str:
    """LOCK_TAG's value for a training that holds `lock`: one lock file on one machine."""
    return f"{socket.gethostname()}:{Path(lock).resolve()}"


def close_dead_runs(net_name: str, lock: Path, live: mlflow.entities.RunInfo) -> list[str]:
    """Mark KILLED, with a note saying why, the other runs of `net_name` still RUNNING that a training
    holding `lock` started; returns their ids. The caller, whose run is `live`, holds `lock`, so their
    processes no longer do: they died (kill -9, a lost machine) without ending their runs, and no
    checkpoint continues them (the live run would be theirs). The UI then shows one live run per net.

    Runs of other nets, and those of trainings under another lock (another project, a queued
    experiment's copy, another machine), whose processes may be alive, are left as they are.
    """
    client = mlflow.MlflowClient()
    with store_calls(f"the dead runs of {net_name} were not marked killed"):
        running = client.search_runs([live.experiment_id],
                                     filter_string=f"tags.net = '{net_name}' AND attributes.status = 'RUNNING'")
        dead = [run for run in running
                if run.data.tags.get(LOCK_TAG) == lock_tag(lock) and run.info.run_id != live.run_id]
        for run in dead:
            client.set_tag(run.info.run_id, NOTE_TAG, (
                f"KILLED: the process of this training of {net_name} ended without ending its run (a kill -9 or a "
                f"lost machine), and no checkpoint continued it. Marked so on {time.strftime('%Y-%m-%d %H:%M:%S')} "
                f"by the next training of {net_name}, run {live.run_id}, on taking the lock {lock} this one held."))
            client.set_terminated(run.info.run_id, "KILLED", end_time=_last_logged(client, run))
    return [run.info.run_id for run in dead]


def _last_logged(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> int:
    """When a dead run last logged a figure (its start if none): its end, so that the UI shows how long
    it lived rather than until it was found dead."""
    return max([run.info.start_time, *(point.timestamp for key in run.data.metrics
                                       for point in client.get_metric_history(run.info.run_id, key))])
