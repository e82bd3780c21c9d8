from pathlib import Path

import pytest

from pipeline.evaluation.report import answer, comparison_markdown, markdown_table, summary_rows, text_table
from pipeline.faces.data import loss_to_rmse_px
from pipeline.faces.kaggle import KEYPOINTS


def results():
    def net(test_rmse, best_loss, best_epoch, reaching):
        return {"test_rmse_px": test_rmse, "per_keypoint_rmse_px": {name: test_rmse for name in KEYPOINTS},
                "best_valid_loss": best_loss, "best_valid_rmse_px": loss_to_rmse_px(best_loss),
                "best_epoch": best_epoch, "epoch_reaching_target": reaching}
    return {
        "net4": net(2.0, 0.0025, 40, 40),
        "net5": net(1.5, 0.0016, 38, 30),
        "baseline": {"test_rmse_px": 4.0, "per_keypoint_rmse_px": {name: 4.0 for name in KEYPOINTS}},
        "comparison": {
            "target_valid_loss": 0.0025, "target_valid_rmse_px": 2.4,
            "net4_vs_baseline": {"test_rmse_improvement_percent": 50.0},
            "net5_vs_baseline": {"test_rmse_improvement_percent": 62.5},
            "net5_vs_net4": {"test_rmse_improvement_percent": 25.0, "best_valid_loss_improvement_percent": -36.0},
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
    assert "net4: test RMSE 50.0% lower than the mean-shape baseline." in report
    assert "net5 against net4: test RMSE 25.0% lower, best valid loss 36.0% higher." in report
    assert "about 10%" in report  # the seed's figure, for reference


def test_the_report_opens_with_the_answer(report):
    assert report.splitlines()[0] == ("# net5 beats net4 by 25.0% on the test faces (1.50 vs 2.00 px RMSE); "
                                      "both beat the mean-shape baseline (4.00 px)")


def test_the_answer_says_which_net_trails_ties_or_misses_the_baseline():
    worse, tied = results(), results()
    worse["comparison"]["net5_vs_net4"]["test_rmse_improvement_percent"] = -12.34
    worse["comparison"]["net5_vs_baseline"]["test_rmse_improvement_percent"] = -3.0
    assert answer(worse, ["net4", "net5"]).startswith("net5 trails net4 by 12.3% on the test faces")
    assert answer(worse, ["net4", "net5"]).endswith("; only net4 beats the mean-shape baseline (4.00 px)")
    tied["comparison"]["net5_vs_net4"]["test_rmse_improvement_percent"] = -0.04  # printed as 0.0%
    for net in ("net4", "net5"):
        tied["comparison"][f"{net}_vs_baseline"]["test_rmse_improvement_percent"] = -1.0
    assert answer(tied, ["net4", "net5"]) == ("net5 ties with net4 on the test faces (1.50 vs 2.00 px RMSE); "
                                              "no net beats the mean-shape baseline (4.00 px)")


def test_lineage_and_pictures(report):
    assert "net4 vs net5 on 13 held-out test faces, data hash `c13413419aaa2f63`" in report
    assert "experiment `facial-keypoints`" in report
    # Relative to reports/, so that the pictures show wherever the repository is rendered.
    assert "![Learning curves](../plots/learning_curves.png)" in report
    assert "![Test faces](../plots/test_predictions.png)" in report


def test_one_row_per_keypoint(report):
    assert "| keypoint | net4 | net5 | mean-shape baseline |" in report
    assert "| nose_tip | 2.000 | 1.500 | 4.000 |" in report
    assert sum(line.startswith("| mouth_") for line in report.splitlines()) == 4


def test_tables():
    header, rows = ("a", "bb"), [("ccc", "d")]
    assert markdown_table(header, rows) == "| a | bb |\n| --- | --- |\n| ccc | d |"
    assert text_table(header, rows) == "a    bb\nccc  d"
    assert len(summary_rows(results(), ["net4", "net5"])) == 3

