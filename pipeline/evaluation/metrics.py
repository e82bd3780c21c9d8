"""Test errors, the mean-shape baseline and the seed's net-versus-net comparison, as pure functions.

Keypoints arrive scaled to [-1, 1] as the network regresses them; every error leaves here in
pixels, as training's valid_rmse_px does: RMSE px = sqrt(MSE in the scaled space) * 48.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd
import torch

from pipeline.faces.data import KEYPOINT_SCALE, loss_to_rmse_px
from pipeline.faces.kaggle import KEYPOINTS

PREDICTION_BATCH = 256
# A tenth of a pixel, far below any annotation's precision: a reference that errs no more than this
# leaves nothing to take a percentage of.
NEGLIGIBLE_RMSE_PX = 0.1
# Face indices drawn at once by the bootstrap (32 MB of them): its memory whatever the test set's size.
BOOTSTRAP_DRAWS_AT_ONCE = 2**22


def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int = PREDICTION_BATCH) -> np.ndarray:
    """Scaled keypoints (n, 30) for images (n, 1, 96, 96) in [0, 1], on whatever device the model is."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        batches = [
            model(torch.from_numpy(images[start:start + batch_size]).to(device)).cpu().numpy()
            for start in range(0, len(images), batch_size)
        ]
    return np.concatenate(batches)


def mean_shape(train_keypoints: np.ndarray, n_faces: int) -> np.ndarray:
    """The baseline a net must beat: the training portion's average face, predicted for every face."""
    return np.broadcast_to(train_keypoints.mean(axis=0), (n_faces, train_keypoints.shape[1]))


def rmse_curves(history: pd.DataFrame) -> pd.DataFrame:
    """A training history's losses as RMSE px, epoch by epoch, as the learning curves show them."""
    return pd.DataFrame({
        "epoch": history["epoch"],
        "train_rmse_px": loss_to_rmse_px(history["train_loss"]),
        "valid_rmse_px": loss_to_rmse_px(history["valid_loss"]),
    })


def squared_errors_px(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    return ((np.asarray(predicted, dtype=np.float64) - true) * KEYPOINT_SCALE) ** 2


def rmse_px(predicted: np.ndarray, true: np.ndarray) -> float:
    """Over all 30 columns of all faces."""
    return float(math.sqrt(squared_errors_px(predicted, true).mean()))


def per_keypoint_rmse_px(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Per keypoint, over its x and y of all faces: the overall RMSE is then the quadratic mean of these."""
    squared = squared_errors_px(predicted, true).reshape(len(true), len(KEYPOINTS), 2)
    return {name: float(value) for name, value in zip(KEYPOINTS, np.sqrt(squared.mean(axis=(0, 2))))}


def score(predicted: np.ndarray, true: np.ndarray) -> dict:
    return {"test_rmse_px": rmse_px(predicted, true), "per_keypoint_rmse_px": per_keypoint_rmse_px(predicted, true)}


def labelled_keypoint_rmse_px(predicted: np.ndarray, true: np.ndarray) -> dict[str, float | None]:
    """Per keypoint, over its x and y of every face labelled for it (`true` NaN where unlabelled): the
    test faces that lack some other keypoint count too, so a keypoint labelled on most faces is judged
    on most faces. None for a keypoint no face has."""
    squared = squared_errors_px(predicted, true).reshape(len(true), len(KEYPOINTS), 2)
    faces = labelled_faces(true)
    return {name: float(np.sqrt(np.nanmean(squared[:, index]))) if faces[name] else None
            for index, name in enumerate(KEYPOINTS)}


def labelled_faces(true: np.ndarray) -> dict[str, int]:
    """Per keypoint, the faces labelled for it (both coordinates given)."""
    labelled = ~np.isnan(true.reshape(len(true), len(KEYPOINTS), 2)).any(axis=2)
    return {name: int(count) for name, count in zip(KEYPOINTS, labelled.sum(axis=0))}


def pooled_score(scores: dict[int, dict]) -> dict:
    """A net's figures over its trainings, one score per seed: each the mean over the seeds, since a
    user retraining the net gets one training drawn at random. With several seeds, also each seed's
    test RMSE and their standard deviation (n - 1), which says how far one training strays."""
    pooled = {
        "test_rmse_px": float(np.mean([figures["test_rmse_px"] for figures in scores.values()])),
        **{table: {name: _mean([figures[table][name] for figures in scores.values()]) for name in KEYPOINTS}
           for table in ("per_keypoint_rmse_px", "labelled_keypoint_rmse_px") if table in next(iter(scores.values()))},
    }
    if len(scores) > 1:
        pooled["test_rmse_px_sd"] = float(np.std([figures["test_rmse_px"] for figures in scores.values()], ddof=1))
        pooled["seeds"] = {str(seed): {"test_rmse_px": figures["test_rmse_px"]} for seed, figures in scores.items()}
    return pooled


def best_valid(history: pd.DataFrame) -> tuple[float, int]:
    """The lowest valid loss and the first epoch that reached it."""
    best_row = history["valid_loss"].idxmin()
    return float(history.at[best_row, "valid_loss"]), int(history.at[best_row, "epoch"])


def first_epoch_reaching(history: pd.DataFrame, target_loss: float) -> int | None:
    reached = history.loc[history["valid_loss"] <= target_loss, "epoch"]
    return int(reached.iloc[0]) if len(reached) else None


def improvement_percent(reference: float, value: float, negligible: float = 0.0) -> float | None:
    """How much lower `value` is than `reference`, in percent of the reference: positive is better.

    None where the reference is `negligible` or less: a percentage of (almost) nothing is a division
    by zero, or a figure like "54754267% higher" that says nothing about the faces.
    """
    if reference <= negligible:
        return None
    return 100.0 * (reference - value) / reference


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else float(np.mean(values))


def face_squared_errors_px(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Each face's mean squared error over its 30 coordinates: what the bootstrap resamples, since a
    face's keypoints err together (a face the net misreads is off everywhere) and are no independent draws."""
    return squared_errors_px(predicted, true).mean(axis=1)


def resampled_rmse_px(face_errors: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The test RMSE px of `resamples` bootstrap resamples of a model's trainings and the test faces.

    `face_errors` is (faces,) for one training, or (trainings, faces): a row per seed of train.seeds.
    Two levels: each resample draws the faces with replacement, and the trainings with replacement,
    and is the mean over the drawn trainings of each one's RMSE on the drawn faces; so its spread
    covers both which faces were tested and how the trainings fell out.

    The draws depend only on the seed and the numbers of faces and trainings, so every model
    evaluated with the same seed is scored on the same resamples: the comparisons are paired, and
    the noise that the choice of test faces (and of training seeds, the nets' row i sharing seed i)
    adds to both models cancels out of their difference. The faces are drawn from `seed`'s stream as
    with one training alone, and the trainings from a stream of their own: trainings that agree
    exactly give the interval of one training.
    """
    errors = np.atleast_2d(face_errors)
    n_trainings, n_faces = errors.shape
    face_rng, training_rng = np.random.default_rng(seed), np.random.default_rng([seed, n_trainings])
    # Chunks of draws, so that a large test set needs no (resamples x faces) matrix at once.
    chunk = max(1, BOOTSTRAP_DRAWS_AT_ONCE // n_faces)
    rmse = []
    for done in range(0, resamples, chunk):
        faces = face_rng.integers(0, n_faces, (min(chunk, resamples - done), n_faces))
        per_training = np.stack([np.sqrt(row[faces].mean(axis=1)) for row in errors], axis=1)
        drawn = training_rng.integers(0, n_trainings, (len(faces), n_trainings))
        rmse.append(np.take_along_axis(per_training, drawn, axis=1).mean(axis=1))
    return np.concatenate(rmse)


def improvement_interval(reference_errors: np.ndarray, errors: np.ndarray, resamples: int,
                         seed: int) -> list[float] | None:
    """The 95% percentile interval of improvement_percent(reference, model) over paired bootstrap
    resamples of the test faces; None where some resample leaves the reference no error to compare with."""
    reference = resampled_rmse_px(reference_errors, resamples, seed)
    if reference.min() <= NEGLIGIBLE_RMSE_PX:
        return None
    improvements = 100.0 * (reference - resampled_rmse_px(errors, resamples, seed)) / reference
    # Rounded as stored: the last bits of a sum differ between machines, the hundredths do not.
    return [round(float(bound), 2) for bound in np.percentile(improvements, [2.5, 97.5])]


def comparisons(nets: list[str]) -> dict[str, tuple[str, str]]:
    """The comparisons the report makes, by name, as (model, reference): every net against the
    mean-shape baseline, and every other net against the first (as the seed compares net5 with net4)."""
    reference, *others = nets
    return {
        **{f"{net}_vs_baseline": (net, "baseline") for net in nets},
        **{f"{net}_vs_{reference}": (net, reference) for net in others},
    }


def training_comparison(histories: dict[str, pd.DataFrame]) -> tuple[dict[str, dict], float]:
    """Each net's best valid loss, its epoch and the first epoch reaching the common target.

    The target is the largest of the nets' best valid losses: the worst net reaches it by
    definition, so "epochs to reach the target" is defined for every net and says how much
    sooner the better nets get there. A lower target would leave the worse nets with no epoch.
    """
    bests = {net: best_valid(history) for net, history in histories.items()}
    target_loss = max(loss for loss, _ in bests.values())
    figures = {
        net: {
            "best_valid_loss": loss,
            "best_valid_rmse_px": float(loss_to_rmse_px(loss)),
            "best_epoch": epoch,
            "epoch_reaching_target": first_epoch_reaching(histories[net], target_loss),
        }
        for net, (loss, epoch) in bests.items()
    }
    return figures, target_loss


def summarize(scores: dict[str, dict], baseline: dict, histories: dict[str, pd.DataFrame],
              face_errors: dict[str, np.ndarray], resamples: int, seed: int,
              progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """The content of evaluate.json: per net test and training figures, the baseline, the comparison.

    `scores` are every predictor's (full nets, then composites), `histories` those of the nets that
    trained (a composite has none, so its entry has test figures only, and no best valid loss is
    compared with it).

    Every net is compared with the mean-shape baseline (a net that does not beat it has learnt no
    faces); the first net (net4 in params.yaml) is the reference the others are compared with, as
    the seed compares net5 with net4. Each comparison of test RMSE carries its 95% interval from
    a paired bootstrap over the test faces and the trainings' seeds (`face_errors` per model,
    "baseline" included: resampled_rmse_px), and whether that interval excludes no difference at all. `progress` hears (comparisons done, of how
    many) after each.
    """
    training, target_loss = training_comparison(histories) if histories else ({}, None)
    models = {**scores, "baseline": baseline}
    comparison = {
        "target_valid_loss": target_loss,
        "target_valid_rmse_px": None if target_loss is None else float(loss_to_rmse_px(target_loss)),
        "test_faces": int(np.atleast_2d(next(iter(face_errors.values()))).shape[1]),
        # The trainings of each net the figures pool (train.seeds), as many for every net.
        "seeds": int(max(len(np.atleast_2d(errors)) for errors in face_errors.values())),
        "bootstrap_resamples": resamples,
    }
    compared = comparisons(list(scores))
    for done, (name, (model, reference)) in enumerate(compared.items(), start=1):
        interval = improvement_interval(face_errors[reference], face_errors[model], resamples, seed)
        progress(done, len(compared))
        comparison[name] = {
            "test_rmse_improvement_percent": improvement_percent(
                models[reference]["test_rmse_px"], models[model]["test_rmse_px"], NEGLIGIBLE_RMSE_PX),
            "test_rmse_improvement_interval": interval,
            "significant": interval is not None and (interval[0] > 0 or interval[1] < 0),
        }
        if reference in training and model in training:
            comparison[name]["best_valid_loss_improvement_percent"] = improvement_percent(
                training[reference]["best_valid_loss"], training[model]["best_valid_loss"])
    nets = {net: {**scores[net], **training.get(net, {})} for net in scores}
    return {**nets, "baseline": baseline, "comparison": comparison}
