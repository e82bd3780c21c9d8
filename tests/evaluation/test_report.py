from pathlib import Path

import pytest

from pipeline.evaluation.report import answer, comparison_lines, comparison_markdown, markdown_table, summary_rows, text_table
from pipeline.faces.data import loss_to_rmse_px
from pipeline.faces.kaggle import KEYPOINTS


def compared(improvement, interval):
    return {"test_rmse_improvement_percent": improvement, "test_rmse_improvement_interval": interval,
            "significant": interval is not None and (interval[0] > 0 or interval[1] < 0)}


def results():
    def net(test_rmse, best_loss, best_epoch, reaching):
        return {"test_rmse_px": test_rmse, "per_keypoint_rmse_px": {name: test_rmse for name in KEYPOINTS},
                "labelled_keypoint_rmse_px": {name: test_rmse + 0.5 for name in KEYPOINTS},
                "best_valid_loss": best_loss, "best_valid_rmse_px": loss_to_rmse_px(best_loss),
                "best_epoch": best_epoch, "epoch_reaching_target": reaching}
    return {
        "net4": net(2.0, 0.0025, 40, 40),
        "net5": net(1.5, 0.0016, 38, 30),
        "baseline": {"test_rmse_px": 4.0, "per_keypoint_rmse_px": {name: 4.0 for name in KEYPOINTS},
                     "labelled_keypoint_rmse_px": {name: 4.5 for name in KEYPOINTS}},
        "comparison": {
            "target_valid_loss": 0.0025, "target_valid_rmse_px": 2.4, "test_faces": 13, "seeds": 1, "bootstrap_resamples": 2000,
            "labelled_faces": {name: 13 if name == "nose_tip" else 20 for name in KEYPOINTS},
            "net4_vs_baseline": compared(50.0, [41.2, 58.0]),
            "net5_vs_baseline": compared(62.5, [55.0, 69.9]),
            "net5_vs_net4": {**compared(25.0, [-3.1, 44.4]), "best_valid_loss_improvement_percent": -36.0},
        },
    }


@pytest.fixture
def report():
    return comparison_markdown(
        results(), ["net4", "net5"], "c13413419aaa2f63", 13,
        {"Learning curves": Path("plots/learning_curves.png"), "Test faces": Path("plots/test_predictions.png")},
        Path("reports/comparison.md"), "facial-keypoints",
    )


def test_the_summary_table_lists_both_nets_and_the_baseline(report):
    assert "| net4 | 2.000 | 2.400 | 0.002500 | 40 | 40 |" in report
    assert "| net5 | 1.500 | 1.920 | 0.001600 | 38 | 30 |" in report
    assert "| mean-shape baseline | 4.000 | - | - | - | - |" in report


def test_the_comparison_is_in_words(report):
    assert "Target valid loss 0.002500 (2.400 px)" in report
    assert "net4: test RMSE 50.0% lower than the mean-shape baseline (95% interval 41.2% to 58.0%)." in report
    assert ("net5 against net4: test RMSE 25.0% lower than net4 (95% interval -3.1% to 44.4%, not significant), "
            "best valid loss 36.0% higher.") in report
    assert "of 2000 paired bootstrap resamples of the 13 test faces" in report
    assert "about 10%" in report  # the seed's figure, for reference


def test_the_report_opens_with_the_verdict_then_the_figures_behind_it(report):
    assert report.splitlines()[0] == (
        "# Against net4 in test RMSE, net5 is not significantly different (-25.0%, 95% interval -44.4 to +3.1, 1 seed x 13 test faces); "
        "both beat the mean-shape baseline")
    significant = results()
    significant["comparison"]["net5_vs_net4"].update(compared(25.0, [10.0, 40.0]))
    assert answer(significant, ["net4", "net5"]).startswith(
        "Against net4 in test RMSE, net5 beats it (-25.0%, 95% interval -40.0 to -10.0, 1 seed x 13 test faces);")


def test_the_answer_says_which_net_trails_or_misses_the_baseline_and_that_first():
    worse, tied = results(), results()
    worse["comparison"]["net5_vs_net4"].update(compared(-12.34, [-20.0, -4.5]))
    worse["comparison"]["net5_vs_baseline"].update(compared(-3.0, [-9.0, 2.0]))
    assert answer(worse, ["net4", "net5"]) == (
        "Against net4 in test RMSE, net5 trails (+12.3%, 95% interval +4.5 to +20.0, 1 seed x 13 test faces); "
        "only net4 beats the mean-shape baseline")
    tied["comparison"]["net5_vs_net4"].update(compared(-0.04, [-0.9, 0.04]))
    for net in ("net4", "net5"):
        tied["comparison"][f"{net}_vs_baseline"].update(compared(-1.0, [-2.0, 0.5]))
    assert answer(tied, ["net4", "net5"]) == (
        "No net beats the mean-shape baseline; against net4 in test RMSE, net5 is not significantly different "
        "(+0.04%, 95% interval -0.04 to +0.90, 1 seed x 13 test faces)")


def test_an_interval_near_zero_keeps_its_signs():
    narrow = results()
    narrow["comparison"]["net5_vs_net4"].update(compared(0.19, [-0.01, 0.39]))
    assert answer(narrow, ["net4", "net5"]).startswith(
        "Against net4 in test RMSE, net5 is not significantly different (-0.19%, 95% interval -0.39 to +0.01, 1 seed x 13 test faces);")
    assert "(95% interval -0.01% to 0.39%, not significant)" in "".join(comparison_lines(narrow, ["net4", "net5"]))
    tiny = results()
    tiny["comparison"]["net5_vs_net4"].update(compared(0.1, [0.0004, 0.2]))
    assert "(-0.100%, 95% interval -0.200 to -0.000, 1 seed x 13 test faces)" in answer(tiny, ["net4", "net5"])  # at most 3 decimals


def test_the_answer_with_three_nets_fits_230_characters():
    three = results()
    three["net6"] = three["net5"]
    three["comparison"]["net6_vs_baseline"] = compared(33.33, [20.12, 44.44])
    three["comparison"]["net6_vs_net4"] = compared(-12.35, [-25.55, -0.04])
    three["comparison"]["net4_vs_baseline"].update(compared(-1.0, [-2.0, 0.5]))
    line = answer(three, ["net4", "net5", "net6"])
    assert line == (
        "Against net4 in test RMSE, net5 is not significantly different (-25.0%, 95% interval -44.4 to +3.1, "
        "1 seed x 13 test faces) and net6 trails (+12.35%, +0.04 to +25.55); only net5 and net6 beat the mean-shape baseline")
    assert len(line) <= 230  # a heading that still reads as one line, with what supports it


def test_an_exact_baseline_gives_words_not_a_division_by_zero():
    exact = results()
    exact["baseline"]["test_rmse_px"] = 0.0
    for net in ("net4", "net5"):
        exact["comparison"][f"{net}_vs_baseline"].update(compared(None, None))
    assert answer(exact, ["net4", "net5"]).startswith(
        "The mean-shape baseline is exact on these faces: their keypoints do not vary, so no net can be judged on "
        "them; against net4")
    assert ("net4: test RMSE not comparable with the mean-shape baseline's, which is next to nothing."
            in comparison_lines(exact, ["net4", "net5"]))


def test_lineage_and_pictures(report):
    assert "net4 vs net5 on 13 held-out test faces, data hash `c13413419aaa2f63`" in report
    assert "experiment `facial-keypoints`" in report
    # Relative to reports/, so that the pictures show wherever the repository is rendered.
    assert "![Learning curves](../plots/learning_curves.png)" in report
    assert "![Test faces](../plots/test_predictions.png)" in report


def test_one_row_per_keypoint(report):
    assert "| keypoint | net4 | net5 | mean-shape baseline |" in report
    assert "| nose_tip | 2.000 | 1.500 | 4.000 |" in report
    assert sum(line.startswith("| mouth_") for line in report.splitlines()) == 8  # the complete faces', every labelled
    assert "| keypoint | labelled test faces | net4 | net5 | mean-shape baseline |" in report
    assert "| nose_tip | 13 | 2.500 | 2.000 | 4.500 |" in report
    assert "| left_eye_center | 20 | 2.500 | 2.000 | 4.500 |" in report


def test_tables():
    header, rows = ("a", "bb"), [("ccc", "d")]
    assert markdown_table(header, rows) == "| a | bb |\n| --- | --- |\n| ccc | d |"
    assert text_table(header, rows) == "a    bb\nccc  d"
    assert len(summary_rows(results(), ["net4", "net5"])) == 3

