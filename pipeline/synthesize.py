"""Stage `synthesize`: the built-in synthetic face set, written in the Kaggle training.csv layout."""

from __future__ import annotations

from pipeline.base.config import load_config
from pipeline.base.reporting import reports_errors
from pipeline.faces.kaggle import write_training_csv
from pipeline.faces.synthetic import render_faces


@reports_errors(memory_knobs="lower synthetic.n_faces")
def main() -> None:
    config = load_config()
    settings = config.synthetic
    images, keypoints = render_faces(settings.n_faces, settings.seed, settings.missing_fraction,
                                     settings.missing_pattern)
    write_training_csv(config.paths.synthetic_csv, images, keypoints)
    print(f"synthesize: {settings.n_faces} faces -> {config.paths.synthetic_csv}")


if __name__ == "__main__":
    main()
