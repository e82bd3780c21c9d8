"""Point the Model Registry's aliases at the workspace's models: each net's alias (models:/<name>@<net>)
on the version of models/<net>.pt, and the champion alias on the net of the lowest mean test RMSE over
train.seeds in metrics/evaluate.json, on its best seed's version, as the evaluate stage does in the workspace.

For after `dvc exp apply` or `dvc checkout`, which bring back the models and their figures without
running evaluate (`dvc repro` is up to date); a version the store lacks is registered from the run
that the training noted for the weights (trained_by.record_training_run). The rules are in docs/mlflow.md.

Usage: python -m pipeline.promote
"""

from __future__ import annotations

import sys

from pipeline.base.composite import composite_checksum
from pipeline.base.config import Config, load_config
from pipeline.base.errors import PipelineError
from pipeline.base.files import read_json
from pipeline.base.reporting import reports_errors
from pipeline.tracking.registry import CHAMPION, Trained, promote, register
from pipeline.tracking.store import connect
from pipeline.tracking.trained_by import WEIGHTS_TAG, recorded_training_run

REMEDY = "run the pipeline first: `dvc repro`"


@reports_errors
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args:
        raise PipelineError("usage: python -m pipeline.promote (it reads params.yaml, models/ and metrics/)")
    config = load_config()
    model_name = config.registry.model_name
    figures = read_json(config.paths.test_figures, REMEDY)
    trainings = {net: [tested_training(config, net, seed, figures) for seed in config.train.seeds]
                 for net in config.predictors}
    connect()
    versions = {net: [register(model_name, trained, tested) for trained, tested in each]
                for net, each in trainings.items()}
    champion = promote(model_name, versions)
    for net, each in versions.items():
        print(f"promote: models:/{model_name}@{net} -> version {each[0].version}")
    seeds = config.train.seeds
    mean = f", the lowest mean of {len(seeds)} seeds" if len(seeds) > 1 else ""
    print(f"promote: models:/{model_name}@{CHAMPION} -> version {champion.version} ({champion.tags['net']}{mean}, "
          f"test RMSE {float(champion.tags['test_rmse_px']):.2f} px)")


def tested_training(config: Config, net: str, seed: int, figures: dict) -> tuple[Trained, float]:
    """The net's (or composite's) training under `seed`, with the run the training (evaluate, for a
    composite) noted for its weights, and its test RMSE as evaluate.json has it; refused in one line
    where either is missing."""
    paths, files = config.paths, config.files_seed(seed)
    weights = {member: recorded_weights(config, member, files) for member in config.composites.get(net, (net,))}
    checksum = composite_checksum(config, net, weights) if net in config.composites else weights[net]
    run_id = recorded_training_run(paths.training_runs, net, checksum)
    if run_id is None and net in config.composites:
        raise PipelineError(f"{net}: no evaluation in this project noted the MLflow run of its nets' weights: "
                            "evaluate it here (`dvc repro --force evaluate`)")
    if run_id is None:
        raise PipelineError(f"{paths.model(net, files)}: no training in this project noted the MLflow run of these "
                            f"weights (they were trained elsewhere): train it here (`dvc repro --force train@{net}`)")
    tested = figures.get(net) if isinstance(figures.get(net), dict) else {}
    if len(config.train.seeds) > 1:
        tested = (tested.get("seeds") or {}).get(str(seed)) or {}
    if not isinstance(tested, dict) or "test_rmse_px" not in tested:
        raise PipelineError(f"{paths.test_figures}: no test_rmse_px of {net} under seed {seed}: evaluate it first "
                            "(`dvc repro`)")
    return Trained(net, run_id, checksum), tested["test_rmse_px"]


def recorded_weights(config: Config, net: str, files: int | None) -> str:
    """The checksum of the net's weights as models/<net>.json records it; refused in one line without one."""
    info_path = config.paths.model_info(net, files)
    info = read_json(info_path, REMEDY)
    if WEIGHTS_TAG not in info:
        raise PipelineError(f"{info_path}: records no {WEIGHTS_TAG} (written by an older training): train it "
                            f"again (`dvc repro train@{net}`)")
    return info[WEIGHTS_TAG]


if __name__ == "__main__":
    main()
