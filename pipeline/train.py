"""Stage `train@<net>`: fit one net on the prepared training portion, tracked in MLflow.

Usage: python -m pipeline.train <net>      (a net named under `nets` in params.yaml)
       torchrun --nproc_per_node=N -m pipeline.train <net>      (data-parallel over N processes)

A training that was stopped (Ctrl-C, SIGTERM, kill -9, a crash) continues from its checkpoint
under paths.checkpoints when run again with the same settings.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import hashlib
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.augment import flip_random_half
from pipeline.callbacks import AdjustHyperparameter, Callback, EarlyStopping, EpochTable, KeepBest
from pipeline.checkpoint import Checkpoint
from pipeline.config import Config, TrainConfig, flatten, load_config
from pipeline.data import load_faces, loss_to_rmse_px, read_summary, split
from pipeline.device import Ranks, process_group, resolve_device, use_deterministic_kernels
from pipeline.errors import Interrupted, PipelineError, reports_errors
from pipeline.files import atomic_write, exclusive_lock, write_json
from pipeline.loop import Tensors, Trainer, fit
from pipeline.memory import reuse_freed_memory
from pipeline.metrics import best_valid
from pipeline.model import KeypointNet
from pipeline.optim import NesterovSGD
from pipeline.tracking import MlflowLogger, TrackingError, connect, faces_inputs, training_run
from pipeline.weights import save_model


def memory_format(config: Config) -> torch.memory_format:
    return torch.channels_last if config.train.channels_last else torch.contiguous_format


def build_trainer(config: Config, net_name: str, device: torch.device, ranks: Ranks = Ranks()) -> Trainer:
    """The seed's network and Nesterov SGD, annealed as params.yaml says; seeded throughout. It ends
    with the weights train.keep chooses, and stops early after train.patience epochs with no new best."""
    settings = config.train
    torch.manual_seed(settings.seed)
    model = KeypointNet().to(device, memory_format=memory_format(config))
    if ranks.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = NesterovSGD(model.parameters(), lr=settings.schedules["lr"].start,
                            momentum=settings.schedules["momentum"].start)
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
        # A graph replays one process's kernels; DistributedDataParallel's all-reduces are not in it.
        cuda_graphs=settings.cuda_graphs and device.type == "cuda" and ranks.world_size == 1,
        callbacks=[
            *(AdjustHyperparameter(name, s.start, s.stop) for name, s in settings.schedules.items()),
            # Before the checkpoint, the console and MLflow, which see the history rows they complete.
            KeepBest(restore=settings.keep == "best"),
            *([EarlyStopping(settings.patience)] if settings.patience else []),
        ],
        rank=ranks.rank,
        world_size=ranks.world_size,
    )


def final_figures(history: list[dict]) -> dict:
    """The training's headline figures, for `dvc metrics show`; the rest is in the history."""
    loss, epoch = best_valid(pd.DataFrame(history))
    return {
        "epochs": history[-1]["epoch"],
        "best_epoch": epoch,
        "best_valid_loss": loss,
        "best_valid_rmse_px": float(loss_to_rmse_px(loss)),
    }


def write_history(path: Path, history: list[dict]) -> None:
    """The history without the epochs' times: a committed result must be the same bytes when the
    training is run again (MLflow keeps the times, as epoch_seconds)."""
    columns = [column for column in history[0] if column != "epoch_seconds"]
    with atomic_write(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def kept_weights(net_name: str, history: list[dict], settings: TrainConfig) -> str:
    """One line: the epoch whose weights the training kept, and where it stopped if it stopped early."""
    kept, last = history[history[-1]["kept_epoch"] - 1], history[-1]["epoch"]
    line = (f"train {net_name}: kept the weights of epoch {kept['epoch']} "
            f"({'the lowest valid loss' if settings.keep == 'best' else 'the last epoch'}: "
            f"valid loss {kept['valid_loss']:.6f}, {kept['valid_rmse_px']:.3f} px)")
    if last < settings.max_epochs:
        line += (f"; stopped early after epoch {last} of {settings.max_epochs}: "
                 f"{settings.patience} epochs without a new lowest valid loss")
    return line


def stage_code(module: str = "train") -> list[Path]:
    """pipeline/<module>.py and every pipeline module it runs, directly or not, found by reading
    their import statements (so without importing anything); imports for type checkers only, under
    `if TYPE_CHECKING:`, are not run and do not count."""
    package = Path(__file__).parent
    found, pending = set(), [module]
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending += _imported_modules(ast.parse((package / f"{name}.py").read_text()))
    return sorted(package / f"{name}.py" for name in found)


def _imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        return _imported_modules_of(node.orelse)
    if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
        return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("pipeline.")]
    return _imported_modules_of(ast.iter_child_nodes(node))


def _imported_modules_of(nodes) -> list[str]:
    return [name for child in nodes for name in _imported_modules(child)]


def code_hash() -> str:
    """The train stage's source: a checkpoint saved by other code is not resumed, while an edit to a
    module the stage does not run (predict.py, say) keeps it."""
    return hashlib.sha256(b"".join(file.read_bytes() for file in stage_code())).hexdigest()


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


@reports_errors
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise PipelineError("usage: python -m pipeline.train <net>")
    net_name = args[0]
    config = load_config()
    config.net(net_name)
    ranks = Ranks.from_environment()
    # The lead process of a training holds its net's lock, so that two trainings of one net (a second
    # `dvc repro` beside an orphaned one, say) never write the same checkpoint and MLflow run.
    lock = exclusive_lock(config.paths.training_lock(net_name), f"training {net_name}")
    with lock if ranks.lead else contextlib.nullcontext():
        device = set_up_process(config, ranks)
        if ranks.lead:
            connect()
        with process_group(ranks, device):
            train(config, net_name, device, ranks)


def set_up_process(config: Config, ranks: Ranks = Ranks()) -> torch.device:
    """The training's device, made this process's, with the kernels and allocator the stage trains with."""
    device = resolve_device(config.train.device, ranks)
    use_deterministic_kernels(config.train.deterministic)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the CUDA work that names no device goes to the training's
    reuse_freed_memory()
    return device


def training_settings(config: Config, net_name: str, data_hash: str, device: torch.device, ranks: Ranks) -> dict:
    """What shapes a training's result: a checkpoint saved with other settings is not resumed."""
    return {
        "net": net_name, "train": asdict(config.train), "net_settings": asdict(config.net(net_name)),
        "data_hash": data_hash, "device": device.type, "world_size": ranks.world_size, "code": code_hash(),
    }


def train(config: Config, net_name: str, device: torch.device, ranks: Ranks,
          callbacks: tuple[Callback, ...] = ()) -> None:
    paths = config.paths
    data_hash = read_summary(paths.prepared_summary)["data_hash"]
    training, validation = split(load_faces(paths.train_faces), config.train.valid_fraction, seed=config.train.seed)
    trainer = build_trainer(config, net_name, device, ranks)
    checkpoint = Checkpoint(paths.checkpoint(net_name), training_settings(config, net_name, data_hash, device, ranks),
                            config.checkpoint.interval_seconds, saves=ranks.lead)
    checkpoint.resume(trainer)
    layout = memory_format(config)
    train_data, valid_data = Tensors.of(training, device, layout), Tensors.of(validation, device, layout)
    if not ranks.lead:
        fit(trainer, train_data, valid_data)
        return
    print(f"train {net_name}: {len(training)} train + {len(validation)} valid faces on {device}"
          f"{f' x {ranks.world_size} processes' if ranks.world_size > 1 else ''}, {config.train.max_epochs} epochs"
          f"{f', resuming after epoch {len(trainer.history)}' if trainer.history else ''}")
    params = {
        **flatten(config.to_dict()),
        "net": net_name,
        "flip": config.net(net_name).flip,
        "n_train": len(training),
        "n_valid": len(validation),
        "device": str(device),
        "world_size": ranks.world_size,
    }
    generated = [paths.models, paths.metrics, paths.plots, paths.reports]
    tags = {"data_hash": data_hash, "net": net_name}
    inputs = faces_inputs(read_summary(paths.prepared_summary), training=len(training), validation=len(validation))
    try:
        with training_run(net_name, params, tags, generated, checkpoint.run_id, inputs, device) as run, \
                sigterm_interrupts():
            checkpoint.run_id = run.info.run_id
            logger = MlflowLogger()
            trainer.callbacks += [checkpoint, EpochTable(), logger, *callbacks]
            # Whatever ends the training, the last finished epoch is saved and every epoch logged.
            with logger, checkpoint:
                history = fit(trainer, train_data, valid_data)
            # The net ends with the weights of the kept epoch (callbacks.KeepBest): those are saved and logged.
            print(kept_weights(net_name, history, config.train))
            save_model(paths.model(net_name), trainer.network)
            write_json(paths.model_info(net_name), {
                "net": net_name, "data_hash": data_hash,
                "kept_epoch": history[-1]["kept_epoch"], "config": config.to_dict(),
            })
            write_history(paths.history(net_name), history)
            write_json(paths.train_metrics(net_name), final_figures(history))
            # After the files: a failure to write them (a full disk) leaves no logged model for the
            # rerun to log a second time.
            logger.log_model(trainer.network)
    except KeyboardInterrupt:
        saved = checkpoint.saved_epochs
        raise Interrupted(
            f"train {net_name} interrupted in epoch {len(trainer.history) + 1}; "
            + (f"{checkpoint.path} keeps epochs 1-{saved}: run the stage again (`dvc repro`) to continue" if saved
               else "no epoch had ended, so there is nothing to resume")
        ) from None
    except TrackingError as error:
        saved = checkpoint.saved_epochs
        raise TrackingError(
            f"{error}; " + (f"{checkpoint.path} keeps epochs 1-{saved}: once the store answers, run the stage again"
                            " to log what the run lacks" if saved
                            else "no epoch had ended, so there is nothing to resume")
        ) from None
    # Last: until the files are written and MLflow has the run whole, a rerun resumes from it.
    checkpoint.path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
