"""Peak memory of `prepare` on a large Kaggle-layout CSV and of `predict` on many images.

Usage: python -m benchmarks.memory --workdir DIR [--csv-gb 2] [--images 100000] [--code DIR ...]

Writes the inputs under --workdir (a CSV of --csv-gb gigabytes of complete rows of random faces;
--images 96x96 PNG files, about 9.5 kB each, named short enough for 100,000 of them to fit in one
command line), then, for each --code folder (a checkout of the
project; default: this one), runs `python -m pipeline.prepare` and `python -m pipeline.predict` of
that code in a scratch project under --workdir, one process at a time, and prints each command's
peak resident memory (the kernel's ru_maxrss of the finished process) and its time. Delete
--workdir afterwards: the inputs take about 3 GB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.faces.kaggle import COLUMNS, KAGGLE_MEANS, N_PIXELS

ROOT = Path(__file__).resolve().parents[1]
ROWS_AT_ONCE = 500
IMAGES = "i"
# An untrained net predicts as fast as a trained one; its weights, saved as the train stage saves them.
MAKE_MODEL = ("import torch; from pipeline.base.model import KeypointNet; from pipeline.base.weights import save_model; "
              "torch.manual_seed(0); save_model('models/net5.pt', KeypointNet())")


def write_csv(path: Path, gigabytes: float) -> int:
    """Complete rows of random faces until the file holds `gigabytes`; the number of rows."""
    rng = np.random.default_rng(0)
    rows = 0
    with path.open("w") as stream:
        stream.write(",".join(COLUMNS) + "\n")
        while stream.tell() < gigabytes * 1e9:
            keypoints = np.clip(KAGGLE_MEANS + rng.normal(0, 2, (ROWS_AT_ONCE, len(KAGGLE_MEANS))), 0, 96)
            pixels = rng.integers(0, 256, (ROWS_AT_ONCE, N_PIXELS))
            stream.writelines(",".join(f"{value:.6f}" for value in row) + "," + " ".join(map(str, image)) + "\n"
                              for row, image in zip(keypoints, pixels.tolist()))
            rows += ROWS_AT_ONCE
    return rows


def write_images(folder: Path, count: int) -> list[str]:
    """The images' names relative to the project, which links `folder` as i/ (Pillow needs no suffix)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = [np.base_repr(index, 36) for index in range(count)]
    for name in names:
        if not (folder / name).exists():
            Image.fromarray(rng.integers(0, 256, (96, 96), dtype=np.uint8)).save(folder / name, format="PNG")
    return [f"{IMAGES}/{name}" for name in names]


def peak(project: Path, *command: str) -> tuple[float, float]:
    """The command's peak resident memory in GB and its seconds. Run by a process of its own, whose
    children are this command alone, so that RUSAGE_CHILDREN is the command's."""
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", measure, *command], cwd=project, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.split()[-1]) * 1024 / 1e9, seconds  # ru_maxrss is in kB on Linux


def scratch_project(code: Path, folder: Path, csv: Path, images: Path) -> Path:
    """The code's pipeline/ and params.yaml, reading `csv`, the `images` folder, and an untrained net5."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(code / "pipeline", folder / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    params = (code / "params.yaml").read_text()
    (folder / "params.yaml").write_text(params.replace("source: synthetic", "source: csv", 1)
                                        .replace("csv: data/raw/training.csv", f"csv: {csv}", 1))
    (folder / "models").mkdir()
    (folder / IMAGES).symlink_to(images)
    subprocess.run([sys.executable, "-c", MAKE_MODEL], cwd=folder, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--csv-gb", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--code", type=Path, nargs="+", default=[ROOT])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    csv = args.workdir / "training.csv"
    if not csv.exists():
        rows = write_csv(csv, args.csv_gb)
        print(f"wrote {csv}: {rows} rows, {csv.stat().st_size / 1e9:.2f} GB", flush=True)
    images = write_images(args.workdir / "images", args.images)
    rows = sum(1 for _ in csv.open()) - 1
    print(f"inputs: {csv.stat().st_size / 1e9:.2f} GB CSV of {rows} faces ({rows * N_PIXELS / 1e9:.2f} GB of uint8 "
          f"pixels); {len(images)} PNG images", flush=True)
    for code in args.code:
        project = scratch_project(code.resolve(), args.workdir / "project", csv.resolve(),
                                  (args.workdir / "images").resolve())
        gigabytes, seconds = peak(project, sys.executable, "-m", "pipeline.prepare")
        print(f"{code}: prepare: peak {gigabytes:.2f} GB resident, {seconds:.0f} s", flush=True)
        gigabytes, seconds = peak(project, sys.executable, "-m", "pipeline.predict", *images, "--output",
                                  str(args.workdir / "predictions.csv"))
        print(f"{code}: predict: peak {gigabytes:.2f} GB resident, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
