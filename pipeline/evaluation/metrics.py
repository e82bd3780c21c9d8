"""Test errors, the mean-shape baseline and the seed's net-versus-net comparison, as pure functions.

Keypoints arrive scaled to [-1, 1] as the network regresses them; every error leaves here in
pixels, as training's valid_rmse_px does: RMSE px = sqrt(MSE in the scaled space) * 48.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from pipeline.faces.data import KEYPOINT_SCALE, loss_to_rmse_px
from pipeline.faces.kaggle import KEYPOINTS

PREDICTION_BATCH = 256


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


def best_valid(history: pd.DataFrame) -> tuple[float, int]:
    """The lowest valid loss and the first epoch that reached it."""
    best_row = history["valid_loss"].idxmin()
    return float(history.at[best_row, "valid_loss"]), int(history.at[best_row, "epoch"])


def first_epoch_reaching(history: pd.DataFrame, target_loss: float) -> int | None:
    reached = history.loc[history["valid_loss"] <= target_loss, "epoch"]
    return int(reached.iloc[0]) if len(reached) else None


def improvement_percent(reference: float, value: float) -> float:
    """How much lower `value` is than `reference`, in percent of the reference: positive is better."""
    return 100.0 * (reference - value) / reference


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


def summarize(scores: dict[str, dict], baseline: dict, histories: dict[str, pd.DataFrame]) -> dict:
    """The content of evaluate.json: per net test and training figures, the baseline, the comparison.

    Every net is compared with the mean-shape baseline (a net that does not beat it has learnt no
    faces); the first net (net4 in params.yaml) is the reference the others are compared with, as
    the seed compares net5 with net4.
    """
    training, target_loss = training_comparison(histories)
    reference, *others = list(scores)
    comparison = {
        "target_valid_loss": target_loss,
        "target_valid_rmse_px": float(loss_to_rmse_px(target_loss)),
        **{
            f"{net}_vs_baseline": {
                "test_rmse_improvement_percent": improvement_percent(
                    baseline["test_rmse_px"], scores[net]["test_rmse_px"]),
            }
            for net in scores
        },
        **{
            f"{net}_vs_{reference}": {
                "test_rmse_improvement_percent": improvement_percent(
                    scores[reference]["test_rmse_px"], scores[net]["test_rmse_px"]),
                "best_valid_loss_improvement_percent": improvement_percent(
                    training[reference]["best_valid_loss"], training[net]["best_valid_loss"]),
            }
            for net in others
        },
    }
    nets = {net: {**scores[net], **training[net]} for net in scores}
    return {**nets, "baseline": baseline, "comparison": comparison}
