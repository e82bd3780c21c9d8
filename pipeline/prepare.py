"""Stage `prepare`: the chosen CSV -> shuffled, scaled faces, the complete ones split into train and test,
and apart from them the incomplete ones (some keypoints unlabelled), split alike."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.base.config import load_config
from pipeline.base.errors import PipelineError
from pipeline.base.params_file import PARAMS_FILE
from pipeline.base.reporting import reports_errors
from pipeline.base.text import counted
from pipeline.evaluation.plots import face_grid
from pipeline.faces.data import LoadReport, StoredFaces, content_hash, load_split, save_prepared, unscale_keypoints

N_SAMPLE_FACES = 16
TEST_FRACTION = "prepare.test_fraction"
# The train stage fits on part of the training portion and validates on the rest: one face each at least.
MIN_TRAINABLE = 2
# Fewer faces than these still train and score, but the figures say little: a warning says so.
FEW_TRAIN_FACES = 50
FEW_TEST_FACES = 10


@reports_errors(memory_knobs="use fewer faces (a smaller data.csv, or synthetic.n_faces)")
def main() -> None:
    config = load_config()
    source = config.source_csv
    fraction = config.prepare.test_fraction
    prepared = load_split(source, config.prepare.seed, fraction, TEST_FRACTION)
    train, test, report = prepared.train, prepared.test, prepared.report
    train_incomplete, test_incomplete = prepared.train_incomplete, prepared.test_incomplete
    warn_of_repeats(source, report)
    check_portions(train, test, fraction)
    paths = config.paths
    n_repeated = len(report.repeated) + len(report.repeated_incomplete)
    summary = save_prepared(paths.prepared_summary, {
        paths.train_faces: train, paths.test_faces: test,
        paths.train_incomplete_faces: train_incomplete, paths.test_incomplete_faces: test_incomplete,
    }, {
        "source": str(source),
        # n_rows is the sum of the six counts after it.
        "n_rows": report.n_rows,
        "n_dropped_unlabelled": report.n_unlabelled,
        "n_dropped_repeated": n_repeated,
        "n_train": len(train),
        "n_test": len(test),
        "n_train_incomplete": len(train_incomplete),
        "n_test_incomplete": len(test_incomplete),
        # The hash of the complete portions alone, what the nets train and are scored on: the same value as
        # before incomplete faces were kept, so that models/<net>.json and the runs' tags still match it. The
        # incomplete portions have a hash of their own, for whatever comes to train on them.
        "data_hash": content_hash(train, test),
        "incomplete_hash": content_hash(train_incomplete, test_incomplete),
    })
    samples = train.take(slice(0, N_SAMPLE_FACES))
    face_grid(
        Path(paths.plots) / "samples.png",
        images=samples.pixels[:, 0],
        keypoints=unscale_keypoints(samples.keypoints),
        title=f"{N_SAMPLE_FACES} training faces from {source}",
    )
    print(
        f"prepare: {source}: {report.n_rows} rows, {report.n_unlabelled} dropped for lacking every keypoint, "
        f"{n_repeated} for repeating another row's image, "
        f"{len(train)} train + {len(test)} test, and {len(train_incomplete)} + {len(test_incomplete)} lacking "
        f"some keypoints, data hash {summary['data_hash']}"
    )


def warn_of_repeats(source: Path, report: LoadReport) -> None:
    """A line for the complete rows dropped for repeating an image, one for the incomplete rows (faces.data.first_copies)."""
    if report.repeated:
        line, original = next(iter(report.repeated.items()))
        print(f"warning: {source}: {len(report.repeated)} complete rows repeat the image of an earlier row (line {line} "
              f"repeats line {original}) and were dropped, so that no face is both trained on and tested on",
              file=sys.stderr)
    if report.repeated_incomplete:
        line, original = next(iter(report.repeated_incomplete.items()))
        print(f"warning: {source}: {counted(len(report.repeated_incomplete), 'incomplete row')} "
              f"{'repeats' if len(report.repeated_incomplete) == 1 else 'repeat'} the image of a complete row or of an earlier incomplete one (line {line} repeats line {original}) and were dropped, "
              "so that no face is both trained on and tested on", file=sys.stderr)


def check_portions(train: StoredFaces, test: StoredFaces, fraction: float) -> None:
    """Refuse a training portion the train stage cannot fit and validate on; warn, in one line, of
    portions so small that the training or its test figures say little."""
    if len(train) < MIN_TRAINABLE:
        raise PipelineError(
            f"{PARAMS_FILE}: {TEST_FRACTION}: {fraction} of {counted(len(train) + len(test), 'face')} leaves {len(train)} "
            f"to train on, and the train stage needs {MIN_TRAINABLE} (one to fit, one to validate): use more faces "
            "or a smaller fraction"
        )
    few = [f"{counted(count, 'face')} to {use} (fewer than {least})"
           for count, use, least in ((len(train), "train on", FEW_TRAIN_FACES), (len(test), "test on", FEW_TEST_FACES))
           if count < least]
    if few:
        print(f"warning: only {' and '.join(few)}: the net and its test figures will say little; use more faces or "
              f"another {TEST_FRACTION} ({fraction})", file=sys.stderr)


if __name__ == "__main__":
    main()
