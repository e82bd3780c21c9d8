import subprocess
import sys

import pytest
import torch

from pipeline.base.errors import PipelineError
from pipeline.base.model import KeypointNet
from pipeline.base.weights import copy_into, load_checked, load_model, save_checked, save_model
from pipeline.training.checkpoint import STATE_FORMAT, Checkpoint, read_training_state, write_training_state
from tests.support.loops import make_trainer
from tests.support.project import ROOT

MARKER = torch.arange(1000, 1256, dtype=torch.float32)  # bytes easy to find in the file


def damage(path, offset=0):
    """Change one byte of the marker's data in the file, as a failing disk or a stray write would."""
    content = bytearray(path.read_bytes())
    where = content.find(MARKER.numpy().tobytes()) + offset
    assert where >= offset
    content[where] ^= 0x01
    path.write_bytes(bytes(content))


def test_saved_content_loads_back_exactly(tmp_path):
    content = {"marker": MARKER, "half": MARKER.bfloat16(), "scalar": torch.tensor(3), "history": [{"epoch": 1, "loss": 0.1}]}
    save_checked(tmp_path / "state.pt", content)
    loaded = load_checked(tmp_path / "state.pt", "do something")
    assert loaded.keys() == content.keys() and loaded["history"] == content["history"]
    for key in ("marker", "half", "scalar"):
        assert torch.equal(loaded[key], content[key]) and loaded[key].dtype == content[key].dtype


@pytest.mark.parametrize("offset", [0, 255 * 4 + 3])
def test_a_changed_byte_is_named_as_damage(tmp_path, offset):
    save_checked(tmp_path / "state.pt", {"marker": MARKER})
    damage(tmp_path / "state.pt", offset)
    with pytest.raises(PipelineError, match=r"state.pt: damaged: its content does not match its checksum; do this$"):
        load_checked(tmp_path / "state.pt", "do this")


@pytest.mark.parametrize("content, problem", [
    (b"", "the file is empty"),
    (bytes(range(256)) * 40, "not a PyTorch file"),
])
def test_empty_and_random_files_are_named_as_damaged(tmp_path, content, problem):
    (tmp_path / "net4.pt").write_bytes(content)
    with pytest.raises(PipelineError, match=rf"net4.pt: damaged: {problem}.*; restore it with `dvc checkout`"):
        load_model(tmp_path / "net4.pt")


def test_a_file_cut_short_is_named_as_damaged(tmp_path):
    save_model(tmp_path / "net4.pt", KeypointNet())
    whole = (tmp_path / "net4.pt").read_bytes()
    (tmp_path / "net4.pt").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(PipelineError, match=r"net4.pt: damaged: .*; restore it"):
        load_model(tmp_path / "net4.pt")


def test_a_plain_state_dict_without_a_checksum_is_not_trusted(tmp_path):
    torch.save(KeypointNet().state_dict(), tmp_path / "net4.pt")
    with pytest.raises(PipelineError, match="net4.pt: not written by this version of the pipeline .*no checksum"):
        load_model(tmp_path / "net4.pt")


def test_a_damaged_checkpoint_is_never_resumed(tmp_path):
    path = tmp_path / "net4.pt"
    trainer = make_trainer(2)
    state = {"format": STATE_FORMAT, "fingerprint": "f", "extra": {"run": "r"}, "history": [], "marker": MARKER,
             "model": trainer.network.state_dict()}
    write_training_state(path, state)
    assert read_training_state(path)["extra"] == {"run": "r"}
    damage(path)
    with pytest.raises(PipelineError, match="net4.pt: damaged: .*; delete it to train from the first epoch"):
        Checkpoint(path, {}, 60).resume(make_trainer(2))


def test_weights_of_any_width_and_dropout_load_as_the_trained_net_in_evaluation_mode(tmp_path):
    trained = KeypointNet(hidden=64, dropout=(0.1, 0.2, 0.3, 0.5))
    save_model(tmp_path / "net7.pt", trained)
    loaded = load_model(tmp_path / "net7.pt")
    assert not loaded.training and loaded.hidden == 64
    images = torch.rand(3, 1, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(images), trained.eval()(images))


@pytest.mark.parametrize("change", [
    lambda state: state.pop("head.1.weight"),
    lambda state: state.update({"head.1.weight": torch.tensor(1.0)}),
    lambda state: state.update({"head.3.weight": torch.zeros(64, 64)}),
])
def test_weights_that_are_no_keypoint_net_are_named(tmp_path, change):
    state = KeypointNet().state_dict()
    change(state)
    save_checked(tmp_path / "net4.pt", state)
    with pytest.raises(PipelineError, match="net4.pt: not a KeypointNet state_dict"):
        load_model(tmp_path / "net4.pt")


@pytest.mark.parametrize("host", [False, True])
def test_a_copy_of_a_state_is_its_own_and_reuses_its_buffers(host):
    """The checkpoint's copies: on the training device, or (host) into host memory, pinned from a GPU."""
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3).t()}, "step": 3, "rng": [torch.tensor([1, 2], dtype=torch.uint8)]}
    copy = copy_into(None, state, host=host)
    assert copy["step"] == 3 and copy["model"]["w"].stride() == state["model"]["w"].stride()
    assert torch.equal(copy["model"]["w"], state["model"]["w"]) and torch.equal(copy["rng"][0], state["rng"][0])
    buffer = copy["model"]["w"]
    state["model"]["w"].add_(1)
    assert not torch.equal(buffer, state["model"]["w"])  # not the same memory
    again = copy_into(copy, state, host=host)
    assert again["model"]["w"] is buffer and torch.equal(buffer, state["model"]["w"])


LOAD_UNDER_A_LIMIT = """
import resource, sys
from pipeline.base.errors import PipelineError, is_out_of_memory
from pipeline.base.weights import load_model
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 100_000_000, resource.RLIM_INFINITY))
try:
    load_model(sys.argv[1])
except PipelineError as error:
    print(f"PipelineError: {error}")
except (MemoryError, RuntimeError) as error:
    print(f"out of memory: {is_out_of_memory(error)}")
"""


@pytest.mark.slow  # a process of its own, under a real memory limit
def test_weights_that_do_not_fit_in_memory_are_not_called_damaged(tmp_path):
    """evaluate called an out-of-memory load "models/net4.pt: damaged" and told the user to retrain."""
    save_model(tmp_path / "wide.pt", KeypointNet(hidden=5000))  # 335 MB of weights, under a limit 100 MB above
    loaded = subprocess.run([sys.executable, "-c", LOAD_UNDER_A_LIMIT, str(tmp_path / "wide.pt")], cwd=ROOT,
                            capture_output=True, text=True)
    assert loaded.stdout == "out of memory: True\n", loaded.stdout + loaded.stderr
