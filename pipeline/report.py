"""reports/comparison.md: the nets against each other and against the mean-shape baseline.

Everything here formats figures that pipeline.metrics computed; nothing is computed again.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.kaggle import KEYPOINTS

BASELINE_LABEL = "mean-shape baseline"
SUMMARY_HEADER = (
    "model", "test RMSE px", "best valid RMSE px", "best valid loss", "best epoch", "epoch reaching target",
)
SEED_IMPROVEMENT = ("The seed reports net5's valid loss about 10% below net4's "
                    "(0.001260 against 0.001387 after 1000 epochs).")


def summary_rows(results: dict, nets: list[str]) -> list[tuple[str, ...]]:
    """One row per net and one for the baseline, under SUMMARY_HEADER; for the console and the report."""
    rows = [
        (
            net,
            f"{results[net]['test_rmse_px']:.3f}",
            f"{results[net]['best_valid_rmse_px']:.3f}",
            f"{results[net]['best_valid_loss']:.6f}",
            str(results[net]["best_epoch"]),
            _epoch(results[net]["epoch_reaching_target"]),
        )
        for net in nets
    ]
    return rows + [(BASELINE_LABEL, f"{results['baseline']['test_rmse_px']:.3f}", "-", "-", "-", "-")]


def comparison_lines(results: dict, nets: list[str]) -> list[str]:
    """The computed comparison in words, one sentence per line."""
    comparison = results["comparison"]
    reference, *others = nets
    lines = [
        f"Target valid loss {comparison['target_valid_loss']:.6f} ({comparison['target_valid_rmse_px']:.3f} px): "
        "the larger of the nets' best valid losses, so that every net reaches it and the epoch it "
        "first does so can be compared."
    ]
    lines += [
        f"{net}: test RMSE {_lower_or_higher(comparison[f'{net}_vs_baseline']['test_rmse_improvement_percent'])} "
        "than the mean-shape baseline."
        for net in nets
    ]
    lines += [
        f"{net} against {reference}: test RMSE "
        f"{_lower_or_higher(comparison[f'{net}_vs_{reference}']['test_rmse_improvement_percent'])}, "
        f"best valid loss "
        f"{_lower_or_higher(comparison[f'{net}_vs_{reference}']['best_valid_loss_improvement_percent'])}."
        for net in others
    ]
    return lines


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [header, tuple("---" for _ in header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to line up in a terminal."""
    widths = [max(len(cells[column]) for cells in (header, *rows)) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
                     for cells in (header, *rows))


def comparison_markdown(results: dict, nets: list[str], run_ids: dict[str, str | None], data_hash: str,
                        n_test: int, pictures: dict[str, Path], report: Path) -> str:
    """The whole report; pictures are linked relative to the report's folder so that it renders in place."""
    labels = [*nets, "baseline"]
    keypoint_rows = [
        (name, *(f"{results[label]['per_keypoint_rmse_px'][name]:.3f}" for label in labels))
        for name in KEYPOINTS
    ]
    runs = ", ".join(f"{net} `{run_ids[net] or 'not logged'}`" for net in nets)
    images = "\n\n".join(
        f"![{title}]({Path(os.path.relpath(path, Path(report).parent)).as_posix()})" for title, path in pictures.items()
    )
    return "\n".join([
        f"# {' vs '.join(nets)} on the held-out test faces",
        "",
        f"{n_test} test faces, data hash `{data_hash}`. MLflow runs: {runs}.",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(results, nets)),
        "",
        "## Comparison",
        "",
        *(f"- {line}" for line in comparison_lines(results, nets)),
        f"- {SEED_IMPROVEMENT}",
        "",
        "## Test RMSE per keypoint (px)",
        "",
        markdown_table(("keypoint", *nets, BASELINE_LABEL), keypoint_rows),
        "",
        "## Pictures",
        "",
        images,
        "",
    ])


def _lower_or_higher(improvement_percent: float) -> str:
    return f"{abs(improvement_percent):.1f}% {'lower' if improvement_percent >= 0 else 'higher'}"


def _epoch(epoch: int | None) -> str:
    return "-" if epoch is None else str(epoch)
