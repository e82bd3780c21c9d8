import re
import shutil
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import device_speed, portability, reference, train_speed
from pipeline.base.model import KeypointNet
from pipeline.faces.data import FaceSet
from pipeline.training.loop import DeviceFaces, Trainer, run_epoch
from tests.support.project import ROOT, make_project, run, write_params

# Every batch full, so an epoch's mean loss is the plain mean of its batch losses.
BATCH_SIZE, N_IMAGES, EPOCHS = 16, 48, 3
LR, MOMENTUM = 0.01, 0.9


def faces_of(dtype: torch.dtype) -> FaceSet:
    faces = train_speed.random_faces(N_IMAGES, seed=1)
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return FaceSet(faces.X.astype(numpy_dtype), faces.y.astype(numpy_dtype))


def project_trainer(dtype: torch.dtype) -> Trainer:
    torch.manual_seed(0)
    model = KeypointNet().to(dtype, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True)
    return Trainer(model, optimizer, EPOCHS, BATCH_SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the project with the benchmarks and the default params, where they run: they read the
    params.yaml beside them, and a user's `dvc exp run -S ...` may have changed the work tree's."""
    project = make_project(tmp_path_factory.mktemp("benchmarks") / "project", git=False)
    write_params(project)  # the defaults, not make_project's tiny ones: the benchmarks choose their sizes
    for folder in ("benchmarks", "tests/support"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def upcoming_orders(generator: torch.Generator, n: int, epochs: int) -> list[list[int]]:
    """The permutations run_epoch will draw, read from a copy of its generator."""
    replay = torch.Generator().set_state(generator.get_state())
    return [torch.randperm(n, generator=replay).tolist() for _ in range(epochs)]


@pytest.mark.slow
# In float32 the NCHW and channels_last kernels sum in different orders, and SGD on noise
# amplifies the rounding; in float64 the two loops agree to rounding, which shows the maths is
# the same. The project sums its losses in the targets' dtype.
@pytest.mark.parametrize("dtype, loss_rtol, weight_atol", [
    (torch.float32, 1e-4, 1e-4),
    (torch.float64, 1e-9, 1e-9),
])
def test_reference_and_project_loops_give_the_same_losses_and_weights(dtype, loss_rtol, weight_atol):
    faces = faces_of(dtype)
    trainer = project_trainer(dtype)
    net = reference.reference_net().to(dtype)
    reference.load_keypoint_net_weights(net, trainer.model)
    optimizer = reference.make_optimizer(net, lr=LR, momentum=MOMENTUM)
    dataset = TensorDataset(torch.from_numpy(faces.X), torch.from_numpy(faces.y))
    orders = upcoming_orders(trainer.generator, N_IMAGES, EPOCHS)

    project_losses = [float(run_epoch(trainer, DeviceFaces.of(faces, torch.device("cpu")), train=True))
                      for _ in range(EPOCHS)]
    reference_losses = []
    for order in orders:
        # The same batches in the same order: a DataLoader takes any sequence of indices as its sampler.
        batch_losses = reference.train_epoch(net, DataLoader(dataset, batch_size=BATCH_SIZE, sampler=order), optimizer)
        reference_losses.append(sum(batch_losses) / len(batch_losses))

    assert reference_losses[-1] < reference_losses[0]
    torch.testing.assert_close(torch.tensor(project_losses), torch.tensor(reference_losses), rtol=loss_rtol, atol=0)
    for ours, theirs in zip(trainer.model.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=weight_atol)


def test_weights_load_from_a_state_dict_by_position():
    source = KeypointNet().to(memory_format=torch.channels_last)
    net = reference.reference_net()
    reference.load_keypoint_net_weights(net, source.state_dict())
    for ours, theirs in zip(source.parameters(), net.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert net[0].weight.is_contiguous()


def test_weights_of_another_shape_are_refused():
    state = KeypointNet().state_dict()
    state["head.5.weight"] = torch.zeros(2, 500)
    with pytest.raises(ValueError, match="head.5.weight has shape"):
        reference.load_keypoint_net_weights(reference.reference_net(), state)


@pytest.mark.slow
def test_benchmark_prints_every_row(checkout, capsys, monkeypatch):
    monkeypatch.setattr(train_speed, "ROOT", checkout)  # where it reads params.yaml
    train_speed.main(["--images", "128", "--epochs", "2", "--skip-csv", "--skip-dvc"])
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ")
    # The table's rows: a loop's name, then its allocator.
    rows = {line.split()[0]: line.split() for line in printed.splitlines()
            if re.match(r"\S+ +(reuse|default) +[\d.]+ ", line)}
    assert set(rows) == {"reference", "net4", "net5", "ref+alloc"}
    for loop in ("reference", "net4", "net5", "ref+alloc"):
        epoch_seconds, images_per_second, ms_per_image = map(float, rows[loop][2:5])
        # Each figure is the others' arithmetic: 128 images in the median epoch. The seconds are printed
        # to 0.01 and the rate to 0.1, so the check is that the seconds both roundings allow overlap.
        seconds_by_rate = (128 / (images_per_second + 0.05), 128 / (images_per_second - 0.05))
        seconds_printed = (epoch_seconds - 0.005, epoch_seconds + 0.005)
        assert seconds_by_rate[0] <= seconds_printed[1] + 1e-9 and seconds_printed[0] <= seconds_by_rate[1] + 1e-9
        assert ms_per_image == pytest.approx(1000 / images_per_second, rel=0.01, abs=0.01)
        assert rows[loop][5].endswith("x") and float(rows[loop][5][:-1]) > 0
    assert rows["reference"][5] == "1.00x"
    speedup = re.search(r"net4 speed-up over the reference: ([\d.]+)x", printed)
    assert speedup and float(speedup.group(1)) == pytest.approx(float(rows["net4"][5][:-1]), abs=0.011)
    assert "flip overhead over net4" in printed
    assert "Kaggle-size CSV" not in printed and "dvc repro" not in printed


@pytest.mark.slow
def test_stage_overhead_benchmark_times_the_real_stage(checkout):
    # In a process of its own, as it is run: it sets the process's allocator and kernels as the stage does.
    lines = run(checkout, sys.executable, "-m", "benchmarks.stage_overhead", "--epochs", "3", "--faces", "120").stdout.splitlines()
    assert lines[-4].startswith("device: cpu, torch ") and lines[-4].endswith(", 3 epochs")
    outside = re.search(r"outside them: median ([\d.]+) ms = ([\d.]+) % of the passes", lines[-3])
    assert outside and float(outside.group(1)) > 0
    written = re.search(r"disk writes: ([\d.]+) MB in all: during the epochs (\d+) checkpoints of ([\d.]+) MB", lines[-2])
    # 96 MB of training state (weights, momentum and the kept epoch's weights), and at least the model and the
    # final state written.
    assert written and 90 < float(written.group(3)) < 100 and float(written.group(1)) > 2 * float(written.group(3))
    assert lines[-1].startswith("projected to 3000 epochs of ")


def test_the_flop_count_is_the_seed_networks():
    """By hand, the multiply-adds: convolutions 94x94x32x9, 46x46x64x32x4, 22x22x128x64x4; dense layers
    15488x500, 500x500, 500x30."""
    convolutions = 94 * 94 * 32 * 9 + 46 * 46 * 64 * 32 * 4 + 22 * 22 * 128 * 64 * 4
    multiply_adds = convolutions + 15488 * 500 + 500 * 500 + 500 * 30
    training, validation = device_speed.flops_per_image(KeypointNet())
    assert validation == 2 * multiply_adds and training == 3 * validation
    assert round(training / 1e9, 2) == 0.26 and round(validation / 1e9, 2) == 0.09  # the figures


@pytest.mark.slow
def test_the_device_benchmark_times_both_nets_alone_and_together_on_any_device(checkout):
    lines = run(checkout, sys.executable, "-m", "benchmarks.device_speed", "--device", "cpu", "--epochs", "3",
                "--train-faces", "24", "--valid-faces", "8").stdout.splitlines()
    assert lines[0].startswith("device: cpu (CPU), torch ") and "24 train + 8 valid random faces" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[3:5]}
    assert set(rows) == {"net4", "net5"}
    train_flops, valid_flops = device_speed.flops_per_image(KeypointNet())
    for net, row in rows.items():
        passes_ms, stage_ms, images_per_second, tflops, plain_ms = map(float, row[1:6])
        assert passes_ms > 0 and stage_ms > 0 and plain_ms > 0, row
        # The rates are those of the passes' epoch (printed to 0.1 ms, 1 image/s and 0.01 TFLOP/s).
        assert images_per_second == pytest.approx(32 / (passes_ms / 1000), rel=0.01, abs=0.5), row
        epoch_flops = 24 * train_flops + 8 * valid_flops
        assert tflops == pytest.approx(epoch_flops / (passes_ms / 1000) / 1e12, rel=0.01, abs=0.006), row
        # The projection: the stage's fixed costs (never negative) and 3000 of its epochs, to the second.
        assert row[6].endswith("s") and float(row[6][:-1]) >= 3000 * stage_ms / 1000 - 1, row
    together = re.search(r"net4 and net5 stages at once: ([\d.]+) s against ([\d.]+) s", lines[-1])
    assert together and float(together.group(1)) > 0 and float(together.group(2)) > 0


@pytest.mark.slow
def test_portability_benchmark_compares_the_bits_and_times_each_setting(checkout, capsys, monkeypatch):
    # The AVX2 caps on two emulated CPUs with 1 and 2 threads: four trainings of one epoch, each in
    # a process of its own, then one timing round.
    monkeypatch.setattr(portability, "ROOT", checkout)  # where the workers run and read params.yaml
    monkeypatch.setattr(portability, "MACHINES", portability.MACHINES[:2])
    monkeypatch.setattr(portability, "THREADS", (1, 2))
    portability.main(["120", "1", "1", "caps-avx2-strict"])
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ")
    runs = [line.split() for line in printed.splitlines() if re.match(r"caps-avx2-strict +avx", line)]
    assert [(run[1], run[2]) for run in runs] == [("avx512", "1"), ("avx512", "2"), ("avx2", "1"), ("avx2", "2")]
    # The caps reached ATen in the workers, which chose the kernels they allow.
    assert {run[5].rstrip(")") for run in runs} == {"AVX2"}
    row = next(line.split() for line in printed.splitlines() if re.match(r"caps-avx2-strict +(same|DIFFER) ", line))
    # thr@avx512, thr@avx2, isa avx512=avx2, everywhere, distinct: the finding of docs/benchmarks.md
    assert row[1:6] == ["same", "same", "same", "same", "1"]
    assert float(row[7]) > 0 and row[8] == "+0%"  # s/epoch; against itself


@pytest.mark.slow  # prepare and predict in processes of their own
def test_the_memory_benchmark_prints_the_peak_of_prepare_and_of_predict(checkout, tmp_path):
    lines = run(checkout, sys.executable, "-m", "benchmarks.memory", "--workdir", str(tmp_path / "work"),
                "--csv-gb", "0.002", "--images", "20").stdout.splitlines()
    assert lines[1] == "inputs: 0.02 GB CSV of 500 faces (0.00 GB of uint8 pixels); 20 PNG images"
    assert len(lines) == 4
    for line, command in zip(lines[2:], ("prepare", "predict")):
        assert re.fullmatch(rf"{re.escape(str(checkout))}: {command}: peak \d+\.\d\d GB resident, \d+ s", line), line
