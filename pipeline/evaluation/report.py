"""reports/comparison.md: the nets against each other and against the mean-shape baseline.

Everything here formats figures that pipeline.evaluation.metrics computed; nothing is computed again.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.base.text import counted
from pipeline.faces.kaggle import KEYPOINTS

BASELINE_LABEL = "mean-shape baseline"
SUMMARY_HEADER = (
    "model", "test RMSE px", "best valid RMSE px", "best valid loss", "best epoch", "epoch reaching target",
)
# The most decimals a signed percentage of the first line gets to keep its sign (_signed_percents).
SIGN_DECIMALS = 3
SEED_IMPROVEMENT = ("The seed reports net5's valid loss about 10% below net4's "
                    "(0.001260 against 0.001387 after 1000 epochs).")


def summary_rows(results: dict, nets: list[str]) -> list[tuple[str, ...]]:
    """One row per net (or composite) and one for the baseline, under SUMMARY_HEADER; for the console and
    the report. A composite trained no history of its own: its training columns are "-"."""
    rows = [
        (
            net,
            f"{results[net]['test_rmse_px']:.3f}"
            + (f" ± {results[net]['test_rmse_px_sd']:.3f} sd" if "test_rmse_px_sd" in results[net] else ""),
            *((f"{results[net]['best_valid_rmse_px']:.3f}", f"{results[net]['best_valid_loss']:.6f}",
               str(results[net]["best_epoch"]), _epoch(results[net]["epoch_reaching_target"]))
              if "best_valid_loss" in results[net] else ("-",) * 4),
        )
        for net in nets
    ]
    return rows + [(BASELINE_LABEL, f"{results['baseline']['test_rmse_px']:.3f}", "-", "-", "-", "-")]


def answer(results: dict, nets: list[str]) -> str:
    """The report's first line: the verdicts the data supports, each with the figures behind it (the
    rest is in the table). Each net is judged against the first (as the seed compares net5 with net4)
    by whether its interval excludes 0, and every net against the mean-shape baseline; when no net
    beats the baseline, that comes first, since it outweighs any ranking of the nets."""
    reference, *others = nets
    verdicts = [_against_reference(results, reference, others), _baseline_verdict(results, nets)]
    if not any(_beats_baseline(results, net) for net in nets):
        verdicts.reverse()
    line = "; ".join(filter(None, verdicts))
    return line if line.startswith(tuple(nets)) else line[0].upper() + line[1:]


def comparison_lines(results: dict, nets: list[str]) -> list[str]:
    """The computed comparison in words, one sentence per line."""
    comparison = results["comparison"]
    reference, *others = nets
    lines = [
        f"Target valid loss {comparison['target_valid_loss']:.6f} ({comparison['target_valid_rmse_px']:.3f} px): "
        "the larger of the nets' best valid losses, so that every net reaches it and the epoch it "
        "first does so can be compared."
    ] if comparison["target_valid_loss"] is not None else []
    lines += [
        f"{net}: test RMSE {_relative(comparison[f'{net}_vs_baseline'], 'the mean-shape baseline')}."
        for net in nets
    ]
    lines += [
        f"{net} against {reference}: test RMSE {_relative(comparison[f'{net}_vs_{reference}'], reference)}"
        f"{_best_valid(comparison[f'{net}_vs_{reference}'])}."
        for net in others
    ]
    if comparison["seeds"] > 1:
        pooled = (f"Each net's figure is its mean over {comparison['seeds']} trainings (train.seeds), the table's "
                  "curves and epochs its first seed's. Intervals: 95%, of "
                  f"{comparison['bootstrap_resamples']} paired two-level bootstrap resamples: the seeds drawn with "
                  f"replacement and the {counted(comparison['test_faces'], 'test face')} drawn with replacement, "
                  "the same draws for both models; they cover both the choice of test faces and the training's "
                  "own randomness")
    else:
        pooled = (f"Intervals: 95%, of {comparison['bootstrap_resamples']} paired bootstrap resamples of the "
                  f"{counted(comparison['test_faces'], 'test face')} (both models scored on the same resampled "
                  "faces). They cover the choice of test faces, not the training's own randomness (its seed): "
                  "list several in train.seeds to cover it too (docs/evaluation.md)")
    return lines + [f"{pooled}. A difference is significant where its interval excludes 0."]


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [header, tuple("---" for _ in header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to line up in a terminal."""
    widths = [max(len(cells[column]) for cells in (header, *rows)) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
                     for cells in (header, *rows))


def comparison_markdown(results: dict, nets: list[str], data_hash: str, n_test: int, pictures: dict[str, Path],
                        report: Path, experiment: str, composites: dict[str, tuple[str, ...]] | None = None) -> str:
    """The whole report; pictures are linked relative to the report's folder so that it renders in place.
    `experiment` is the MLflow experiment that holds the nets' runs. `nets` are the predictors compared,
    full nets and `composites` (each with its member nets), which are said in a paragraph of their own."""
    composites = composites or {}
    labels = [*nets, "baseline"]
    keypoint_rows = [
        (name, *(f"{results[label]['per_keypoint_rmse_px'][name]:.3f}" for label in labels))
        for name in KEYPOINTS
    ]
    labelled = results["comparison"]["labelled_faces"]
    labelled_rows = [
        (name, str(labelled[name]), *(_px(results[label]["labelled_keypoint_rmse_px"][name]) for label in labels))
        for name in KEYPOINTS
    ]
    images = "\n\n".join(
        f"![{title}]({Path(os.path.relpath(path, Path(report).parent)).as_posix()})" for title, path in pictures.items()
    )
    # Nothing that changes from one run of the stage to the next (a run id, a time): the report is
    # committed, and the same results must give the same file.
    return "\n".join([
        f"# {answer(results, nets)}",
        "",
        f"{' vs '.join(nets)} on {n_test} held-out test faces, data hash `{data_hash}`. Each net's training run "
        f"in MLflow (experiment `{experiment}`, named after the net) has every epoch and, under `evaluation/`, "
        "these figures and pictures.",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(results, nets)),
        "",
        *kept_weights_paragraph(results, nets),
        *composites_paragraph(composites),
        "## Comparison",
        "",
        *(f"- {line}" for line in comparison_lines(results, nets)),
        f"- {SEED_IMPROVEMENT}",
        "",
        "## Test RMSE per keypoint (px)",
        "",
        markdown_table(("keypoint", *nets, BASELINE_LABEL), keypoint_rows),
        "",
        "## Test RMSE per keypoint over every labelled test face (px)",
        "",
        f"Each keypoint on every test face labelled for it: the {n_test} complete ones and those that lack some "
        "other keypoint (prepare's incomplete test portion), so a keypoint labelled on most faces is judged "
        "on most faces.",
        "",
        markdown_table(("keypoint", "labelled test faces", *nets, BASELINE_LABEL), labelled_rows),
        "",
        "## Pictures",
        "",
        images,
        "",
    ])


def kept_weights_paragraph(results: dict, nets: list[str]) -> list[str]:
    """The epoch whose weights each net's test figures are of (kept_epoch of models/<net>.json: the
    lowest valid loss's with train.keep: best), as a paragraph; none for models that do not say."""
    kept = [f"{net}'s of epoch {results[net]['kept_epoch']}" for net in nets
            if results[net].get("kept_epoch") is not None]
    return [f"The test figures are those of the weights each training kept: {', '.join(kept)}.", ""] if kept else []


def composites_paragraph(composites: dict[str, tuple[str, ...]]) -> list[str]:
    """What each composite is made of, as a paragraph; none without composites. Its training columns
    are "-": each of its nets trained on its own keypoints, with a history of its own."""
    if not composites:
        return []
    made = [f"{name} puts {' and '.join(members)} side by side" for name, members in composites.items()]
    return [f"Composites (params.yaml `composites`): {'; '.join(made)}, each net answering its own keypoints. "
            "A composite has no training of its own, hence no valid loss: its nets' runs in MLflow have theirs, "
            "and its own run, named after it, holds its model and these figures.", ""]


def _beats_baseline(results: dict, net: str) -> bool:
    improvement = results["comparison"][f"{net}_vs_baseline"]["test_rmse_improvement_percent"]
    return improvement is not None and improvement > 0


def _against_reference(results: dict, reference: str, others: list[str]) -> str:
    """Whether each other net beats the reference, trails it or is not significantly different, with
    its change of test RMSE, signed, and that change's interval."""
    clauses = []
    for net in others:
        figures = results["comparison"][f"{net}_vs_{reference}"]
        improvement, interval = figures["test_rmse_improvement_percent"], figures["test_rmse_improvement_interval"]
        if improvement is None or interval is None:
            clauses.append(f"{net} cannot be compared ({reference}'s error is next to nothing)")
            continue
        if not figures["significant"]:
            outcome = "is not significantly different"
        else:
            outcome = "beats it" if improvement > 0 else "trails"
        # A change of RMSE: the improvement negated, its interval's bounds negated and swapped.
        change, low, high = _signed_percents(-improvement, -interval[1], -interval[0])
        support = "" if clauses else f", {_support(results['comparison'])}"
        clauses.append(f"{net} {outcome} ({change}%, {'95% interval ' if not clauses else ''}{low} to {high}{support})")
    return f"against {reference} in test RMSE, {' and '.join(clauses)}" if clauses else ""


def _support(comparison: dict) -> str:
    """What the comparisons rest on: "3 seeds x 252 test faces"."""
    return f"{counted(comparison['seeds'], 'seed')} x {counted(comparison['test_faces'], 'test face')}"


def _baseline_verdict(results: dict, nets: list[str]) -> str:
    if all(results["comparison"][f"{net}_vs_baseline"]["test_rmse_improvement_percent"] is None for net in nets):
        return f"the {BASELINE_LABEL} is exact on these faces: their keypoints do not vary, so no net can be judged on them"
    beating = [net for net in nets if _beats_baseline(results, net)]
    if not beating:
        return f"no net beats the {BASELINE_LABEL}"
    if len(beating) == len(nets):
        subject = {1: nets[0], 2: "both"}.get(len(nets), "all")
    else:
        subject = f"only {' and '.join(beating)}"
    return f"{subject} {'beats' if len(beating) == 1 else 'beat'} the {BASELINE_LABEL}"


def _signed_percents(*values: float) -> list[str]:
    """Signed figures at the precision that keeps their signs (_decimals)."""
    decimals = _decimals(*values)
    # + 0.0 turns a -0.0 into 0.0.
    return [f"{value + 0.0:+.{decimals}f}" for value in values]


def _decimals(*values: float) -> int:
    """One decimal, or as many more (up to SIGN_DECIMALS) as keep every non-zero value off zero: an
    interval of [-0.39, 0.01] prints as -0.39% to +0.01%, not -0.4% to +0.0%."""
    return next((decimals for decimals in range(1, SIGN_DECIMALS)
                 if all(value == 0 or round(value, decimals) != 0 for value in values)), SIGN_DECIMALS)


def _relative(figures: dict, reference: str) -> str:
    """A comparison's test RMSE difference in words, with its interval."""
    if figures["test_rmse_improvement_percent"] is None:
        return f"not comparable with {reference}'s, which is next to nothing"
    return (f"{_percent(figures['test_rmse_improvement_percent'])} than {reference} (95% interval "
            f"{_interval(figures)}{'' if figures['significant'] else ', not significant'})")


def _best_valid(figures: dict) -> str:
    """The clause comparing best valid losses, where both models trained (a composite did not)."""
    if "best_valid_loss_improvement_percent" not in figures:
        return ""
    return f", best valid loss {_percent(figures['best_valid_loss_improvement_percent'])}"


def _percent(improvement_percent: float | None) -> str:
    if improvement_percent is None:
        return "not comparable (the reference is zero)"
    return f"{abs(improvement_percent):.1f}% {'lower' if improvement_percent >= 0 else 'higher'}"


def _interval(figures: dict) -> str:
    """The interval of the difference as the sentence states it: of the reduction where the model errs
    less, of the increase where it errs more (both bounds then change sign)."""
    interval, improvement = figures["test_rmse_improvement_interval"], figures["test_rmse_improvement_percent"]
    if interval is None:
        return "undefined"
    low, high = interval if improvement is None or round(improvement, 1) >= 0 else (-interval[1], -interval[0])
    decimals = _decimals(low, high)
    # + 0.0 turns the -0.0 of a bound rounded to zero into 0.0.
    return f"{round(low, decimals) + 0.0:.{decimals}f}% to {round(high, decimals) + 0.0:.{decimals}f}%"


def _px(rmse: float | None) -> str:
    return "-" if rmse is None else f"{rmse:.3f}"


def _epoch(epoch: int | None) -> str:
    return "-" if epoch is None else str(epoch)
