"""Does a CPU training give the same bits on any x86-64 CPU and any thread count, and what does that cost?

Usage: python -m benchmarks.portability [FACES [EPOCHS [ROUNDS [SETTING,...]]]]      (default: 400 2 5 all)
       python benchmarks/portability.py [FACES [EPOCHS [ROUNDS [SETTING,...]]]]

Renders FACES synthetic faces (those with every keypoint are kept and split train/valid as the
stage splits them), then for every setting below trains net4 for EPOCHS epochs with the stage's
trainer (pipeline.train.build_trainer, set up as set_up_process sets up the stage's process), in a
fresh process per run, since the libraries read their settings when they first compute: on each
emulated CPU (the instruction sets capped: avx512 = this machine, avx2, default = SSE4) and with
1, 2 and 4 threads (4 on a 2-core machine is oversubscribed, but the same arithmetic as on 4
cores). It prints every run (the final weights' checksum, the losses in full precision, the
seconds per epoch), then per setting whether the bits agree across the runs, and its speed: one
process per setting on this CPU with 2 threads, taking turns epoch by epoch for ROUNDS rounds
after a warm-up epoch; the median epoch, and the median of the rounds' ratios to the first
setting (the machine's speed drifts, and it may be shared). SETTING,...: some of SETTINGS' names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project's root on the path, as `python -m` has it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from pipeline.base.config import Config, load_config
from pipeline.base.weights import weights_checksum
from pipeline.faces.data import FaceSet, images_of, scale_keypoints, split
from pipeline.faces.synthetic import render_faces
from pipeline.train import build_trainer, memory_format, set_up_process
from pipeline.training.device import PORTABLE_CPU_KERNELS
from pipeline.training.loop import Callback, DeviceFaces, fit

ROOT = Path(__file__).resolve().parents[1]
NET = "net4"
DEFAULTS = (400, 2, 5)  # faces, epochs, timing rounds
THREADS = (1, 2, 4)
WORKER_FLAG = "--worker"

# The instruction-set levels each library is capped at, lowest first: ATen's vectorised kernels,
# oneDNN's JIT kernels (convolutions), MKL's code path (matrix products).
ATEN_LEVELS = ("default", "avx2", "avx512")
ONEDNN_LEVELS = ("SSE41", "AVX2", "AVX512_CORE", "ALL")


@dataclass(frozen=True)
class Machine:
    """Another x86-64 CPU, emulated on this one by capping what each library may use."""

    name: str
    aten: str  # ATEN_CPU_CAPABILITY
    onednn: str  # ONEDNN_MAX_CPU_ISA
    mkl: str | None  # MKL_ENABLE_INSTRUCTIONS (None: what the CPU has)


MACHINES = (
    Machine("avx512", "avx512", "ALL", None),  # this CPU (it also has AMX, which oneDNN may use)
    Machine("avx2", "avx2", "AVX2", "AVX2"),  # Haswell (2013) to Alder Lake, AMD Zen 1-3
    Machine("default", "default", "SSE41", "SSE4_2"),  # any x86-64 CPU of the last 15 years
)


@dataclass(frozen=True)
class Setting:
    """How a training process is set up: environment variables read when the libraries first
    compute, and torch switches made before the model is built."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    mkldnn: bool = True  # torch.backends.mkldnn.enabled: oneDNN's convolutions, else ATen's im2col + MKL
    channels_last: bool = True  # train.channels_last
    threads: int | None = None  # torch.set_num_threads, whatever the machine has

    def describe(self) -> str:
        parts = [f"{name}={value}" for name, value in self.env.items()]
        parts += [] if self.mkldnn else ["mkldnn off"]
        parts += [] if self.channels_last else ["NCHW"]
        parts += [] if self.threads is None else [f"{self.threads} thread"]
        return ", ".join(parts) or "as the stage trains now"


AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SETTINGS = (
    Setting("stage"),
    # MKL's strict mode: its matrix products no longer depend on the number of threads.
    Setting("strict", {"MKL_CBWR": "AUTO,STRICT"}),
    Setting("caps-avx2", {**AVX2_CAPS, "MKL_CBWR": "AVX2"}),
    Setting("caps-avx2-strict", dict(PORTABLE_CPU_KERNELS)),  # train.portable_cpu: true
    Setting("nodnn-avx2-strict", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}, mkldnn=False),
    Setting("nodnn-default-sse42", {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2"}, mkldnn=False),
    # Across CPU makers: oneDNN chooses its blocking by the CPU's cache sizes, and MKL honours a CNR
    # branch other than AUTO and COMPATIBLE on Intel CPUs only (on others MKL_VERBOSE=1 reports
    # CNR:AUTO); COMPATIBLE (SSE2) is its one branch alike on both, without a strict mode.
    Setting("nodnn-compatible", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}, mkldnn=False),
)


def lower(levels: tuple[str, ...], first: str | None, second: str | None) -> str | None:
    present = [level for level in (first, second) if level is not None]
    return min(present, key=levels.index) if present else None


def process_env(setting: Setting, machine: Machine, threads: int) -> dict[str, str]:
    """The setting's variables on the emulated machine: a setting cannot raise a cap the CPU sets."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR",
                           "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(setting.env)
    env["ATEN_CPU_CAPABILITY"] = lower(ATEN_LEVELS, setting.env.get("ATEN_CPU_CAPABILITY"), machine.aten)
    env["ONEDNN_MAX_CPU_ISA"] = lower(ONEDNN_LEVELS, setting.env.get("ONEDNN_MAX_CPU_ISA"), machine.onednn)
    if machine.mkl is not None:
        env["MKL_ENABLE_INSTRUCTIONS"] = machine.mkl  # below what MKL_CBWR asks, MKL takes this one
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MKL_DYNAMIC="FALSE",
               BENCHMARK_THREADS=str(threads), PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    return env


# --- the worker: one training in a process of its own ---------------------------------------------

class TakeTurns(Callback):
    """Waits for a line on stdin before each epoch; writes each epoch's row as a line of JSON."""

    def on_epoch_begin(self, trainer, epoch):
        if not sys.stdin.readline():
            raise SystemExit(0)

    def on_epoch_finished(self, trainer, history):
        row = history[-1]
        print(json.dumps({"epoch": row["epoch"], "train_loss": row["train_loss"], "valid_loss": row["valid_loss"],
                          "seconds": row["epoch_seconds"]}), flush=True)


def worker(spec: dict) -> None:
    setting = Setting(**spec["setting"])
    config = load_config(ROOT / "params.yaml")
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, max_epochs=spec["epochs"], channels_last=setting.channels_last, device="cpu"))
    device = set_up_process(config)  # the stage's kernels and allocator
    torch.backends.mkldnn.enabled = setting.mkldnn
    # torch takes no more threads from OMP_NUM_THREADS than the machine has cores; asked, it takes them.
    torch.set_num_threads(setting.threads or int(os.environ["BENCHMARK_THREADS"]))
    with np.load(spec["faces"]) as stored:
        training, validation = (FaceSet(stored[f"{part}_X"], stored[f"{part}_y"]) for part in ("train", "valid"))
    trainer = build_trainer(config, NET, device)
    trainer.callbacks.append(TakeTurns())
    layout = memory_format(config)
    fit(trainer, DeviceFaces.of(training, device, layout), DeviceFaces.of(validation, device, layout))
    print(json.dumps({"checksum": weights_checksum(trainer.network), "threads": torch.get_num_threads(),
                      "aten": torch.backends.cpu.get_cpu_capability()}), flush=True)


# --- the parent ------------------------------------------------------------------------------------

class Worker:
    def __init__(self, setting: Setting, machine: Machine, threads: int, faces: Path, epochs: int):
        spec = {"setting": dataclasses.asdict(setting), "faces": str(faces), "epochs": epochs}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.portability", WORKER_FLAG, json.dumps(spec)], cwd=ROOT,
            env=process_env(setting, machine, threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def epoch(self) -> dict:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker died (exit code {self.process.wait()})")
        return json.loads(line)

    def finish(self) -> dict:
        self.process.stdin.close()
        ending = self.read()
        self.process.wait(timeout=60)
        return ending


@dataclass
class Run:
    setting: Setting
    machine: Machine
    threads: int
    epochs: list[dict]
    ending: dict

    @property
    def bits(self) -> tuple:
        """What must agree: the weights and every loss."""
        return (self.ending["checksum"], *((row["train_loss"], row["valid_loss"]) for row in self.epochs))

    def line(self) -> str:
        losses = " ".join(f"{row['train_loss']!r}/{row['valid_loss']!r}" for row in self.epochs)
        seconds = " ".join(f"{row['seconds']:.2f}" for row in self.epochs)
        return (f"{self.setting.name:<23} {self.machine.name:<7} {self.threads} thr (aten {self.ending['aten']:<7}) "
                f"weights {self.ending['checksum'][:12]}  train/valid {losses}  s/epoch {seconds}")


def train_once(setting: Setting, machine: Machine, threads: int, faces: Path, epochs: int) -> Run:
    worker_process = Worker(setting, machine, threads, faces, epochs)
    rows = [worker_process.epoch() for _ in range(epochs)]
    return Run(setting, machine, threads, rows, worker_process.finish())


def time_interleaved(settings: tuple[Setting, ...], faces: Path, rounds: int) -> dict[str, list[float]]:
    """One epoch of every setting per round, one process computing at a time, on this CPU with 2
    threads: the machine's drift and its other users hit every setting alike. The first epoch warms up."""
    workers = {setting.name: Worker(setting, MACHINES[0], 2, faces, rounds + 1) for setting in settings}
    seconds = {name: [] for name in workers}
    try:
        for _ in range(rounds + 1):
            for name, worker_process in workers.items():
                seconds[name].append(worker_process.epoch()["seconds"])
    finally:
        for worker_process in workers.values():
            worker_process.process.kill()
            worker_process.process.wait()
    return {name: values[1:] for name, values in seconds.items()}


def write_faces(path: Path, config: Config, n_faces: int) -> tuple[int, int]:
    """Synthetic faces as the prepare stage gives them to training (complete rows only), split as the train stage
    splits."""
    settings = config.synthetic
    images, keypoints = render_faces(n_faces, settings.seed, settings.missing_fraction, settings.missing_pattern)
    complete = ~np.isnan(keypoints).any(axis=1)
    faces = FaceSet(images_of(images[complete][:, None]), scale_keypoints(keypoints[complete]))
    training, validation = split(faces, config.train.valid_fraction, seed=config.train.seeds[0],
                                 key="train.valid_fraction")
    np.savez(path, train_X=training.X, train_y=training.y, valid_X=validation.X, valid_y=validation.y)
    return len(training), len(validation)


def agreement(runs: list[Run]) -> dict[str, str]:
    """Per setting: do the bits agree across threads on each machine, across machines, everywhere."""
    def same(subset: list[Run]) -> str:
        return "same" if len({run.bits for run in subset}) == 1 else "DIFFER"

    columns = {f"thr@{machine.name}": same([run for run in runs if run.machine == machine]) for machine in MACHINES}
    columns["isa avx512=avx2"] = same([run for run in runs if run.machine.name in ("avx512", "avx2")])
    columns["everywhere"] = same(runs)
    columns["distinct"] = str(len({run.bits for run in runs}))
    valid = [run.epochs[-1]["valid_loss"] for run in runs]
    columns["valid spread"] = f"{(max(valid) - min(valid)) / min(valid):.1e}"
    return columns


def summary_table(settings: tuple[Setting, ...], runs: list[Run], seconds: dict[str, list[float]]) -> str:
    """One row per setting; its speed against the first setting's: the median of the rounds' ratios,
    which the machine's drift between rounds does not move."""
    baseline = seconds[settings[0].name]
    header = None
    lines = []
    for setting in settings:
        columns = agreement([run for run in runs if run.setting == setting])
        median = statistics.median(seconds[setting.name])
        columns["s/epoch"] = f"{median:.2f}"
        ratio = statistics.median(ours / theirs for ours, theirs in zip(seconds[setting.name], baseline))
        columns[f"vs {settings[0].name}"[:15]] = f"{100 * (ratio - 1):+.0f}%"
        if header is None:
            header = f"{'setting':<23} " + " ".join(f"{name:>15}" for name in columns)
        lines.append(f"{setting.name:<23} " + " ".join(f"{value:>15}" for value in columns.values()))
    return "\n".join([header, *lines])


def machine_description() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (f"machine: {model}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"ATen capability {torch.backends.cpu.get_cpu_capability()}, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [WORKER_FLAG]:
        worker(json.loads(args[1]))
        return
    n_faces, epochs, rounds = (int(value) for value in (*args[:3], *DEFAULTS[len(args):]))
    chosen = args[3].split(",") if len(args) > 3 and args[3] != "all" else [setting.name for setting in SETTINGS]
    settings = tuple(setting for setting in SETTINGS if setting.name in chosen)
    if len(settings) != len(chosen):
        raise SystemExit(f"unknown setting among {args[3]}: the settings are {', '.join(s.name for s in SETTINGS)}")
    config = load_config(ROOT / "params.yaml")
    print(machine_description())
    with tempfile.TemporaryDirectory(prefix="portability-") as scratch:
        faces = Path(scratch) / "faces.npz"
        n_train, n_valid = write_faces(faces, config, n_faces)
        print(f"{NET}: {n_train} train + {n_valid} valid synthetic faces, batch {config.train.batch_size}, "
              f"{epochs} epochs; every run in a fresh process\n")
        print("settings:")
        for setting in settings:
            print(f"  {setting.name:<23} {setting.describe()}")
        print("emulated CPUs: " + "; ".join(
            f"{m.name} = ATEN_CPU_CAPABILITY<={m.aten}, ONEDNN_MAX_CPU_ISA<={m.onednn}, "
            f"MKL_ENABLE_INSTRUCTIONS={m.mkl or 'all'}" for m in MACHINES) + "\n")
        runs = []
        started = time.perf_counter()
        for setting in settings:
            for machine in MACHINES:
                for threads in THREADS:
                    runs.append(train_once(setting, machine, threads, faces, epochs))
                    print(runs[-1].line(), flush=True)
        print(f"({time.perf_counter() - started:.0f} s)\n")
        seconds = time_interleaved(settings, faces, rounds)
    print(f"speed: on this CPU (avx512), 2 threads, median of {rounds} epochs of {n_train + n_valid} faces, the "
          f"settings taking turns epoch by epoch")
    for name, values in seconds.items():
        print(f"  {name:<23} " + " ".join(f"{value:.2f}" for value in values))
    print()
    print(summary_table(settings, runs, seconds))
    print(f"thr@X: {THREADS} threads give the same bits on CPU X; isa: the same across CPUs; distinct: how many "
          f"different results of the {len(MACHINES) * len(THREADS)} runs; valid spread: the last valid loss's "
          "relative range over them")


if __name__ == "__main__":
    main()
