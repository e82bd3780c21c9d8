"""Stage `evaluate`: every net and composite and the mean-shape baseline on the held-out test faces.

Writes <paths.metrics>/evaluate.json (the headline test figures, DVC metrics),
<paths.metrics>/keypoint_errors.csv, <paths.metrics>/valid_rmse.csv (DVC's plot of the nets), four pictures
under paths.plots and reports/comparison.md, and adds each net's test figures and the pictures to that
net's own training run in MLflow (the run the training noted for its weights, trained_by.record_training_run),
whose model it registers as a version of registry.model_name; in the workspace, it points the nets'
aliases and the champion alias at them (pipeline.tracking.registry).

The models compared are config.predictors: the nets that predict all 15 keypoints, and the composites
(params.yaml's composites), whose nets each predict a group of them; a composite under a seed puts its
nets' trainings under that seed side by side (composite.combine). A net of a group is read and checked
like any net, but is no model of the comparison. A composite has no training run: evaluate makes it a
run of its own, with its model, and registers that (pipeline.tracking.composite_runs).

Usage: python -m pipeline.evaluate
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from mlflow.entities import DatasetInput
from mlflow.entities.model_registry import ModelVersion

from pipeline.base.composite import combine, composite_checksum, load_composite, member_columns
from pipeline.base.config import Config, flatten, load_config
from pipeline.base.errors import PipelineError
from pipeline.base.files import read_json, write_json, write_text
from pipeline.base.reporting import reports_errors
from pipeline.base.weights import load_model, weights_checksum
from pipeline.evaluation import plots
from pipeline.evaluation.colours import BASELINE_COLOUR, net_colour
from pipeline.evaluation.metrics import (comparisons, face_squared_errors_px, labelled_faces, labelled_keypoint_rmse_px,
                                         mean_shape, pooled_score, predict, rmse_curves, score, summarize)
from pipeline.evaluation.report import (BASELINE_LABEL, SUMMARY_HEADER, answer, comparison_lines, comparison_markdown,
                             summary_rows, text_table)
from pipeline.faces.data import (FaceSet, load_faces, load_incomplete_faces, pixels_of, read_summary,
                                 unscale_keypoints)
from pipeline.faces.kaggle import read_table
from pipeline.tracking.composite_runs import composite_run
from pipeline.tracking.datasets import faces_inputs
from pipeline.tracking.export import example_faces
from pipeline.tracking.evaluation_log import log_evaluation
from pipeline.tracking.registry import EXPERIMENT_TAG, Trained, in_workspace, promote, register, trained_run
from pipeline.tracking.store import EXPERIMENT, TrackingError, connect
from pipeline.tracking.trained_by import WEIGHTS_TAG, recorded_training_run
from pipeline.training.device import use_portable_cpu_kernels

KEYPOINT_ERRORS = "keypoint_errors.csv"
# Under paths.metrics: the rows of dvc.yaml's plot that overlays every net's valid RMSE.
VALID_RMSE = "valid_rmse.csv"
PICTURE_TITLES = {
    "learning_curves.png": "Learning curves",
    "schedules.png": "Learning rate and momentum",
    "test_predictions.png": "Test faces: true (green) and predicted (red) keypoints",
    "keypoint_errors.png": "Test error per keypoint",
}
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "learning_rate", "momentum")
N_PICTURED_FACES = 16
# A key that params.yaml or models/<net>.json lacks, as the refusal names it.
NOT_SET = "(not set)"
# A bootstrap running longer than this (evaluate.bootstrap_resamples in the hundreds of thousands)
# says how far it has got.
PROGRESS_SECONDS = 5


def read_history(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"{path}: no such file (train the nets first with `dvc repro`)")
    return read_table(path, HISTORY_COLUMNS)


def read_model_info(path: Path, net: str, seed: int, config: Config, data_hash: str) -> dict:
    """models/<net>.json (the kept epoch, the weights' checksum), after checking that the net was trained
    on the prepared data with the params params.yaml now gives it, under `seed`.

    A net trained on an earlier preparation may have seen today's test faces while training, so
    its test error would flatter it; one trained with other params (params.yaml edited while `dvc
    repro` ran, say) is not the net dvc.lock and the report describe.
    """
    retrain = f"train it again (`dvc repro train@{net}`)"
    info = read_json(path, "train the nets first with `dvc repro`")
    if info.get("data_hash") != data_hash:
        raise PipelineError(
            f"{path}: the net was trained on data {info.get('data_hash')}, but the prepared data is "
            f"{data_hash}: {retrain}"
        )
    missing = [key for key in ("config", WEIGHTS_TAG) if key not in info]
    if missing or not isinstance(info["config"], dict):
        raise PipelineError(f"{path}: records no {(missing or ['config'])[0]} (written by an older training): "
                            f"{retrain}")
    trained, current = flatten(info["config"]), flatten(config.training_params(net, seed))
    # The net's own keys first: one of them (nets.<net>.max_epochs) also sets its train.* value.
    for key in sorted(dict.fromkeys([*current, *trained]), key=lambda key: not key.startswith("nets.")):
        if trained.get(key, NOT_SET) != current.get(key, NOT_SET):
            raise PipelineError(f"{path}: {net} was trained with {key} {trained.get(key, NOT_SET)}, but params.yaml "
                                f"says {current.get(key, NOT_SET)}: {retrain}")
    return info


def check_start(config: Config, net: str, infos: dict[tuple[str, int], dict], seed: int, info_path: Path) -> None:
    """A net started from another's weights (init_from) started from those that net has now: DVC reruns the
    source's training when its inputs change, but not the trainings started from it, which know it by name
    only (dvc.yaml cannot list a dependency that some nets lack)."""
    source = config.net(net).init_from
    if source is None:
        return
    started = (infos[net, seed].get("init_from") or {}).get(WEIGHTS_TAG)
    if started != infos[source, seed][WEIGHTS_TAG]:
        raise PipelineError(f"{info_path}: {net} started from weights of {source} ({str(started)[:12]}...) that it no "
                            f"longer has: train {net} again (`dvc repro --force train@{net}`)")


def check_weights(path: Path, info: dict, model: torch.nn.Module, info_path: Path) -> None:
    """The weights are those models/<net>.json describes: DVC restores the two together."""
    if weights_checksum(model) != info[WEIGHTS_TAG]:
        raise PipelineError(f"{path}: not the weights {info_path} records ({info[WEIGHTS_TAG][:12]}...): restore both "
                            "with `dvc checkout`, or train the net again with `dvc repro`")


def bootstrap_progress(resamples: int, seconds: Callable[[], float] = time.monotonic) -> Callable[[int, int], None]:
    """A line on stderr after each comparison, once the bootstrap has run PROGRESS_SECONDS."""
    started = seconds()

    def said(done: int, total: int) -> None:
        elapsed = seconds() - started
        if elapsed >= PROGRESS_SECONDS:
            print(f"evaluate: bootstrap: {done} of {total} comparisons done ({resamples} resamples each, "
                  f"{elapsed:.0f} s)", file=sys.stderr, flush=True)

    return said


def mlflow_metrics(results: dict, net: str, seed: int) -> dict[str, float]:
    """The headline test figures of the net's training under `seed`, and with several seeds the net's
    mean over them. The per-keypoint errors go to the run as keypoint_errors.csv: as 15 metrics they
    were 15 charts ahead of the training curves in MLflow's chart view."""
    figures = results[net]
    seeds = figures.get("seeds")
    return {
        "test_rmse_px": seeds[str(seed)]["test_rmse_px"] if seeds else figures["test_rmse_px"],
        **({"net_mean_test_rmse_px": figures["test_rmse_px"]} if seeds else {}),
        "baseline_test_rmse_px": results["baseline"]["test_rmse_px"],
    }


def dvc_metrics(results: dict, nets: list[str]) -> dict:
    """evaluate.json: each net's and the baseline's test RMSE (a net's mean over train.seeds, with
    several seeds also their standard deviation and each seed's), and each comparison's 95% interval
    (`ci95`, a list [low, high], which `dvc metrics show` leaves out of its table), with the nets'
    improvement over the first net, no more, so that the table fits a terminal: a column for each
    net's improvement over the baseline would widen it past 200 characters (it follows from the two
    test_rmse_px). The training's figures are in metrics/train/<net>.json, the per-keypoint errors in
    keypoint_errors.csv, the rest in the report."""
    comparison = results["comparison"]

    def compared(name: str) -> dict:
        interval = {"ci95": comparison[name]["test_rmse_improvement_interval"]}
        if name.endswith("_vs_baseline"):
            return interval
        # Short names: `dvc metrics show` prints a column per name, as wide as the name.
        return {"improvement_percent": comparison[name]["test_rmse_improvement_percent"], **interval}

    def tested(label: str) -> dict:
        # With several seeds, the mean's spread and each seed's figure (metrics.pooled_score).
        return {key: results[label][key] for key in ("test_rmse_px", "test_rmse_px_sd", "seeds") if key in results[label]}

    return {
        **{label: tested(label) for label in [*nets, "baseline"]},
        **{name: compared(name) for name in comparisons(nets)},
    }


def keypoint_errors_csv(results: dict, labels: list[str]) -> str:
    """One row per keypoint: a column of test RMSE px per net and the baseline on the complete test faces
    (those of every comparison); then the test faces labelled for the keypoint, complete or not
    (`labelled_faces`), and a column per net and the baseline of the RMSE on those (`<model>_every_labelled`)."""
    table = pd.DataFrame({label: results[label]["per_keypoint_rmse_px"] for label in labels})
    table["labelled_faces"] = pd.Series(results["comparison"]["labelled_faces"])
    for label in labels:
        table[f"{label}_every_labelled"] = pd.Series(results[label]["labelled_keypoint_rmse_px"])
    return table.rename_axis("keypoint").to_csv(lineterminator="\n")


def valid_rmse_csv(histories: dict[str, pd.DataFrame], nets: list[str], baseline_rmse_px: float) -> str:
    """Every net's valid RMSE px per epoch, and the mean-shape baseline's test RMSE as a line across
    the epochs, each row with its model's colour of the pictures, which DVC's plot draws it in
    (.dvc/plots/valid_rmse.json)."""
    if not nets:  # composites only: no net trained a history of its own
        return pd.DataFrame(columns=["epoch", "model", "rmse_px", "colour"]).to_csv(index=False, lineterminator="\n")
    curves = [pd.DataFrame({"epoch": histories[net]["epoch"], "model": net,
                            "rmse_px": rmse_curves(histories[net])["valid_rmse_px"], "colour": net_colour(index)})
              for index, net in enumerate(nets)]
    epochs = pd.concat(curves)["epoch"]
    baseline = pd.DataFrame({"epoch": [epochs.min(), epochs.max()], "model": f"{BASELINE_LABEL} (test)",
                             "rmse_px": baseline_rmse_px, "colour": BASELINE_COLOUR})
    return pd.concat([*curves, baseline]).to_csv(index=False, lineterminator="\n")


def draw_pictures(folder: Path, results: dict, histories: dict[str, pd.DataFrame], test: FaceSet,
                  predictions: dict, nets: list[str]) -> dict[str, Path]:
    """The four evaluation pictures, by title. The faces show the model (net or composite) with the
    lowest test error; the curves, the nets that have a history (no composite has)."""
    path = {name: folder / name for name in PICTURE_TITLES}
    plots.learning_curves(path["learning_curves.png"], {net: rmse_curves(histories[net]) for net in histories},
                          results["baseline"]["test_rmse_px"])
    plots.schedules(path["schedules.png"], histories)
    best = min(nets, key=lambda net: results[net]["test_rmse_px"])
    faces = test.take(slice(0, N_PICTURED_FACES))
    plots.face_grid(
        path["test_predictions.png"],
        images=pixels_of(faces.X[:, 0]),
        keypoints=unscale_keypoints(faces.y),
        predicted=unscale_keypoints(predictions[best][:N_PICTURED_FACES]),
        title=f"{best} on test faces: true (green), predicted (red)",
    )
    plots.keypoint_errors(path["keypoint_errors.png"], {
        **{net: results[net]["per_keypoint_rmse_px"] for net in nets},
        BASELINE_LABEL: results["baseline"]["per_keypoint_rmse_px"],
    })
    return {title: path[name] for name, title in PICTURE_TITLES.items()}


def trained_here(folder: str, net: str, weights: str, model_path: Path) -> Trained | None:
    """The net's training, with the run that trained these weights as this machine's training noted it."""
    run_id = recorded_training_run(folder, net, weights)
    if run_id is None:
        print(f"warning: {model_path}: no training in this project noted the MLflow run of these weights (they "
              "were trained elsewhere): its test figures are not logged to MLflow", file=sys.stderr)
        return None
    return Trained(net, run_id, weights)


def composite_trained(config: Config, name: str, seed: int, infos: dict, data_hash: str,
                      faces: np.ndarray) -> Trained | None:
    """Composite `name`'s run of its nets' trainings under `seed` (composite_runs.composite_run: made now
    if none is noted), or None with a warning where the store fails: the files are written."""
    paths, files = config.paths, config.files_seed(seed)
    weights = {member: infos[member, seed][WEIGHTS_TAG] for member in config.composites[name]}
    try:
        return composite_run(paths.training_runs, name, weights, composite_checksum(config, name, weights), seed,
                             data_hash, load_composite(config, name, files), faces,
                             net_colour(config.predictors.index(name)),
                             [paths.models, paths.metrics, paths.plots, paths.reports])
    except TrackingError as error:
        print(f"warning: {name}: no MLflow run holds the composite's model ({error}): its test figures are not "
              "logged to MLflow", file=sys.stderr)
        return None


def log_to_run(model_name: str, trained: Trained | None, metrics: dict[str, float], artifacts: list[Path],
               inputs: list[DatasetInput]) -> ModelVersion | None:
    """Log into the run that trained the net (trained_here), the test faces as its "test" dataset,
    then register the run's model with its test RMSE; the model's version. Without that run, or
    with a store that fails, warn and carry on, since the files are written."""
    if trained is None:
        return None
    try:
        trained_run(trained)
        log_evaluation(trained.run_id, metrics, artifacts, inputs)
    except TrackingError as error:
        print(f"warning: {trained.net}: test figures not logged to MLflow ({error})", file=sys.stderr)
        return None
    try:
        return register(model_name, trained, metrics["test_rmse_px"])
    except TrackingError as error:
        print(f"warning: {trained.net}: model not registered in MLflow ({error})", file=sys.stderr)
        return None


def point_aliases(model_name: str, versions: dict[str, list[ModelVersion | None]]) -> None:
    """In the workspace, the aliases on the versions of its nets' trainings, one per seed
    (registry.promote), once every training evaluated has one: the best of some is not the best of
    all. In a queued or temporary experiment, none: its weights are not the workspace's. With none
    registered, their own warnings have said why."""
    experiment = os.environ.get("DVC_EXP_NAME")
    if not in_workspace():
        print(f"evaluate: experiment {experiment}'s versions are tagged {EXPERIMENT_TAG}={experiment}; the aliases "
              "stay on the workspace's (`dvc exp apply` and `python -m pipeline.promote` move them here)")
        return
    # (`is None`: a ModelVersion's == compares it as a dict)
    unregistered = [net for net, trainings in versions.items() if any(version is None for version in trainings)]
    if all(version is None for trainings in versions.values() for version in trainings):
        return
    try:
        if unregistered:
            raise TrackingError(f"{', '.join(unregistered)} not registered")
        promote(model_name, versions)
    except TrackingError as error:
        print(f"warning: the aliases of {model_name} were not moved in MLflow ({error})", file=sys.stderr)


@reports_errors(memory_knobs="lower evaluate.bootstrap_resamples or a net's hidden, or use fewer test faces")
def main() -> None:
    config = load_config()
    # The nets' forward passes too give the same bits on any CPU where their training did.
    use_portable_cpu_kernels(config.train.portable_cpu)
    paths = config.paths
    # Every net is read and checked; the models compared are the full nets and the composites.
    nets, scored, seeds = list(config.nets), config.predictors, config.train.seeds
    summary = read_summary(paths.prepared_summary)
    data_hash = summary["data_hash"]
    # Every training: each net under each seed, the first seed's the net's own files (PathsConfig).
    trainings = [(net, seed) for net in nets for seed in seeds]
    files = {(net, seed): config.files_seed(seed) for net, seed in trainings}
    infos = {(net, seed): read_model_info(paths.model_info(net, files[net, seed]), net, seed, config, data_hash)
             for net, seed in trainings}
    for net, seed in trainings:
        check_start(config, net, infos, seed, paths.model_info(net, files[net, seed]))
    # The first seed's: the learning curves and the training figures are those of one training, of the
    # nets compared (a composite's nets have theirs in their runs).
    histories = {net: read_history(paths.history(net)) for net in config.full_nets}
    train, test = load_faces(paths.train_faces, summary), load_faces(paths.test_faces, summary)
    # The test faces that lack some keypoints: each keypoint is scored on every test face labelled for it too.
    incomplete = load_incomplete_faces(paths.test_incomplete_faces, summary)
    every_test_y = np.concatenate([test.y, incomplete.y])
    predictions, every_prediction = {}, {}
    for net, seed in trainings:
        # On the CPU whatever the training device: the test set is small, and CPU kernels give the
        # same evaluate.json on every machine.
        model_path = paths.model(net, files[net, seed])
        model = load_model(model_path, "cpu")
        check_weights(model_path, infos[net, seed], model, paths.model_info(net, files[net, seed]))
        predictions[net, seed] = predict(model, test.X)
        every_prediction[net, seed] = np.concatenate([predictions[net, seed], predict(model, incomplete.X)]) \
            if len(incomplete) else predictions[net, seed]
    for name, members in config.composites.items():
        columns = member_columns(config, name)
        for seed in seeds:
            predictions[name, seed] = combine(columns, [predictions[member, seed] for member in members])
            every_prediction[name, seed] = combine(columns, [every_prediction[member, seed] for member in members])
    baseline = mean_shape(train.y, len(test))
    face_errors = {**{net: np.stack([face_squared_errors_px(predictions[net, seed], test.y) for seed in seeds])
                      for net in scored},
                   "baseline": face_squared_errors_px(baseline, test.y)}
    scores = {net: pooled_score({seed: {**score(predictions[net, seed], test.y), "labelled_keypoint_rmse_px":
                                        labelled_keypoint_rmse_px(every_prediction[net, seed], every_test_y)}
                                 for seed in seeds}) for net in scored}
    baseline_score = {**score(baseline, test.y), "labelled_keypoint_rmse_px": labelled_keypoint_rmse_px(
        mean_shape(train.y, len(every_test_y)), every_test_y)}
    resamples = config.evaluate.bootstrap_resamples
    results = summarize(scores, baseline_score, histories, face_errors, resamples, config.evaluate.seed,
                        bootstrap_progress(resamples))
    results["comparison"]["labelled_faces"] = labelled_faces(every_test_y)
    for net in config.full_nets:  # the epoch whose weights were tested, for the report (report.kept_weights_paragraph)
        results[net]["kept_epoch"] = infos[net, seeds[0]].get("kept_epoch")
    write_json(paths.test_figures, dvc_metrics(results, scored))
    write_text(Path(paths.metrics) / KEYPOINT_ERRORS, keypoint_errors_csv(results, [*scored, "baseline"]))
    write_text(Path(paths.metrics) / VALID_RMSE, valid_rmse_csv(histories, list(histories),
                                                                results["baseline"]["test_rmse_px"]))
    pictures = draw_pictures(Path(paths.plots), results, histories, test,
                             {net: predictions[net, seeds[0]] for net in scored}, scored)
    report = paths.comparison_report
    write_text(report, comparison_markdown(results, scored, data_hash, len(test), pictures, report, EXPERIMENT,
                                           config.composites))
    try:
        connect()
    except TrackingError as error:
        # The files above are the stage's results; the store only mirrors them.
        print(f"warning: test figures not logged to MLflow ({error})", file=sys.stderr)
    else:
        model_name = config.registry.model_name
        exported_from = example_faces(torch.from_numpy(train.X))

        def trained(net: str, seed: int) -> Trained | None:
            if net in config.composites:
                return composite_trained(config, net, seed, infos, data_hash, exported_from)
            return trained_here(paths.training_runs, net, infos[net, seed][WEIGHTS_TAG],
                                paths.model(net, files[net, seed]))

        point_aliases(model_name, {net: [
            log_to_run(model_name, trained(net, seed), mlflow_metrics(results, net, seed),
                       [*pictures.values(), report, Path(paths.metrics) / KEYPOINT_ERRORS],
                       faces_inputs(summary, test=len(test)))
            for seed in seeds] for net in scored})
    print(f"evaluate: {len(test)} test faces{f', {len(seeds)} seeds of each net' if len(seeds) > 1 else ''}, "
          f"data hash {data_hash}")
    print(text_table(SUMMARY_HEADER, summary_rows(results, scored)))
    print("\n".join(comparison_lines(results, scored)))
    print(f"{answer(results, scored)}.")


if __name__ == "__main__":
    main()
