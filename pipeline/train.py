"""Stage `train@<net>`: fit one net on the prepared training portion, tracked in MLflow.

Usage: python -m pipeline.train <net>      (a net named under `nets` in params.yaml)
       torchrun --nproc_per_node=N -m pipeline.train <net>      (data-parallel over N processes)

The net is trained once per seed of train.seeds, in their order: the first seed's files are the net's
own (models/<net>.pt, ...), the others' are in models/<net>-seeds/ (PathsConfig).

A training that was stopped (Ctrl-C, SIGTERM, kill -9, a crash) continues from its checkpoint
under paths.checkpoints when run again with the same settings.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.base.config import Config, TrainConfig, flatten, load_config
from pipeline.base.errors import Interrupted, PipelineError
from pipeline.base.files import atomic_write, exclusive_lock, read_json, write_json
from pipeline.base.model import HIDDEN, KeypointNet, parameter_count, start_from
from pipeline.base.reporting import reports_errors
from pipeline.base.sources import code_hash
from pipeline.base.weights import MODEL_REMEDY, checksum, load_checked, save_model, weights_checksum
from pipeline.evaluation.colours import net_colour
from pipeline.evaluation.metrics import best_valid
from pipeline.faces.augment import flip_random_half
from pipeline.faces.data import (faces_for_net, load_faces, load_incomplete_faces, loss_to_rmse_px, read_summary,
                                 split)
from pipeline.tracking.datasets import faces_inputs
from pipeline.tracking.dead_runs import LOCK_TAG, close_dead_runs, lock_tag
from pipeline.tracking.export import example_faces
from pipeline.tracking.logger import MlflowLogger
from pipeline.tracking.runs import COLOUR_TAG, training_run
from pipeline.tracking.store import TrackingError, connect
from pipeline.tracking.trained_by import WEIGHTS_TAG, record_training_run
from pipeline.training.callbacks import EarlyStopping, EpochTable, KeepBest
from pipeline.training.checkpoint import Checkpoint
from pipeline.training.device import (Ranks, place_model, process_group, resolve_device, use_deterministic_kernels,
                                      use_float32_precision, use_portable_cpu_kernels)
from pipeline.training.loop import Callback, DeviceFaces, Trainer, fit
from pipeline.training.memory import reuse_freed_memory
from pipeline.training.optim import NesterovSGD


# Where the checkpoint keeps the MLflow run it continues.
RUN_KEY = "mlflow_run_id"
# The float32 copies of a net's parameters that a training holds at once: the weights, their gradients
# and momentum; KeepBest's copy of the weights; the checkpoint's two epoch states and its writer's,
# each weights and momentum; and the checkpoint file's bytes while it is serialised.
PARAMETER_COPIES = 12
PARAMETER_BYTES = 4


def memory_format(config: Config) -> torch.memory_format:
    return torch.channels_last if config.train.channels_last else torch.contiguous_format


def build_trainer(config: Config, net_name: str, device: torch.device, ranks: Ranks = Ranks(),
                  seed: int | None = None, start: dict | None = None) -> Trainer:
    """The seed's network as the net sets it (dropout, width) and Nesterov SGD, annealed as params.yaml
    says; seeded throughout with `seed` (the first of train.seeds by default). It ends with the weights
    train.keep chooses, and stops early after train.patience epochs with no new best (the net's own
    max_epochs and patience where it sets them). A net started from another's weights (init_from) takes
    `start`, those weights, or reads them (starting_weights)."""
    settings, net = config.train_of(net_name), config.net(net_name)
    seed = settings.seeds[0] if seed is None else seed
    torch.manual_seed(seed)
    network = KeypointNet(**net.model_options())
    if net.init_from is not None:  # after the fresh weights are drawn: the output layer's are those of any net
        start_from(network, start if start is not None else starting_weights(config, net_name, seed)[0])
    model = place_model(network, device, memory_format(config))
    if ranks.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = NesterovSGD(model.parameters(), lr=settings.schedules["lr"].start,
                            momentum=settings.schedules["momentum"].start)
    # Separate streams, so that net4 and net5 see their batches in the same order.
    flip = net.flip
    return Trainer(
        model=model,
        optimizer=optimizer,
        max_epochs=settings.max_epochs,
        batch_size=settings.batch_size,
        generator=torch.Generator(device=device).manual_seed(seed),
        augment=functools.partial(flip_random_half, columns=net.columns) if flip else None,
        augment_generator=torch.Generator(device=device).manual_seed(seed + 1) if flip else None,
        schedules={name: (schedule.start, schedule.stop) for name, schedule in settings.schedules.items()},
        keep_best=settings.keep == "best",
        bf16=settings.bf16,
        masked=bool(net.masked),
        # A graph replays one process's kernels; DistributedDataParallel's all-reduces are not in it.
        cuda_graphs=settings.cuda_graphs and device.type == "cuda" and ranks.world_size == 1,
        callbacks=[
            *([KeepBest()] if settings.keep == "best" else []),
            *([EarlyStopping(settings.patience)] if settings.patience else []),
        ],
        rank=ranks.rank,
        world_size=ranks.world_size,
    )


def starting_weights(config: Config, net_name: str, seed: int) -> tuple[dict, str]:
    """The kept weights of the net that nets.<net_name>.init_from names, trained under `seed`, and their
    checksum: refused unless that net's record says they were trained on today's prepared data with the
    params params.yaml gives it (weights of an older training would start this net from another place)."""
    paths, source = config.paths, config.net(net_name).init_from
    key, files_seed = f"nets.{net_name}.init_from", config.files_seed(seed)
    path, info_path = paths.model(source, files_seed), paths.model_info(source, files_seed)
    retrain = f"train {source} first (`dvc repro train@{source}`)"
    if not path.is_file() or not info_path.is_file():
        raise PipelineError(f"{key}: {path}: no such file: {retrain}")
    info = read_json(info_path, retrain)
    if (info.get("config") != config.training_params(source, seed)
            or info.get("data_hash") != read_summary(paths.prepared_summary)["data_hash"]):
        raise PipelineError(f"{key}: {path} was trained with other params or data than params.yaml and the prepared "
                            f"data give {source} now: {retrain}")
    weights = load_checked(path, MODEL_REMEDY)
    if checksum(weights) != info.get(WEIGHTS_TAG):
        raise PipelineError(f"{key}: {path}: not the weights {info_path} records: {retrain}")
    return weights, info[WEIGHTS_TAG]


def final_figures(history: list[dict], train_faces: int) -> dict:
    """The training's headline figures, for `dvc metrics show`; the rest is in the history. `train_faces`:
    the faces it trained on (its validation part apart), which a specialist or a masked net has more of."""
    loss, epoch = best_valid(pd.DataFrame(history))
    # Not the loss itself: its RMSE says the same in pixels, and a column more in `dvc metrics show` would
    # widen it past a terminal's 200 characters (the history and MLflow have the loss).
    return {
        "train_faces": train_faces,
        "epochs": history[-1]["epoch"],
        "best_epoch": epoch,
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


def kept_weights_line(net_name: str, history: list[dict], settings: TrainConfig) -> str:
    """One line: the epoch whose weights the training kept, and where it stopped if it stopped early."""
    kept, last = history[history[-1]["kept_epoch"] - 1], history[-1]["epoch"]
    line = (f"train {net_name}: kept the weights of epoch {kept['epoch']} "
            f"({'the lowest valid loss' if settings.keep == 'best' else 'the last epoch'}: "
            f"valid loss {kept['valid_loss']:.6f}, {kept['valid_rmse_px']:.3f} px)")
    if last < settings.max_epochs:
        line += (f"; stopped early after epoch {last} of {settings.max_epochs}: "
                 f"{settings.patience} epochs without a new lowest valid loss")
    return line


def memory_limit() -> int:
    """The bytes this process may use at most: the machine's memory, or less under `ulimit -v`."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return physical if soft == resource.RLIM_INFINITY else min(physical, soft)


def check_net_fits(config: Config, net_name: str) -> None:
    """Refuse, before any work, a net whose parameters alone cannot fit in memory as it trains."""
    hidden = config.net(net_name).hidden or HIDDEN
    parameters = parameter_count(**config.net(net_name).model_options())
    needed, limit = parameters * PARAMETER_BYTES * PARAMETER_COPIES, memory_limit()
    if needed > limit:
        raise PipelineError(
            f"nets.{net_name}.hidden: {hidden} makes a net of {parameters:,} parameters, and training it needs "
            f"{gigabytes(needed)} for them ({PARAMETER_COPIES} copies), more than the {gigabytes(limit)} of memory "
            "this process may use: use a smaller hidden"
        )


def gigabytes(count: int) -> str:
    return f"{count / 1e9:,.1f} GB"


@reports_errors(memory_knobs="lower train.batch_size, or nets.<net>.hidden")
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise PipelineError("usage: python -m pipeline.train <net>")
    net_name = args[0]
    config = load_config()
    check_net_fits(config, net_name)
    ranks = Ranks.from_environment()
    # The lead process of a training holds its net's lock, so that two trainings of one net (a second
    # `dvc repro` beside an orphaned one, say) never write the same checkpoint and MLflow run.
    lock = exclusive_lock(config.paths.training_lock(net_name), f"training {net_name}")
    with lock if ranks.lead else contextlib.nullcontext():
        device = set_up_process(config, ranks)
        if ranks.lead:
            connect()
        with process_group(ranks, device):
            for seed in config.train.seeds:
                train(config, net_name, device, ranks, seed=seed)
        if ranks.lead:
            keep_only_listed_seeds(config, net_name)


def keep_only_listed_seeds(config: Config, net_name: str) -> None:
    """The net's folder of seeds (an output of train@<net>) with the files of the seeds train.seeds lists
    after the first and no others (those of a longer list, trained earlier, would be evaluated with
    today's), and its index of them: a folder never empty, which DVC would warn of at every run."""
    paths, seeds = config.paths, config.train.seeds[1:]
    folder = paths.seeds_folder(net_name)
    folder.mkdir(parents=True, exist_ok=True)
    listed = {path.name for seed in seeds
              for path in (paths.model(net_name, seed), paths.model_info(net_name, seed),
                           paths.history(net_name, seed), paths.train_metrics(net_name, seed))}
    index = paths.seeds_index(net_name)
    for path in folder.iterdir():
        if path.name not in listed and path != index and path.is_file():
            path.unlink()
    write_json(index, {"net": net_name, "first_seed": config.train.seeds[0], "seeds_here": list(seeds)})


def set_up_process(config: Config, ranks: Ranks = Ranks()) -> torch.device:
    """The training's device, made this process's, with the kernels and allocator the stage trains with."""
    device = resolve_device(config.train.device, ranks)
    use_deterministic_kernels(config.train.deterministic)
    use_float32_precision(config.train.tf32)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the CUDA work that names no device goes to the training's
    else:
        use_portable_cpu_kernels(config.train.portable_cpu)
    reuse_freed_memory()
    return device


def training_settings(config: Config, net_name: str, data_hash: str, device: torch.device, ranks: Ranks,
                      seed: int | None = None, started_from: dict | None = None) -> dict:
    """What shapes a training's result: a checkpoint saved with other settings is not resumed.
    `started_from`: a net started from another's weights records them (Training.started_from)."""
    seed = config.train.seeds[0] if seed is None else seed
    return {
        "net": net_name, "train": config.train_of(net_name).of_seed(seed), **(started_from or {}),
        "net_settings": config.net(net_name).to_dict(),
        "data_hash": data_hash, "device": device.type, "world_size": ranks.world_size,
        "code": code_hash("pipeline.train"),
        # How cuBLAS sums on a GPU (device.use_deterministic_kernels), which the params do not say.
        "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def train(config: Config, net_name: str, device: torch.device, ranks: Ranks,
          callbacks: tuple[Callback, ...] = (), seed: int | None = None) -> None:
    """One training, under `seed` (the first of train.seeds by default), in three phases: restore it
    from its checkpoint or start it, fit it in its MLflow run, finish it (the files, then the logged
    model). Other ranks than the lead only fit."""
    seed = config.train.seeds[0] if seed is None else seed
    training = restore_or_start(config, net_name, seed, device, ranks)
    if not ranks.lead:
        fit(training.trainer, training.train_faces, training.valid_faces)
        return
    seeds = config.train.seeds
    under = f" under seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})" if len(seeds) > 1 else ""
    print(f"train {net_name}{under}: {len(training.train_faces)} train + {len(training.valid_faces)} valid faces on {device}"
          f"{f' x {ranks.world_size} processes' if ranks.world_size > 1 else ''}, {training.trainer.max_epochs} epochs"
          f"{f', resuming after epoch {len(training.trainer.history)}' if training.trainer.history else ''}")
    # SIGTERM stops it as Ctrl-C does (reports_errors); the stop's line says what the checkpoint keeps.
    with stop_says_what_checkpoint_keeps(net_name, training), \
            tracked_run(config, net_name, training, device, ranks) as logger:
        history = fit_checkpointed(training, logger, callbacks)
        finish(config, net_name, training, history, logger)
    # Last: until the files are written and MLflow has the run whole, a rerun resumes from it.
    training.checkpoint.path.unlink(missing_ok=True)


@dataclass
class Training:
    """One net's training under one seed, ready to fit: restored from its checkpoint, or at its first epoch."""

    seed: int
    trainer: Trainer
    checkpoint: Checkpoint
    train_faces: DeviceFaces
    valid_faces: DeviceFaces
    summary: dict  # prepare's: the data's hash and source
    # A net started from another's weights: {"init_from": {"net": that net, WEIGHTS_TAG: their checksum}}.
    started_from: dict


def restore_or_start(config: Config, net_name: str, seed: int, device: torch.device, ranks: Ranks) -> Training:
    """Phase 1: the data on the device, the seeded trainer, and its checkpoint's state if it has one."""
    paths = config.paths
    summary, net = read_summary(paths.prepared_summary), config.net(net_name)
    # Every complete face, and the incomplete ones labelled for the net's keypoints (faces_for_net): none
    # for a net of all 15 that is not masked, which reads the complete faces alone, as the seed's nets did.
    faces = load_faces(paths.train_faces, summary)
    if net.keypoints is not None or net.masked:
        faces = faces_for_net(faces, load_incomplete_faces(paths.train_incomplete_faces, summary), net.columns,
                              bool(net.masked))
    train_set, valid_set = split(faces, config.train.valid_fraction, seed=seed, key="train.valid_fraction")
    start, started_from = None, {}
    if net.init_from is not None:
        start, start_checksum = starting_weights(config, net_name, seed)
        started_from = {"init_from": {"net": net.init_from, WEIGHTS_TAG: start_checksum}}
    trainer = build_trainer(config, net_name, device, ranks, seed, start)
    checkpoint = Checkpoint(paths.checkpoint(net_name, config.files_seed(seed)),
                            training_settings(config, net_name, summary["data_hash"], device, ranks, seed,
                                              started_from),
                            config.checkpoint.interval_seconds, saves=ranks.lead)
    checkpoint.resume(trainer)
    layout = memory_format(config)
    return Training(seed, trainer, checkpoint, DeviceFaces.of(train_set, device, layout),
                    DeviceFaces.of(valid_set, device, layout), summary, started_from)


@contextlib.contextmanager
def tracked_run(config: Config, net_name: str, training: Training, device: torch.device,
                ranks: Ranks) -> Iterator[MlflowLogger]:
    """The net's MLflow run, the checkpoint's own when it resumes one, and the logger that fills it."""
    params = {
        **flatten(trained_config(config, net_name, training.seed)),
        "net": net_name,
        # The training's seed under a short name, to group and filter runs by in the UI (docs/mlflow.md).
        "seed": training.seed,
        "flip": config.net(net_name).flip,
        # The architecture of every net, net4's too, so that the runs table compares them.
        "hidden": training.trainer.network.hidden,
        "dropout": list(training.trainer.network.dropout),
        "n_train": len(training.train_faces),
        "n_valid": len(training.valid_faces),
        "device": str(device),
        "world_size": ranks.world_size,
        # Which CPU kernels computed it: the bits of a training without train.portable_cpu depend on them.
        **({"cpu_capability": torch.backends.cpu.get_cpu_capability()} if device.type == "cpu" else {}),
    }
    paths = config.paths
    generated = [paths.models, paths.metrics, paths.plots, paths.reports]
    # The net's colour in the pictures, for the UI's charts and runs table.
    lock = paths.training_lock(net_name)  # held by main()
    tags = {"data_hash": training.summary["data_hash"], "net": net_name,
            COLOUR_TAG: net_colour(list(config.nets).index(net_name)), LOCK_TAG: lock_tag(lock)}
    inputs = faces_inputs(training.summary, training=len(training.train_faces), validation=len(training.valid_faces))
    resumed_run = training.checkpoint.extra.get(RUN_KEY)
    with training_run(net_name, params, tags, generated, resumed_run, inputs, device) as run:
        close_dead_runs(net_name, lock, run.info)
        training.checkpoint.extra[RUN_KEY] = run.info.run_id
        yield MlflowLogger(resumed=resumed_run is not None)


def fit_checkpointed(training: Training, logger: MlflowLogger, callbacks: tuple[Callback, ...]) -> list[dict]:
    """Phase 2: the epochs, each saved by the checkpoint, shown on the console and logged."""
    trainer, checkpoint = training.trainer, training.checkpoint
    trainer.callbacks += [checkpoint, EpochTable(), *callbacks]
    # Whatever ends the training, the last finished epoch is saved and every epoch logged.
    with logger, checkpoint:
        return fit(trainer, training.train_faces, training.valid_faces, logger)


def finish(config: Config, net_name: str, training: Training, history: list[dict], logger: MlflowLogger) -> None:
    """Phase 3: the net ends with the weights of the kept epoch (callbacks.KeepBest): those are saved,
    with the files DVC tracks, and then logged."""
    paths, network, seed = config.paths, training.trainer.network, config.files_seed(training.seed)
    print(kept_weights_line(net_name, history, config.train_of(net_name)))
    save_model(paths.model(net_name, seed), network)
    weights = weights_checksum(network)
    write_json(paths.model_info(net_name, seed), {
        "net": net_name, "data_hash": training.summary["data_hash"], "kept_epoch": history[-1]["kept_epoch"],
        "config": config.training_params(net_name, training.seed), WEIGHTS_TAG: weights,
        **training.started_from,
    })
    write_history(paths.history(net_name, seed), history)
    write_json(paths.train_metrics(net_name, seed), final_figures(history, len(training.train_faces)))
    # The run and the checksum let evaluate register this training's own model, and no run planted
    # in a shared store with the same tags.
    record_training_run(paths.training_runs, net_name, weights, logger.run_id)
    # After the files: a failure to write them (a full disk) leaves no logged model for the rerun to
    # log a second time. A net of some keypoints answers as part of a composite (its model is logged there).
    if net_name in config.full_nets:
        logger.log_model(network, example_faces(training.train_faces.images))


def trained_config(config: Config, net_name: str, seed: int) -> dict:
    """The params as the net trains with them under `seed`, for its MLflow run: train.* with the net's
    own max_epochs and patience and the seed (TrainConfig.of_seed), and every net as params.yaml gives
    it, so that net4's and net5's runs have the params of the code before net options."""
    return {**config.to_dict(), "train": config.train_of(net_name).of_seed(seed)}


@contextlib.contextmanager
def stop_says_what_checkpoint_keeps(net_name: str, training: Training) -> Iterator[None]:
    """An interrupt or a store that fails, as one line saying what the checkpoint keeps."""
    checkpoint = training.checkpoint
    try:
        yield
    except KeyboardInterrupt:
        saved = checkpoint.saved_epochs
        raise Interrupted(
            f"train {net_name} interrupted in epoch {len(training.trainer.history) + 1}; "
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


if __name__ == "__main__":
    main()
