"""Stage `train@<net>`: fit one net on the prepared training portion, tracked in MLflow.

Usage: python -m pipeline.train <net>      (a net named under `nets` in params.yaml)
       torchrun --nproc_per_node=N -m pipeline.train <net>      (data-parallel over N processes)

A training that was stopped (Ctrl-C, SIGTERM, kill -9, a crash) continues from its checkpoint
under paths.checkpoints when run again with the same settings.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.augment import flip_random_half
from pipeline.callbacks import AdjustHyperparameter, EpochTable
from pipeline.checkpoint import Checkpointer, fingerprint, read_training_state, restore_training_state, save_model
from pipeline.config import Config, flatten, load_config
from pipeline.data import load_faces, read_summary, split
from pipeline.errors import Interrupted, PipelineError, reports_errors
from pipeline.files import atomic_write, write_json
from pipeline.loop import Tensors, Trainer, fit
from pipeline.memory import reuse_freed_memory
from pipeline.model import KeypointNet
from pipeline.tracking import MlflowLogger, connect, training_run


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; a plain `python -m` run is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> "Ranks":
        return cls(*(int(os.environ.get(name, default)) for name, default in
                     (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))))

    @property
    def lead(self) -> bool:
        """Only the lead rank logs to MLflow and writes files."""
        return self.rank == 0


def resolve_device(name: str, ranks: Ranks = Ranks()) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name!r}, but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", ranks.local_rank)  # one GPU per process of a torchrun job
    return torch.device(name)


def memory_format(config: Config) -> torch.memory_format:
    return torch.channels_last if config.train.channels_last else torch.contiguous_format


def build_trainer(config: Config, net_name: str, device: torch.device, ranks: Ranks = Ranks()) -> Trainer:
    """The seed's network and Nesterov SGD, annealed as params.yaml says; seeded throughout."""
    settings = config.train
    torch.manual_seed(settings.seed)
    model = KeypointNet().to(device, memory_format=memory_format(config))
    if ranks.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.schedules["lr"].start,
        momentum=settings.schedules["momentum"].start,
        nesterov=True,
    )
    # Separate streams, so that net4 and net5 see their batches in the same order.
    flip = config.net(net_name).flip
    return Trainer(
        model=model,
        optimizer=optimizer,
        max_epochs=settings.max_epochs,
        batch_size=settings.batch_size,
        generator=torch.Generator(device=device).manual_seed(settings.seed),
        augment=flip_random_half if flip else None,
        augment_generator=torch.Generator(device=device).manual_seed(settings.seed + 1) if flip else None,
        bf16=settings.bf16,
        callbacks=[AdjustHyperparameter(name, s.start, s.stop) for name, s in settings.schedules.items()],
        rank=ranks.rank,
        world_size=ranks.world_size,
    )


def final_figures(history: list[dict]) -> dict:
    best = min(history, key=lambda row: row["valid_loss"])
    last = history[-1]
    return {
        "epochs": last["epoch"],
        "train_loss": last["train_loss"],
        "valid_loss": last["valid_loss"],
        "valid_rmse_px": last["valid_rmse_px"],
        "best_valid_loss": best["valid_loss"],
        "best_epoch": best["epoch"],
        # The epochs' own times, so that a resumed training counts each epoch once.
        "train_seconds": round(sum(row["epoch_seconds"] for row in history), 1),
    }


def write_history(path: Path, history: list[dict]) -> None:
    with atomic_write(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def code_hash() -> str:
    """The pipeline package's source: a checkpoint saved by other code is not resumed."""
    files = sorted(Path(__file__).parent.glob("*.py"))
    return hashlib.sha256(b"".join(file.read_bytes() for file in files)).hexdigest()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler or `kill` stopping the job) stops training the way Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    if ranks.world_size == 1:
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


@reports_errors
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise PipelineError("usage: python -m pipeline.train <net>")
    net_name = args[0]
    config = load_config()
    config.net(net_name)
    ranks = Ranks.from_environment()
    device = resolve_device(config.train.device, ranks)
    if ranks.lead:
        connect()
    reuse_freed_memory()
    with process_group(ranks, device):
        train(config, net_name, device, ranks)


def train(config: Config, net_name: str, device: torch.device, ranks: Ranks) -> None:
    paths = config.paths
    data_hash = read_summary(paths.prepared_summary)["data_hash"]
    training, validation = split(load_faces(paths.train_faces), config.train.valid_fraction, seed=config.train.seed)
    trainer = build_trainer(config, net_name, device, ranks)
    params = {
        **flatten(config.to_dict()),
        "net": net_name,
        "flip": config.net(net_name).flip,
        "n_train": len(training),
        "n_valid": len(validation),
        "device": str(device),
        "world_size": ranks.world_size,
    }
    settings_hash = fingerprint({
        "net": net_name, "train": asdict(config.train), "net_settings": asdict(config.net(net_name)),
        "data_hash": data_hash, "device": device.type, "world_size": ranks.world_size, "code": code_hash(),
    })
    checkpoint = paths.checkpoint(net_name)
    state = read_training_state(checkpoint)
    if state is not None and state["fingerprint"] != settings_hash:
        if ranks.lead:
            print(f"train {net_name}: {checkpoint} was saved with other settings or data: training afresh")
        state = None
    if state is not None:
        restore_training_state(trainer, state)
    layout = memory_format(config)
    train_data, valid_data = Tensors.of(training, device, layout), Tensors.of(validation, device, layout)
    if not ranks.lead:
        fit(trainer, train_data, valid_data)
        return
    print(f"train {net_name}: {len(training)} train + {len(validation)} valid faces on {device}"
          f"{f' x {ranks.world_size} processes' if ranks.world_size > 1 else ''}, {config.train.max_epochs} epochs"
          f"{f', resuming after epoch {len(trainer.history)}' if trainer.history else ''}")
    generated = [paths.models, paths.metrics, paths.plots, paths.reports]
    tags = {"data_hash": data_hash, "net": net_name}
    resume_run_id = state["mlflow_run_id"] if state is not None else None
    checkpointer = Checkpointer(checkpoint, settings_hash)
    try:
        with training_run(net_name, params, tags, generated, resume_run_id) as run, checkpointer, sigterm_interrupts():
            run_id = checkpointer.run_id = run.info.run_id
            trainer.callbacks += [checkpointer, EpochTable(), MlflowLogger(run_id)]
            history = fit(trainer, train_data, valid_data)
    except KeyboardInterrupt:
        saved = checkpointer.saved_epochs
        raise Interrupted(
            f"train {net_name} interrupted in epoch {len(trainer.history) + 1}; "
            + (f"{checkpoint} keeps epochs 1-{saved}: run the stage again (`dvc repro`) to continue" if saved
               else "no epoch had ended, so there is nothing to resume")
        ) from None
    save_model(paths.model(net_name), trainer.network)
    write_json(paths.model_info(net_name), {
        "net": net_name, "mlflow_run_id": run_id, "data_hash": data_hash, "config": config.to_dict(),
    })
    write_history(paths.history(net_name), history)
    write_json(paths.train_metrics(net_name), final_figures(history))
    checkpoint.unlink()


if __name__ == "__main__":
    main()
