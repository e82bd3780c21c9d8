"""How fast does the project train, and what do loading and DVC cost around it?

Usage: python -m benchmarks.train_speed [--images 1712] [--epochs 4] [--skip-csv] [--skip-dvc]

On a machine with a CUDA device it measures the GPU instead: benchmarks/device_speed.py, with its defaults.

Trains on random but seeded faces, so the figures depend on the machine and the code only.
Run it on an idle machine: a second training on the same cores distorts every figure. What the
train stage spends around its epochs (MLflow, checkpoints) is benchmarks/stage_overhead.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch

from benchmarks import device_speed, reference
from pipeline.base.config import Config, load_config
from pipeline.faces.data import FaceSet, load_split
from pipeline.faces.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS, KEYPOINTS, write_training_csv
from pipeline.train import build_trainer, memory_format
from pipeline.training import memory
from pipeline.training.loop import DeviceFaces, Trainer, run_epoch
from tests.support.project import make_project, run

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")

# The targets.
MIN_SPEEDUP, STRETCH_SPEEDUP = 3.0, 5.0
MAX_FLIP_OVERHEAD_PERCENT = 3.0
MAX_CSV_SECONDS = 10.0
MAX_NOOP_REPRO_SECONDS = 3.0

# The published training.csv: 7049 rows, of which 2140 have all 15 keypoints; nearly all the
# others have only these four.
KAGGLE_ROWS, KAGGLE_COMPLETE_ROWS = 7049, 2140
KEYPOINTS_OF_INCOMPLETE_ROWS = ("left_eye_center", "right_eye_center", "nose_tip", "mouth_center_bottom_lip")


@dataclass
class Timing:
    name: str
    epoch_seconds: list[float]
    kernel_seconds: list[float]
    n_images: int

    @property
    def median_seconds(self) -> float:
        """Over all epochs but the first, which pays for warming up allocators and caches."""
        return statistics.median(self.epoch_seconds[1:])

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.median_seconds / self.n_images

    @property
    def kernel_percent(self) -> float:
        """The allocator hands large tensors back to the system when they are freed, so every batch
        faults their pages in again; this share varies from machine to machine and hour to hour."""
        return 100 * sum(self.kernel_seconds[1:]) / sum(self.epoch_seconds[1:]) / torch.get_num_threads()


# They change how memory is allocated, which changes every figure here.
ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")


def machine_description() -> str:
    allocator = " ".join(f"{name}={os.environ[name]}" for name in ALLOCATOR_VARIABLES if name in os.environ)
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"allocator settings: {allocator or 'none'}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def random_faces(n: int, seed: int) -> FaceSet:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    targets = rng.uniform(-1, 1, size=(n, len(KEYPOINT_COLUMNS))).astype(np.float32)
    return FaceSet(images, targets)


def project_config() -> Config:
    return load_config(ROOT / "params.yaml")


def project_trainer(net_name: str) -> Trainer:
    return build_trainer(project_config(), net_name, DEVICE)


def project_faces(faces: FaceSet) -> DeviceFaces:
    return DeviceFaces.of(faces, DEVICE, memory_format(project_config()))


def project_epoch(net_name: str, faces: FaceSet) -> Callable[[], object]:
    trainer, data = project_trainer(net_name), project_faces(faces)
    return lambda: run_epoch(trainer, data, train=True)


def reference_epoch(faces: FaceSet, seed: int) -> Callable[[], object]:
    """The plain loop, from net4's initial weights and with its optimizer settings."""
    project = project_trainer("net4")
    net = reference.reference_net()
    reference.load_keypoint_net_weights(net, project.model)
    settings = project.optimizer.param_groups[0]
    optimizer = reference.make_optimizer(net, settings["lr"], settings["momentum"])
    loader = reference.make_loader(torch.from_numpy(faces.X), torch.from_numpy(faces.y),
                                   batch_size=project.batch_size, generator=torch.Generator().manual_seed(seed))
    return lambda: reference.train_epoch(net, loader, optimizer)


@dataclass(frozen=True)
class Loop:
    """A training loop as it runs in real use, in a process of its own: the allocator setting of
    pipeline/training/memory.py is process-wide, and the train stage makes it while a plain port does not."""

    name: str
    net: str | None  # None: the plain reference loop
    reuse_freed_memory: bool


LOOPS = (
    Loop("reference", None, reuse_freed_memory=False),
    Loop("net4", "net4", reuse_freed_memory=True),
    Loop("net5", "net5", reuse_freed_memory=True),
    # Not a target: how much of the gain the allocator setting alone would give the plain loop.
    Loop("ref+alloc", None, reuse_freed_memory=True),
)


def serve_epochs(loop: Loop, n_images: int, seed: int, connection) -> None:
    """In the loop's own process: build it, then time one epoch per request."""
    if loop.reuse_freed_memory:
        memory.reuse_freed_memory()
    faces = random_faces(n_images, seed)
    run_one_epoch = reference_epoch(faces, seed) if loop.net is None else project_epoch(loop.net, faces)
    connection.send("ready")
    while connection.recv() == "epoch":
        kernel_before, started = kernel_cpu_seconds(), time.perf_counter()
        run_one_epoch()
        connection.send((time.perf_counter() - started, kernel_cpu_seconds() - kernel_before))
    connection.close()


def time_interleaved(loops: tuple[Loop, ...], n_epochs: int, n_images: int, seed: int) -> list[Timing]:
    """One epoch of every loop per round, one process at a time: this machine's speed drifts by
    tens of percent within minutes, and taking turns makes the drift hit every loop alike."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    try:
        for loop in loops:
            ours, theirs = context.Pipe()
            process = context.Process(target=serve_epochs, args=(loop, n_images, seed, theirs), daemon=True)
            process.start()
            workers[loop.name] = (process, ours)
        for _, connection in workers.values():
            connection.recv()
        seconds = {name: [] for name in workers}
        kernel_seconds = {name: [] for name in workers}
        for _ in range(n_epochs):
            for name, (_, connection) in workers.items():
                connection.send("epoch")
                wall, kernel = connection.recv()
                seconds[name].append(wall)
                kernel_seconds[name].append(kernel)
    finally:
        for process, connection in workers.values():
            with contextlib.suppress(OSError):
                connection.send("stop")
            process.join(timeout=30)
    return [Timing(name, seconds[name], kernel_seconds[name], n_images) for name in workers]


def kernel_cpu_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def flip_seconds_per_epoch(faces: FaceSet, n_epochs: int) -> float:
    """net5's augmentation alone, over an epoch's batches: the net4/net5 difference in whole
    epochs is smaller than this machine's noise, this is not."""
    trainer, data = project_trainer("net5"), project_faces(faces)
    seconds = []
    for _ in range(n_epochs):
        order = torch.randperm(len(data))
        batches = [(data.images[rows], data.targets[rows]) for rows in order.split(trainer.batch_size)]
        started = time.perf_counter()
        for images, targets in batches:
            trainer.augment(images, targets, trainer.augment_generator)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def training_table(timings: list[Timing]) -> str:
    baseline = timings[0]
    allocator = {loop.name: "reuse" if loop.reuse_freed_memory else "default" for loop in LOOPS}
    lines = [f"{'loop':<10} {'allocator':>9} {'epoch s':>8} {'images/s':>9} {'ms/image':>9} {'vs reference':>13} "
             f"{'kernel':>7}   all epochs, s"]
    for timing in timings:
        speedup = baseline.ms_per_image / timing.ms_per_image
        every_epoch = " ".join(f"{seconds:.2f}" for seconds in timing.epoch_seconds)
        lines.append(f"{timing.name:<10} {allocator.get(timing.name, '?'):>9} {timing.median_seconds:8.2f} "
                     f"{timing.n_images / timing.median_seconds:9.1f} {timing.ms_per_image:9.2f} {speedup:12.2f}x "
                     f"{timing.kernel_percent:6.0f}%   {every_epoch}")
    lines.append("allocator: default = glibc as a plain PyTorch program has it; reuse = freed memory kept for the "
                 "next step, as the train stage sets it (pipeline/training/memory.py)")
    lines.append("kernel: share of the CPU time spent in the kernel, nearly all of it faulting in the pages of "
                 "freshly allocated tensors")
    return "\n".join(lines)


def kaggle_size_csv(path: Path, seed: int) -> None:
    """Random pixels (their text is as long as real faces'), and the Kaggle file's pattern of
    missing keypoints, so that load drops as many rows."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(KAGGLE_ROWS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    keypoints = rng.uniform(1, IMAGE_SIZE - 1, size=(KAGGLE_ROWS, len(KEYPOINT_COLUMNS)))
    incomplete = np.ones(KAGGLE_ROWS, dtype=bool)
    incomplete[rng.choice(KAGGLE_ROWS, KAGGLE_COMPLETE_ROWS, replace=False)] = False
    kept = [2 * KEYPOINTS.index(name) + axis for name in KEYPOINTS_OF_INCOMPLETE_ROWS for axis in (0, 1)]
    dropped = np.setdiff1d(np.arange(len(KEYPOINT_COLUMNS)), kept)
    keypoints[np.ix_(incomplete, dropped)] = np.nan
    write_training_csv(path, images, keypoints)


def csv_load_report(directory: Path, seed: int) -> str:
    path = directory / "training.csv"
    kaggle_size_csv(path, seed)
    started = time.perf_counter()
    loaded = load_split(path, seed, 0.15, "prepare.test_fraction")
    seconds = time.perf_counter() - started
    n_complete = len(loaded.train) + len(loaded.test)
    n_incomplete = len(loaded.train_incomplete) + len(loaded.test_incomplete)
    return (f"Kaggle-size CSV ({loaded.report.n_rows} rows, {n_complete} complete, {n_incomplete} incomplete, "
            f"{path.stat().st_size / 1e6:.0f} MB): "
            f"pipeline.faces.data.load_split {seconds:.2f} s (target <= {MAX_CSV_SECONDS:.0f} s) "
            f"{verdict(seconds <= MAX_CSV_SECONDS)}")


def noop_repro_seconds(directory: Path) -> float:
    """A full tiny `dvc repro` in a scratch copy of the project, then a timed second one."""
    project = make_project(directory / "project")
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}):
        run(project, "dvc", "repro")
        started = time.perf_counter()
        result = run(project, "dvc", "repro")
        seconds = time.perf_counter() - started
    if "up to date" not in result.stdout:
        raise RuntimeError(f"the second dvc repro was not a no-op:\n{result.stdout}")
    return seconds


def verdict(met: bool) -> str:
    return "ok" if met else "MISSED"


def training_verdicts(reference_timing: Timing, net4: Timing, net5: Timing, flip_seconds: float) -> list[str]:
    speedup = reference_timing.ms_per_image / net4.ms_per_image
    overhead = 100 * (net5.median_seconds / net4.median_seconds - 1)
    flip_share = 100 * flip_seconds / net4.median_seconds
    return [
        f"net4 speed-up over the reference: {speedup:.2f}x (target >= {MIN_SPEEDUP:.0f}x, "
        f"stretch {STRETCH_SPEEDUP:.0f}x) {verdict(speedup >= MIN_SPEEDUP)}",
        f"net5 flip overhead over net4: {overhead:+.1f} % (target <= {MAX_FLIP_OVERHEAD_PERCENT:.0f} %) "
        f"{verdict(overhead <= MAX_FLIP_OVERHEAD_PERCENT)}",
        f"  the flip alone: {1000 * flip_seconds:.0f} ms per epoch = {flip_share:.2f} % of a net4 epoch "
        f"{verdict(flip_share <= MAX_FLIP_OVERHEAD_PERCENT)}",
    ]


def dvc_report(directory: Path) -> str:
    seconds = noop_repro_seconds(directory)
    return (f"no-op dvc repro: {seconds:.2f} s (target <= {MAX_NOOP_REPRO_SECONDS:.0f} s) "
            f"{verdict(seconds <= MAX_NOOP_REPRO_SECONDS)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1712, help="training images per epoch (default: 1712)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loop, the first one not counted (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random faces (default: 0)")
    parser.add_argument("--skip-csv", action="store_true", help="skip loading a Kaggle-size CSV")
    parser.add_argument("--skip-dvc", action="store_true", help="skip timing a no-op dvc repro")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is a warm-up and not counted")
    if args.images < 1:
        parser.error("--images must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    if torch.cuda.is_available():
        device_speed.main([])
        return
    args = parse_args(argv)
    print(machine_description())
    settings = project_config().train
    print(f"training: {args.images} random 96x96 faces, batch {settings.batch_size}, median epoch of epochs "
          f"2..{args.epochs}, each loop in a process of its own, taking turns epoch by epoch; project loop "
          f"with channels_last {settings.channels_last}, bf16 {settings.bf16}\n")
    timings = time_interleaved(LOOPS, args.epochs, args.images, args.seed)
    print(training_table(timings) + "\n")
    reference_timing, net4, net5, _ = timings
    faces = random_faces(args.images, args.seed)
    flip_seconds = flip_seconds_per_epoch(faces, args.epochs)
    print("\n".join(training_verdicts(reference_timing, net4, net5, flip_seconds)))
    with tempfile.TemporaryDirectory(prefix="train-speed-") as scratch:
        directory = Path(scratch)
        if not args.skip_csv:
            print(csv_load_report(directory, args.seed))
        if not args.skip_dvc:
            print(dvc_report(directory))


if __name__ == "__main__":
    main()
