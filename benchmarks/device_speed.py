"""The train stage's speed on a device (a GPU), at the size of the seed protocol's data.

Usage: python -m benchmarks.device_speed [--device cuda] [--epochs 30] [--train-faces 2247] [--valid-faces 562]
       (python -m benchmarks.train_speed runs this when it finds a CUDA device)

For net4 and net5, each in a process of its own: the epoch's passes (fit() with the stage's
trainer, on random faces), the real train stage's wall time per epoch (MLflow, checkpoints, the
console; benchmarks/stage_overhead.py's clock), images per second, the effective TFLOP/s, the
plain PyTorch port (benchmarks/reference.py) on the same device, and the seed protocol's 3000
epochs projected. Then both stages at once on the one device, against one alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from benchmarks import reference
from benchmarks.stage_overhead import EpochClock, CountingCheckpoint
from pipeline.base.config import Config, load_config
from pipeline.base.model import KeypointNet
from pipeline.faces.data import FaceSet, content_hash, save_prepared
from pipeline.faces.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS
from pipeline.train import build_trainer, memory_format, set_up_process, train
from pipeline.training.device import Ranks
from pipeline.training.loop import DeviceFaces, fit
from tests.support.project import make_project

ROOT = Path(__file__).resolve().parents[1]
SEED_PROTOCOL_EPOCHS = 3000
NETS = ("net4", "net5")
# The targets: the stage's wall time for the seed protocol, per net, and both nets at once.
MAX_PROTOCOL_SECONDS, STRETCH_PROTOCOL_SECONDS = 100.0, 30.0
MAX_CONCURRENT_RATIO = 1.5


def random_faces(n: int, seed: int) -> FaceSet:
    """Pixels as the prepared arrays hold them (multiples of 1/255), keypoints in the scaled range."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    keypoints = rng.uniform(-0.9, 0.9, size=(n, len(KEYPOINT_COLUMNS))).astype(np.float32)
    return FaceSet(pixels.astype(np.float32) / np.float32(255), keypoints)


def flops_per_image(model: nn.Module) -> tuple[float, float]:
    """(training, validation) floating-point operations per face: a multiply-add counts 2, and a
    training step costs three forward passes (the forward, and the backward's two products)."""
    macs = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            macs.append(output[0].numel() * module.in_channels * np.prod(module.kernel_size) // module.groups)
        elif isinstance(module, nn.Linear):
            macs.append(module.in_features * module.out_features)

    hooks = [module.register_forward_hook(count) for module in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    finally:
        for hook in hooks:
            hook.remove()
    forward = 2.0 * sum(macs)
    return 3 * forward, forward


def stage_config(device: str, epochs: int) -> Config:
    config = load_config(ROOT / "params.yaml")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, device=device, max_epochs=epochs))


def passes_seconds(net: str, config: Config, n_train: int, n_valid: int) -> list[float]:
    """Every epoch's passes (train and valid, the device's work finished) with the stage's own trainer."""
    device = set_up_process(config)
    trainer = build_trainer(config, net, device)
    layout = memory_format(config)
    data = [DeviceFaces.of(random_faces(n, seed), device, layout) for n, seed in ((n_train, 0), (n_valid, 1))]
    return [row["epoch_seconds"] for row in fit(trainer, *data)]


def plain_seconds(config: Config, n_train: int) -> list[float]:
    """The plain port's training epochs (no validation) on the same device."""
    device = torch.device(config.train.device)
    faces = random_faces(n_train, 0)
    net = reference.reference_net().to(device)
    optimizer = reference.make_optimizer(net, 0.03, 0.9)
    loader = reference.make_loader(torch.from_numpy(faces.X).to(device), torch.from_numpy(faces.y).to(device),
                                   batch_size=config.train.batch_size, generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(config.train.max_epochs):
        started = time.perf_counter()
        reference.train_epoch(net, loader, optimizer)  # reads every loss: the device is done at the end
        seconds.append(time.perf_counter() - started)
    return seconds


def stage_seconds(net: str, config: Config, n_train: int, n_valid: int) -> dict:
    """The real train stage in a scratch project whose prepared portion holds these many faces:
    the median wall time per epoch (from one epoch's beginning to the next's) and the time before
    the first epoch and after the last (start, data, MLflow run; saving and logging the model)."""
    with tempfile.TemporaryDirectory(prefix=".device-speed-", dir=ROOT) as scratch:
        project = make_project(Path(scratch) / "project", git=False)
        faces = random_faces(n_train + n_valid, 2)
        # The stage splits off train.valid_fraction for validation: the share that leaves n_valid.
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, valid_fraction=n_valid / (n_train + n_valid)))
        previous = Path.cwd()
        os.chdir(project)
        try:
            save_prepared(config.paths.prepared_summary,
                          {config.paths.train_faces: faces.stored(),
                           config.paths.test_faces: faces.take(slice(0, 1)).stored()},
                          {"source": "random faces", "data_hash": content_hash(faces.stored())})
            clock = EpochClock(CountingCheckpoint())
            with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}), \
                    open(os.devnull, "w") as console, contextlib.redirect_stdout(console):
                started = time.perf_counter()
                train(config, net, set_up_process(config), Ranks(), callbacks=(clock,))
                ended = time.perf_counter()
        finally:
            os.chdir(previous)
    walls = [later - earlier for earlier, later in zip(clock.begins, clock.begins[1:])]
    return {"epoch": statistics.median(walls[1:] or walls),
            "fixed": (clock.begins[0] - started) + (ended - clock.begins[-1] - clock.history[-1]["epoch_seconds"])}


def measure(job: str, net: str, config: Config, n_train: int, n_valid: int, go, connection) -> None:
    """In a process of its own (a CUDA context each, as two stages have): wait for `go`, then time."""
    go.wait()
    started = time.perf_counter()
    if job == "passes":
        result = passes_seconds(net, config, n_train, n_valid)
    elif job == "plain":
        result = plain_seconds(config, n_train)
    else:
        result = stage_seconds(net, config, n_train, n_valid)
    connection.send((result, time.perf_counter() - started))
    connection.close()


def in_processes(jobs: list[tuple[str, str]], config: Config, n_train: int, n_valid: int) -> tuple[list, float]:
    """Run the jobs at the same time, one process each; their results and the wall time until all ended."""
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    processes, connections = [], []
    for job, net in jobs:
        ours, theirs = context.Pipe()
        process = context.Process(target=measure, args=(job, net, config, n_train, n_valid, go, theirs), daemon=True)
        process.start()
        processes.append(process)
        connections.append(ours)
    started = time.perf_counter()
    go.set()
    results = [answer(connection, process, job) for connection, process, (job, _) in zip(connections, processes, jobs)]
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join(timeout=60)
    return results, elapsed


def answer(connection, process, job: str):
    """The job's result, or an error naming it once its process has ended without one (it failed, and
    printed why): a plain recv() would wait for ever."""
    while not connection.poll(1):
        if not process.is_alive() and not connection.poll(0):
            raise SystemExit(f"device_speed: the {job} job's process ended with code {process.exitcode} "
                             "and no result (its error is above)")
    return connection.recv()[0]


def verdict(met: bool) -> str:
    return "ok" if met else "MISSED"


def report(args: argparse.Namespace) -> list[str]:
    config = stage_config(args.device, args.epochs)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    train_flops, valid_flops = flops_per_image(KeypointNet())
    epoch_flops = args.train_faces * train_flops + args.valid_faces * valid_flops
    lines = [
        f"device: {args.device} ({name}), torch {torch.__version__}; {args.train_faces} train + {args.valid_faces} "
        f"valid random faces, batch {config.train.batch_size}, {args.epochs} epochs (median of all but the first); "
        f"cuda_graphs {config.train.cuda_graphs}, deterministic {config.train.deterministic}, bf16 {config.train.bf16}",
        f"{train_flops / 1e9:.3f} GFLOP per training face, {valid_flops / 1e9:.3f} per validation face",
        f"{'net':<5} {'passes ms':>10} {'stage ms':>9} {'images/s':>9} {'TFLOP/s':>8} {'plain ms':>9} "
        f"{'3000 epochs':>12}    (stage: the train stage's wall time per epoch; plain: the plain port's training "
        f"pass alone; 3000 epochs: the stage's fixed costs and 3000 of its epochs)",
    ]
    (plain,), _ = in_processes([("plain", "net4")], config, args.train_faces, args.valid_faces)
    plain_ms = 1000 * statistics.median(plain[1:])
    stages = {}
    for net in NETS:
        (passes,), _ = in_processes([("passes", net)], config, args.train_faces, args.valid_faces)
        (stage,), alone = in_processes([("stage", net)], config, args.train_faces, args.valid_faces)
        stages[net] = alone
        passes_s = statistics.median(passes[1:])
        protocol = stage["fixed"] + SEED_PROTOCOL_EPOCHS * stage["epoch"]
        lines.append(f"{net:<5} {1000 * passes_s:10.1f} {1000 * stage['epoch']:9.1f} "
                     f"{(args.train_faces + args.valid_faces) / passes_s:9.0f} {epoch_flops / passes_s / 1e12:8.2f} "
                     f"{plain_ms:9.1f} {protocol:11.0f}s  target <= {MAX_PROTOCOL_SECONDS:.0f} s "
                     f"(stretch {STRETCH_PROTOCOL_SECONDS:.0f} s) {verdict(protocol <= MAX_PROTOCOL_SECONDS)}")
    _, together = in_processes([("stage", net) for net in NETS], config, args.train_faces, args.valid_faces)
    ratio = together / max(stages.values())
    lines.append(f"net4 and net5 stages at once: {together:.1f} s against {max(stages.values()):.1f} s for the slower "
                 f"alone = {ratio:.2f}x (target <= {MAX_CONCURRENT_RATIO}x) {verdict(ratio <= MAX_CONCURRENT_RATIO)}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the device to train on (default: cuda where there is one)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per measurement (default: 30)")
    parser.add_argument("--train-faces", type=int, default=2247, help="training faces (default: 2247, as Kaggle's)")
    parser.add_argument("--valid-faces", type=int, default=562, help="validation faces (default: 562)")
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: the first epoch is a warm-up and not counted")
    if args.train_faces < 1 or args.valid_faces < 1:
        parser.error("--train-faces and --valid-faces must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    print("\n".join(report(parse_args(argv))))


if __name__ == "__main__":
    main()
