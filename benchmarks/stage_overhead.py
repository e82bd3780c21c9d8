"""What the train stage spends outside its epochs' passes, and what it writes to disk.

Usage: python -m benchmarks.stage_overhead [--net net4] [--epochs N] [--faces N]

Builds a scratch copy of the project (synthesize and prepare with params.yaml's defaults, or
--faces), then runs the real train stage in this process: MLflow logging into a SQLite store,
checkpoints every `checkpoint.interval_seconds`, the console table, on the device params.yaml
chooses (a GPU when there is one). For every epoch it takes the time from the end of the epoch's
passes to the start of the next one's, and prints the median share of that time in the epoch,
the bytes the process wrote to disk (`/usr/bin/time -v`'s "File system outputs", in bytes),
and both projected to the seed protocol's 3000 epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from pipeline.base.config import load_config
from pipeline.train import set_up_process, train
from pipeline.training import checkpoint as checkpoint_module
from pipeline.training.device import Ranks
from pipeline.training.loop import Callback
from tests.support.project import make_project, run

ROOT = Path(__file__).resolve().parents[1]
SEED_PROTOCOL_EPOCHS = 3000
# The targets.
MAX_OUTSIDE_PERCENT = 3.0
MAX_PROTOCOL_WRITES_GB = 1.0
# ru_oublock counts blocks of 512 bytes, as /usr/bin/time -v reports them.
BLOCK_BYTES = 512


class EpochClock(Callback):
    """When each epoch began and the disk writes until then: the time between two beginnings less
    the first epoch's passes is everything the stage did between them (callbacks, logging,
    checkpoints, the console)."""

    def __init__(self, checkpoints: "CountingCheckpoint"):
        self.checkpoints = checkpoints
        self.begins: list[float] = []
        self.written: list[int] = []
        self.checkpoints_written: list[int] = []
        self.ended = 0.0
        self.history: list[dict] = []  # with the epochs' times, which the committed history leaves out

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        self.begins.append(time.perf_counter())
        self.written.append(disk_writes_bytes())
        self.checkpoints_written.append(self.checkpoints.writes)

    def on_train_end(self, trainer, history: list[dict]) -> None:
        self.ended = time.perf_counter()
        self.history = [dict(row) for row in history]

    def outside_seconds(self, history: list[dict]) -> list[float]:
        return [later - earlier - row["epoch_seconds"]
                for earlier, later, row in zip(self.begins, self.begins[1:], history)]


class CountingCheckpoint:
    """Counts the stage's checkpoint writes and takes the size of one."""

    def __init__(self):
        self.writes, self.size_bytes = 0, 0

    @contextlib.contextmanager
    def installed(self):
        write = checkpoint_module.write_training_state

        def counted(path, state):
            write(path, state)
            self.writes += 1
            self.size_bytes = Path(path).stat().st_size

        with mock.patch.object(checkpoint_module, "write_training_state", counted):
            yield


def disk_writes_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_oublock * BLOCK_BYTES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = load_config(ROOT / "params.yaml")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stage_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="net4", choices=sorted(defaults.nets), help="the net to train (default: net4)")
    parser.add_argument("--epochs", type=int, default=defaults.train.max_epochs,
                        help=f"train.max_epochs (default: params.yaml's, {defaults.train.max_epochs})")
    parser.add_argument("--faces", type=int, default=defaults.synthetic.n_faces,
                        help=f"synthetic.n_faces (default: params.yaml's, {defaults.synthetic.n_faces})")
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: the first and the last epoch are not counted")
    return args


def report(clock: EpochClock, history: list[dict], written: int, checkpoints: CountingCheckpoint,
           interval: float, device: torch.device) -> list[str]:
    # The first gap pays for warming up (the first log request, the first copy's allocation).
    outside = clock.outside_seconds(history)[1:]
    passes = [row["epoch_seconds"] for row in history[1:len(outside) + 1]]
    shares = sorted(100 * gap / seconds for gap, seconds in zip(outside, passes))
    share = statistics.median(shares)
    wall = statistics.median(gap + seconds for gap, seconds in zip(outside, passes))
    size = checkpoints.size_bytes
    # From the first epoch's beginning to the last one's: the epochs' own writes, periodic checkpoints included.
    epochs = len(clock.begins) - 1
    during = clock.written[-1] - clock.written[0]
    periodic = clock.checkpoints_written[-1] - clock.checkpoints_written[0]
    per_epoch = max(during - periodic * size, 0) / epochs
    at_end = written - during
    periodic_in_protocol = math.floor(SEED_PROTOCOL_EPOCHS * wall / interval) if interval else SEED_PROTOCOL_EPOCHS
    projected = SEED_PROTOCOL_EPOCHS * per_epoch + periodic_in_protocol * size + at_end
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return [
        f"device: {device}{name}, torch {torch.__version__}, {len(history)} epochs",
        f"epoch passes: median {1000 * statistics.median(passes):.1f} ms; outside them: median "
        f"{1000 * statistics.median(outside):.2f} ms = {share:.2f} % of the passes (90th percentile "
        f"{shares[int(0.9 * (len(shares) - 1))]:.2f} %; target <= {MAX_OUTSIDE_PERCENT:.0f} %) "
        f"{verdict(share <= MAX_OUTSIDE_PERCENT)}",
        f"disk writes: {written / 1e6:.1f} MB in all: during the epochs {periodic} checkpoints of "
        f"{size / 1e6:.1f} MB (checkpoint.interval_seconds {interval:g}) and {per_epoch / 1e3:.1f} kB per epoch "
        f"besides; at the end {at_end / 1e6:.1f} MB (last checkpoint, model, MLflow model, outputs) "
        f"in {clock_end(clock, history):.2f} s",
        f"projected to {SEED_PROTOCOL_EPOCHS} epochs of {1000 * wall:.1f} ms: {projected / 1e9:.2f} GB written "
        f"(target <= {MAX_PROTOCOL_WRITES_GB:.0f} GB) {verdict(projected <= MAX_PROTOCOL_WRITES_GB * 1e9)}",
    ]


def clock_end(clock: EpochClock, history: list[dict]) -> float:
    return clock.ended - clock.begins[-1] - history[-1]["epoch_seconds"]


def verdict(met: bool) -> str:
    return "ok" if met else "MISSED"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # On the disk, not in a memory file system, so that the writes are counted.
    with tempfile.TemporaryDirectory(prefix=".stage-overhead-", dir=ROOT) as scratch:
        # No git, no DVC: a GPU machine may have neither.
        project = make_project(Path(scratch) / "project", {"synthetic.n_faces": args.faces,
                                                           "train.max_epochs": args.epochs}, git=False)
        for stage in ("synthesize", "prepare"):
            run(project, sys.executable, "-m", f"pipeline.{stage}")
        previous = Path.cwd()
        os.chdir(project)
        try:
            config = load_config()
            device = set_up_process(config)
            checkpoints = CountingCheckpoint()
            clock = EpochClock(checkpoints)
            with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}), \
                    checkpoints.installed():
                before = disk_writes_bytes()
                train(config, args.net, device, Ranks(), callbacks=(clock,))
                written = disk_writes_bytes() - before
        finally:
            os.chdir(previous)
        print("\n".join(report(clock, clock.history, written, checkpoints, config.checkpoint.interval_seconds, device)))


if __name__ == "__main__":
    main()
