"""The commands behind MLproject's entry points: DVC runs the stages, MLflow only launches them.

MLflow appends every -P parameter that MLproject does not declare as `--key value`, so each
becomes a `dvc exp run -S key=value` override and params.yaml stays the one home of defaults.

Under `mlflow run` (which names its run in MLFLOW_RUN_ID) the project run is then linked to the net
runs whose results models/ holds, including those DVC did not train again.

Usage: python -m pipeline.mlproject {main|train|evaluate} [--<params key> <value> ...]
"""

from __future__ import annotations

import difflib
import os
import signal
import subprocess
import sys

import mlflow
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from pipeline.base.config import Config, flatten, load_config
from pipeline.base.errors import PipelineError, describe
from pipeline.base.params_file import PARAMS_FILE
from pipeline.base.reporting import reports_errors
from pipeline.base.weights import load_model
from pipeline.tracking.store import EXPERIMENT, connect
from pipeline.tracking.trained_by import run_of_weights

TARGETS = {"main": [], "train": ["train"], "evaluate": ["evaluate"]}


def overrides_from(args: list[str], known_keys: list[str]) -> list[str]:
    """Turn ['--train.max_epochs', '3', ...] into ['train.max_epochs=3', ...], checking each key.

    A key under `nets` that params.yaml lacks (a new net, or an option a net leaves at its default)
    is added, as DVC spells it (`+nets.net6.flip=true`); the stages check what it adds, as any param.
    """
    if len(args) % 2:
        raise PipelineError(f"expected --<key> <value> pairs, got {' '.join(args)}")
    overrides = []
    for flag, value in zip(args[::2], args[1::2]):
        key = flag.removeprefix("--")
        if flag.startswith("--nets.") and key not in known_keys:
            overrides.append(f"+{key}={value}")
            continue
        if not flag.startswith("--") or key not in known_keys:
            guess = difflib.get_close_matches(key, known_keys, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise PipelineError(f"unknown parameter {flag!r}: not a key of {PARAMS_FILE}{hint}")
        overrides.append(f"{key}={value}")
    return overrides


def dvc_command(entry_point: str, overrides: list[str]) -> list[str]:
    # Without overrides a plain repro keeps params.yaml untouched; with them, `dvc exp run`
    # records the experiment so that it can be compared and applied later.
    if not overrides:
        return ["dvc", "repro", *TARGETS[entry_point]]
    settings = [part for override in overrides for part in ("-S", override)]
    return ["dvc", "exp", "run", *settings, *TARGETS[entry_point]]


def net_runs(config: Config) -> dict[str, mlflow.entities.Run | None]:
    """The MLflow run that trained the weights models/ holds for each net, once DVC has finished; None
    where no run of this store did (the weights were trained against another store)."""
    connect()
    return {net: run_of_weights(net, load_model(config.paths.model(net))) for net in config.nets}


def trained_during(run: mlflow.entities.Run | None, project_run: mlflow.entities.Run) -> bool:
    """Whether the net's run ended after the project run began: a run this one trained, or resumed from
    its checkpoint. A stage that DVC skipped or restored from its run cache has a run that ended before."""
    return run is not None and (run.info.end_time or 0) >= project_run.info.start_time


def description(runs: dict[str, mlflow.entities.Run | None], project_run: mlflow.entities.Run) -> str:
    """The project run's description (Markdown, shown by the UI): each net's run, linked to its page."""
    lines = []
    for net, run in runs.items():
        if run is None:
            lines.append(f"- {net}: its weights were trained by no run of this tracking store")
            continue
        run_id = run.info.run_id
        trained = "trained by this run" if trained_during(run, project_run) else "trained earlier"
        lines.append(f"- {net}: MLflow run [{run_id}](#/experiments/{run.info.experiment_id}/runs/{run_id}), {trained}")
    return "\n".join(lines)


def link_net_runs(project_run_id: str, runs: dict[str, mlflow.entities.Run | None]) -> None:
    """Tag the project run with each net's run (`<net>_run_id`), list them in its description, name
    those DVC did not train again, and say so if the project run is in another experiment than they.

    Without this, a `mlflow run` whose stages DVC skips has no child runs and nothing that says
    where the results it leaves in the workspace came from.
    """
    client = mlflow.MlflowClient()
    try:
        project_run = client.get_run(project_run_id)
        tags = {f"{net}_run_id": run.info.run_id for net, run in runs.items() if run is not None}
        tags["mlflow.note.content"] = description(runs, project_run)
        client.log_batch(project_run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        project_experiment = client.get_experiment(project_run.info.experiment_id).name
    except MlflowException as error:
        raise PipelineError(f"MLflow tracking store {client.tracking_uri} failed ({describe(error)}): "
                            f"project run {project_run_id} was not linked to the net runs") from None
    if project_experiment != EXPERIMENT:
        # MLflow chooses the project run's experiment before any code of the project runs.
        print(f"note: this project run is in the experiment {project_experiment!r}, its net runs in {EXPERIMENT!r}: "
              f"`mlflow run . --env-manager local --experiment-name {EXPERIMENT}` keeps them together", flush=True)
    for net, run in runs.items():
        if not trained_during(run, project_run):
            print(f"train@{net} was not run again: " + (
                f"its results are those of MLflow run {run.info.run_id}" if run is not None
                else f"no run of {client.tracking_uri} trained its weights"), flush=True)


def run_to_the_end(command: list[str]) -> int:
    """The command's exit status. A stop of this process (Ctrl-C, SIGTERM) is passed on to DVC as a
    Ctrl-C and DVC's end awaited: killed under its stage, DVC would leave the stage running unseen."""
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        process.wait()
        raise


@reports_errors
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in TARGETS:
        raise PipelineError(f"usage: python -m pipeline.mlproject {{{'|'.join(TARGETS)}}} [--<key> <value> ...]")
    known_keys = list(flatten(load_config().to_dict()))
    command = dvc_command(args[0], overrides_from(args[1:], known_keys))
    print("+", " ".join(command), flush=True)
    returncode = run_to_the_end(command)
    # Only `mlflow run` names a project run; after a failure models/ may hold half of the results.
    if returncode == 0 and os.environ.get("MLFLOW_RUN_ID"):
        link_net_runs(os.environ["MLFLOW_RUN_ID"], net_runs(load_config()))
    sys.exit(returncode)


if __name__ == "__main__":
    main()
