"""Point the Model Registry's aliases at the workspace's models: each net's alias (models:/<name>@<net>)
on the version of models/<net>.pt, and the champion alias on the one of the lowest test RMSE in
metrics/evaluate.json, as the evaluate stage does in the workspace.

For after `dvc exp apply` or `dvc checkout`, which bring back the models and their figures without
running evaluate (`dvc repro` is up to date); a version the store lacks is registered from the run
that the training noted for the weights (trained_by.record_training_run). The rules are in docs/mlflow.md.

Usage: python -m pipeline.promote
"""

from __future__ import annotations

import sys

from pipeline.base.config import load_config
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
    paths, model_name = config.paths, config.registry.model_name
    figures = read_json(paths.test_figures, REMEDY)
    trained, tested = {}, {}
    for net in config.nets:
        info_path = paths.model_info(net)
        info = read_json(info_path, REMEDY)
        if WEIGHTS_TAG not in info:
            raise PipelineError(f"{info_path}: records no {WEIGHTS_TAG} (written by an older training): train it "
                                f"again (`dvc repro train@{net}`)")
        run_id = recorded_training_run(paths.training_runs, net, info[WEIGHTS_TAG])
        if run_id is None:
            raise PipelineError(f"{paths.model(net)}: no training in this project noted the MLflow run of these "
                                f"weights (they were trained elsewhere): train it here (`dvc repro --force train@{net}`)")
        if not isinstance(figures.get(net), dict) or "test_rmse_px" not in figures[net]:
            raise PipelineError(f"{paths.test_figures}: no test_rmse_px of {net}: evaluate it first (`dvc repro`)")
        trained[net] = Trained(net, run_id, info[WEIGHTS_TAG])
        tested[net] = figures[net]["test_rmse_px"]
    connect()
    versions = {net: register(model_name, trained[net], tested[net]) for net in config.nets}
    champion = promote(model_name, versions)
    for net, version in versions.items():
        print(f"promote: models:/{model_name}@{net} -> version {version.version}")
    print(f"promote: models:/{model_name}@{CHAMPION} -> version {champion.version} ({champion.tags['net']}, "
          f"test RMSE {float(champion.tags['test_rmse_px']):.2f} px)")


if __name__ == "__main__":
    main()
