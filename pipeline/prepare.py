"""Stage `prepare`: the chosen CSV -> complete, shuffled, scaled faces split into train and test."""

from __future__ import annotations

from pathlib import Path

from pipeline.base.config import load_config
from pipeline.base.errors import reports_errors
from pipeline.base.files import write_json
from pipeline.evaluation.plots import face_grid
from pipeline.faces.data import content_hash, load, pixels_of, save_faces, split, unscale_keypoints

N_SAMPLE_FACES = 16


@reports_errors
def main() -> None:
    config = load_config()
    source = config.source_csv
    faces, report = load(source, seed=config.prepare.seed)
    train, test = split(faces, config.prepare.test_fraction, seed=config.prepare.seed)
    save_faces(config.paths.train_faces, train)
    save_faces(config.paths.test_faces, test)
    summary = {
        "source": str(source),
        "n_rows": report.n_rows,
        "n_dropped_incomplete": report.n_dropped,
        "n_train": len(train),
        "n_test": len(test),
        "data_hash": content_hash(train, test),
    }
    write_json(config.paths.prepared_summary, summary)
    samples = train.take(slice(0, N_SAMPLE_FACES))
    face_grid(
        Path(config.paths.plots) / "samples.png",
        images=pixels_of(samples.X[:, 0]),
        keypoints=unscale_keypoints(samples.y),
        title=f"{N_SAMPLE_FACES} training faces from {source}",
    )
    print(
        f"prepare: {source}: {report.n_rows} rows, {report.n_dropped} dropped for missing keypoints, "
        f"{len(train)} train + {len(test)} test, data hash {summary['data_hash']}"
    )


if __name__ == "__main__":
    main()
