import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.base.model import KeypointNet
from pipeline.evaluation.metrics import (NEGLIGIBLE_RMSE_PX, best_valid, face_squared_errors_px,
                                         first_epoch_reaching, improvement_interval, improvement_percent, mean_shape,
                                         labelled_faces, labelled_keypoint_rmse_px, per_keypoint_rmse_px, pooled_score, predict, resampled_rmse_px, rmse_curves, rmse_px,
                                         score, summarize, training_comparison)
from pipeline.faces.data import loss_to_rmse_px
from pipeline.faces.kaggle import KEYPOINTS

ONE_PIXEL = 1 / 48  # in the scaled space the net regresses


def history(valid_losses, train_losses=None):
    epochs = range(1, len(valid_losses) + 1)
    return pd.DataFrame({"epoch": epochs, "train_loss": train_losses or valid_losses, "valid_loss": valid_losses})


def test_rmse_of_a_one_pixel_error_in_one_column():
    true = np.zeros((2, 30))
    predicted = true.copy()
    predicted[:, 0] = ONE_PIXEL  # left_eye_center_x off by 1 px on both faces
    assert rmse_px(predicted, true) == pytest.approx(math.sqrt(1 / 30))
    per_keypoint = per_keypoint_rmse_px(predicted, true)
    assert list(per_keypoint) == list(KEYPOINTS)
    # x off by 1 px, y exact: the mean of 1 and 0 over the two coordinates.
    assert per_keypoint["left_eye_center"] == pytest.approx(math.sqrt(0.5))
    assert all(value == 0 for name, value in per_keypoint.items() if name != "left_eye_center")


def test_per_keypoint_errors_average_faces_and_both_coordinates():
    true = np.zeros((2, 30))
    predicted = true.copy()
    nose = 2 * KEYPOINTS.index("nose_tip")
    predicted[0, nose:nose + 2] = [3 * ONE_PIXEL, 4 * ONE_PIXEL]  # face 0: x off by 3 px, y by 4 px
    assert per_keypoint_rmse_px(predicted, true)["nose_tip"] == pytest.approx(math.sqrt((9 + 16) / 4))


def test_overall_rmse_is_the_quadratic_mean_of_the_keypoints_and_matches_training():
    rng = np.random.default_rng(0)
    true = rng.uniform(-1, 1, (7, 30)).astype(np.float32)
    predicted = rng.uniform(-1, 1, (7, 30)).astype(np.float32)
    per_keypoint = np.array(list(per_keypoint_rmse_px(predicted, true).values()))
    assert rmse_px(predicted, true) == pytest.approx(math.sqrt(np.mean(per_keypoint ** 2)))
    # The training loop reports valid_rmse_px as sqrt(MSE) * 48.
    mse = F.mse_loss(torch.from_numpy(predicted), torch.from_numpy(true)).item()
    assert rmse_px(predicted, true) == pytest.approx(math.sqrt(mse) * 48, rel=1e-5)
    assert loss_to_rmse_px(mse) == pytest.approx(rmse_px(predicted, true), rel=1e-5)
    # The bootstrap's unit, the face: the faces' mean squared errors average to the overall one.
    assert face_squared_errors_px(predicted, true).shape == (7,)
    assert math.sqrt(face_squared_errors_px(predicted, true).mean()) == pytest.approx(rmse_px(predicted, true))


def test_loss_to_rmse_px():
    assert loss_to_rmse_px(0.0025) == pytest.approx(2.4)
    assert loss_to_rmse_px(np.array([0.0, 1.0])) == pytest.approx([0.0, 48.0])


def test_score_has_the_overall_and_per_keypoint_errors():
    true = np.zeros((1, 30))
    result = score(true + ONE_PIXEL, true)
    assert result["test_rmse_px"] == pytest.approx(1.0)
    assert result["per_keypoint_rmse_px"] == pytest.approx({name: 1.0 for name in KEYPOINTS})


def test_mean_shape_predicts_the_training_average_for_every_face():
    train = np.array([[0.0] * 30, [0.5] * 30, [1.0] * 30])
    baseline = mean_shape(train, 4)
    assert baseline.shape == (4, 30)
    assert np.all(baseline == 0.5)


def test_predictions_are_batched_without_gradients():
    model = KeypointNet().eval()
    images = np.random.default_rng(0).random((7, 1, 96, 96), dtype=np.float32)
    in_batches = predict(model, images, batch_size=3)
    with torch.no_grad():
        at_once = model(torch.from_numpy(images)).numpy()
    assert isinstance(in_batches, np.ndarray) and in_batches.shape == (7, 30)
    np.testing.assert_allclose(in_batches, at_once, rtol=1e-5, atol=1e-6)
    assert all(parameter.grad is None for parameter in model.parameters())


def test_best_valid_is_the_first_epoch_at_the_lowest_loss():
    assert best_valid(history([0.5, 0.2, 0.3, 0.2])) == (0.2, 2)


def test_first_epoch_reaching_a_target():
    losses = history([0.5, 0.3, 0.2, 0.1])
    assert first_epoch_reaching(losses, 0.3) == 2
    assert first_epoch_reaching(losses, 0.25) == 3
    assert first_epoch_reaching(losses, 0.05) is None


def test_improvement_percent_is_positive_when_lower():
    assert improvement_percent(10.0, 9.0) == pytest.approx(10.0)
    assert improvement_percent(10.0, 11.0) == pytest.approx(-10.0)


def test_the_common_target_is_the_worse_best_so_both_nets_reach_it():
    figures, target = training_comparison({
        "net4": history([0.5, 0.3, 0.2, 0.25]),
        "net5": history([0.4, 0.2, 0.1, 0.15]),
    })
    assert target == 0.2
    assert figures["net4"] == {"best_valid_loss": 0.2, "best_valid_rmse_px": pytest.approx(loss_to_rmse_px(0.2)),
                               "best_epoch": 3, "epoch_reaching_target": 3}
    assert figures["net5"]["best_epoch"] == 3 and figures["net5"]["epoch_reaching_target"] == 2


def face_errors(rmse_px: float, n_faces: int = 40, seed: int = 0) -> np.ndarray:
    """Per-face squared errors px whose overall RMSE is exactly `rmse_px`."""
    errors = np.random.default_rng(seed).uniform(0.5, 1.5, n_faces)
    return errors * rmse_px**2 / errors.mean()


def test_summarize_compares_every_net_with_the_baseline_and_the_first_net():
    per_keypoint = {name: 0.0 for name in KEYPOINTS}
    scores = {
        "net4": {"test_rmse_px": 2.0, "per_keypoint_rmse_px": per_keypoint},
        "net5": {"test_rmse_px": 1.5, "per_keypoint_rmse_px": per_keypoint},
    }
    baseline = {"test_rmse_px": 4.0, "per_keypoint_rmse_px": per_keypoint}
    errors = {"net4": face_errors(2.0, seed=1), "net5": face_errors(1.5, seed=2), "baseline": face_errors(4.0, seed=3)}
    heard = []
    results = summarize(scores, baseline, {"net4": history([0.5, 0.2]), "net5": history([0.4, 0.1])}, errors, 500, 0,
                        progress=lambda done, total: heard.append((done, total)))
    assert heard == [(1, 3), (2, 3), (3, 3)]  # the bootstrap's progress, comparison by comparison
    assert list(results) == ["net4", "net5", "baseline", "comparison"]
    assert results["net5"]["test_rmse_px"] == 1.5 and results["net5"]["best_valid_loss"] == 0.1
    assert results["baseline"] == baseline
    comparison = results["comparison"]
    assert comparison["target_valid_loss"] == 0.2
    assert comparison["test_faces"] == 40 and comparison["bootstrap_resamples"] == 500
    assert comparison["net4_vs_baseline"]["test_rmse_improvement_percent"] == pytest.approx(50.0)
    assert comparison["net5_vs_baseline"]["test_rmse_improvement_percent"] == pytest.approx(62.5)
    net5_vs_net4 = comparison["net5_vs_net4"]
    assert net5_vs_net4["test_rmse_improvement_percent"] == pytest.approx(25.0)
    assert net5_vs_net4["best_valid_loss_improvement_percent"] == pytest.approx(50.0)
    low, high = net5_vs_net4["test_rmse_improvement_interval"]
    assert low < 25.0 < high and net5_vs_net4["significant"] == (low > 0)
    assert net5_vs_net4["test_rmse_improvement_interval"] == improvement_interval(errors["net4"], errors["net5"], 500, 0)
    assert "net4_vs_net4" not in comparison


def test_the_bootstrap_is_paired_so_a_small_consistent_gain_is_significant():
    reference = face_errors(3.0, n_faces=252)
    # 1% lower on every face: resampling the faces moves both models together, so the interval is
    # narrow around the gain; unpaired resamples would give an interval many times wider.
    assert improvement_interval(reference, 0.99**2 * reference, 2000, 0) == [pytest.approx(1.0, abs=0.01)] * 2
    unpaired = resampled_rmse_px(reference, 2000, 0), resampled_rmse_px(0.99**2 * reference, 2000, 1)
    spread = np.percentile(100 * (unpaired[0] - unpaired[1]) / unpaired[0], [2.5, 97.5])
    assert spread[1] - spread[0] > 5


def test_a_difference_within_the_noise_of_the_faces_is_not_significant():
    reference = face_errors(3.0, n_faces=60)
    noisy = reference * np.random.default_rng(5).uniform(0.6, 1.4, len(reference))
    low, high = improvement_interval(reference, noisy, 2000, 0)
    assert low < 0 < high
    assert improvement_interval(reference, noisy, 2000, 0) == [low, high]  # the seed fixes the draws
    assert improvement_interval(reference, noisy, 2000, 1) != [low, high]


def test_the_resamples_do_not_depend_on_how_many_are_drawn_at_once(monkeypatch):
    errors = face_errors(2.0, n_faces=97)
    whole = resampled_rmse_px(errors, 1000, 3)
    monkeypatch.setattr("pipeline.evaluation.metrics.BOOTSTRAP_DRAWS_AT_ONCE", 97 * 7)  # chunks of 7 resamples
    assert np.array_equal(resampled_rmse_px(errors, 1000, 3), whole)
    assert len(whole) == 1000 and whole.mean() == pytest.approx(2.0, rel=0.05)


def test_trainings_that_agree_exactly_give_the_one_level_interval():
    reference = face_errors(3.0, n_faces=80)
    model = reference * np.random.default_rng(2).uniform(0.7, 1.2, len(reference))
    one_level = improvement_interval(reference, model, 2000, 0)
    # Three seeds whose trainings erred alike on every face: drawing seeds adds nothing.
    assert improvement_interval(np.stack([reference] * 3), np.stack([model] * 3), 2000, 0) == one_level
    # (to the last bits of a mean of three equal numbers)
    assert np.allclose(resampled_rmse_px(np.stack([model] * 3), 2000, 0), resampled_rmse_px(model, 2000, 0),
                       rtol=1e-14, atol=0)
    # One seed: the bootstrap of one training, draw for draw.
    assert np.array_equal(resampled_rmse_px(model[None], 2000, 0), resampled_rmse_px(model, 2000, 0))


def test_trainings_that_disagree_widen_the_interval():
    reference = face_errors(3.0, n_faces=80)
    model = 0.9**2 * reference
    one_level = improvement_interval(reference, model, 2000, 0)
    # The seeds' trainings of the model fell out 0.85x, 0.9x and 0.95x of the reference's error on
    # every face (the reference's the same each time): the same mean gain, a seed-to-seed spread.
    spread = np.stack([factor**2 * reference for factor in (0.85, 0.9, 0.95)])
    two_level = improvement_interval(np.stack([reference] * 3), spread, 2000, 0)
    assert one_level[1] - one_level[0] < 0.1  # a consistent 10% on every face: the faces add no doubt
    assert two_level[0] < one_level[0] - 2 and two_level[1] > one_level[1] + 2
    assert two_level[0] == pytest.approx(5.0, abs=0.1) and two_level[1] == pytest.approx(15.0, abs=0.1)


def test_the_resampled_seeds_are_paired_between_models():
    """Row i of every net is seed i: the same seed draws for both, so a seed that is hard for both
    cancels out of their difference."""
    reference = face_errors(3.0, n_faces=50)
    hard_seeds = np.array([1.0, 1.5, 2.0])[:, None]
    net4, net5 = hard_seeds * reference, 0.95**2 * hard_seeds * reference
    low, high = improvement_interval(net4, net5, 2000, 0)
    assert low == pytest.approx(5.0, abs=0.01) and high == pytest.approx(5.0, abs=0.01)


def test_each_keypoint_is_scored_on_the_faces_labelled_for_it_and_no_others():
    true = np.zeros((3, 30))
    true[1, 0:2] = np.nan  # face 1 lacks left_eye_center
    true[:, 2:4] = np.nan  # no face has right_eye_center
    predicted = np.zeros((3, 30))
    predicted[:, 0] = [1, 1000, 3]  # face 1's wild guess where it has no label must not count
    predicted[:, 1] = [1, 1000, 3]
    errors = labelled_keypoint_rmse_px(predicted, true)
    # Faces 0 and 2, x and y: sqrt((1 + 1 + 9 + 9) / 4) scaled units.
    assert errors["left_eye_center"] == pytest.approx(math.sqrt(5) * 48)
    assert errors["right_eye_center"] is None and errors["nose_tip"] == 0.0
    assert labelled_faces(true)["left_eye_center"] == 2 and labelled_faces(true)["nose_tip"] == 3
    assert labelled_faces(true)["right_eye_center"] == 0


def test_a_nets_figures_pool_its_seeds():
    per_keypoint = {name: 1.0 for name in KEYPOINTS}
    one = {"test_rmse_px": 2.0, "per_keypoint_rmse_px": per_keypoint}
    assert pooled_score({42: one}) == one  # one seed: its figures, nothing more
    two = {"test_rmse_px": 3.0, "per_keypoint_rmse_px": {name: 2.0 for name in KEYPOINTS}}
    pooled = pooled_score({1: one, 2: two})
    assert pooled["test_rmse_px"] == 2.5 and set(pooled["per_keypoint_rmse_px"].values()) == {1.5}
    assert pooled["test_rmse_px_sd"] == pytest.approx(math.sqrt(0.5))
    assert pooled["seeds"] == {"1": {"test_rmse_px": 2.0}, "2": {"test_rmse_px": 3.0}}


def test_a_reference_that_errs_by_nothing_gives_no_percentages():
    """Keypoints all at one place: the mean-shape baseline is exact, and a percentage of it is a
    division by zero (or, near zero, millions of percent)."""
    assert improvement_percent(0.0, 1.0) is None
    assert improvement_percent(0.05, 1.0, negligible=NEGLIGIBLE_RMSE_PX) is None
    assert improvement_interval(np.zeros(30), face_errors(1.0, n_faces=30), 200, 0) is None
    per_keypoint = {name: 0.0 for name in KEYPOINTS}
    results = summarize({"net4": {"test_rmse_px": 1.0, "per_keypoint_rmse_px": per_keypoint}},
                        {"test_rmse_px": 0.0, "per_keypoint_rmse_px": per_keypoint}, {"net4": history([0.5, 0.2])},
                        {"net4": face_errors(1.0), "baseline": np.zeros(40)}, 200, 0)
    assert results["comparison"]["net4_vs_baseline"] == {
        "test_rmse_improvement_percent": None, "test_rmse_improvement_interval": None, "significant": False}


def test_rmse_curves_convert_both_losses():
    curves = rmse_curves(history([0.01, 0.0025], train_losses=[0.04, 0.01]))
    assert list(curves.columns) == ["epoch", "train_rmse_px", "valid_rmse_px"]
    assert curves["train_rmse_px"].tolist() == pytest.approx([9.6, 4.8])
    assert curves["valid_rmse_px"].tolist() == pytest.approx([4.8, 2.4])
