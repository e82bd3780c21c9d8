"""Stage `train@<net>`: fit one net on the prepared training portion, tracked in MLflow.

Usage: python -m pipeline.train <net>      (a net named under `nets` in params.yaml)
"""

from __future__ import annotations

import csv
import functools
import sys
import time
from pathlib import Path

import torch

from pipeline.augment import flip_random_half
from pipeline.callbacks import AdjustHyperparameter, EpochTable
from pipeline.checkpoint import save_model
from pipeline.config import Config, flatten, load_config
from pipeline.data import load_faces, read_summary, split
from pipeline.errors import PipelineError, reports_errors
from pipeline.files import atomic_write, write_json
from pipeline.loop import Tensors, Trainer, fit
from pipeline.memory import reuse_freed_memory
from pipeline.model import KeypointNet
from pipeline.tracking import MlflowLogger, training_run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name!r}, but no CUDA device is available")
    return torch.device(name)


def memory_format(config: Config) -> torch.memory_format:
    return torch.channels_last if config.train.channels_last else torch.contiguous_format


def build_trainer(config: Config, net_name: str, device: torch.device) -> Trainer:
    """The seed's network and Nesterov SGD, annealed as params.yaml says; seeded throughout."""
    settings = config.train
    torch.manual_seed(settings.seed)
    model = KeypointNet().to(device, memory_format=memory_format(config))
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.schedules["lr"].start,
        momentum=settings.schedules["momentum"].start,
        nesterov=True,
    )
    # Separate streams, so that net4 and net5 see their batches in the same order.
    shuffle = torch.Generator(device=device).manual_seed(settings.seed)
    flips = torch.Generator(device=device).manual_seed(settings.seed + 1)
    return Trainer(
        model=model,
        optimizer=optimizer,
        max_epochs=settings.max_epochs,
        batch_size=settings.batch_size,
        generator=shuffle,
        augment=functools.partial(flip_random_half, generator=flips) if config.net(net_name).flip else None,
        bf16=settings.bf16,
        callbacks=[AdjustHyperparameter(name, s.start, s.stop) for name, s in settings.schedules.items()],
    )


def final_figures(history: list[dict], seconds: float) -> dict:
    best = min(history, key=lambda row: row["valid_loss"])
    last = history[-1]
    return {
        "epochs": last["epoch"],
        "train_loss": last["train_loss"],
        "valid_loss": last["valid_loss"],
        "valid_rmse_px": last["valid_rmse_px"],
        "best_valid_loss": best["valid_loss"],
        "best_epoch": best["epoch"],
        "train_seconds": round(seconds, 1),
    }


def write_history(path: Path, history: list[dict]) -> None:
    with atomic_write(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


@reports_errors
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise PipelineError("usage: python -m pipeline.train <net>")
    net_name = args[0]
    config = load_config()
    config.net(net_name)
    device = resolve_device(config.train.device)
    reuse_freed_memory()
    paths = config.paths
    data_hash = read_summary(paths.prepared_summary)["data_hash"]
    training, validation = split(load_faces(paths.train_faces), config.train.valid_fraction, seed=config.train.seed)
    trainer = build_trainer(config, net_name, device)
    params = {
        **flatten(config.to_dict()),
        "net": net_name,
        "flip": config.net(net_name).flip,
        "n_train": len(training),
        "n_valid": len(validation),
        "device": str(device),
    }
    tags = {"data_hash": data_hash, "net": net_name}
    print(f"train {net_name}: {len(training)} train + {len(validation)} valid faces on {device}, "
          f"{config.train.max_epochs} epochs")
    started = time.perf_counter()
    generated = [paths.models, paths.metrics, paths.plots, paths.reports]
    with training_run(net_name, params, tags, generated) as run:
        trainer.callbacks += [EpochTable(), MlflowLogger(run.info.run_id)]
        layout = memory_format(config)
        history = fit(trainer, Tensors.of(training, device, layout), Tensors.of(validation, device, layout))
        run_id = run.info.run_id
    save_model(paths.model(net_name), trainer.model)
    write_json(paths.model_info(net_name), {
        "net": net_name, "mlflow_run_id": run_id, "data_hash": data_hash, "config": config.to_dict(),
    })
    write_history(paths.history(net_name), history)
    write_json(paths.train_metrics(net_name), final_figures(history, time.perf_counter() - started))


if __name__ == "__main__":
    main()
