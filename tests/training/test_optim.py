import copy

import pytest
import torch

from pipeline.base.model import KeypointNet
from pipeline.training.optim import NesterovSGD


def steps(optimizer, model, schedule):
    """A few steps on random batches, the hyperparameters changed between them as the schedules do."""
    generator = torch.Generator().manual_seed(3)
    for lr, momentum in schedule:
        optimizer.param_groups[0].update(lr=lr, momentum=momentum)
        images = torch.rand(8, 1, 96, 96, generator=generator)
        optimizer.zero_grad()
        model(images).square().mean().backward()
        optimizer.step()


SCHEDULE = [(0.03, 0.9), (0.02, 0.93), (0.01, 0.96), (0.001, 0.99)]


def test_the_update_is_torch_sgd_with_nesterov_momentum_bit_for_bit_as_the_hyperparameters_change():
    torch.manual_seed(0)
    ours, theirs = KeypointNet(), KeypointNet()
    theirs.load_state_dict(ours.state_dict())
    steps(NesterovSGD(ours.parameters(), lr=0.03, momentum=0.9), ours, SCHEDULE)
    # torch's loop over the tensors (its CPU default): the same kernels, so the same bits.
    steps(torch.optim.SGD(theirs.parameters(), lr=0.03, momentum=0.9, nesterov=True, foreach=False), theirs, SCHEDULE)
    for (name, mine), reference in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(mine, reference), name


def test_a_loaded_state_goes_into_the_same_buffers_and_sets_the_device_values():
    torch.manual_seed(0)
    model = KeypointNet()
    trained = NesterovSGD(model.parameters(), lr=0.03, momentum=0.9)
    steps(trained, model, SCHEDULE[:2])
    fresh = NesterovSGD(copy.deepcopy(model).parameters(), lr=0.5, momentum=0.5)
    buffers = [state["momentum_buffer"] for state in fresh.state.values()]
    fresh.load_state_dict(trained.state_dict())
    # A captured step writes these very tensors: loading must not replace them.
    assert [state["momentum_buffer"] for state in fresh.state.values()] == buffers
    for mine, theirs in zip(buffers, (state["momentum_buffer"] for state in trained.state.values())):
        assert torch.equal(mine, theirs)
    assert fresh.param_groups[0]["lr"] == 0.02 and fresh.param_groups[0]["momentum"] == 0.93
    assert [value.item() for value in fresh._values[0].values()] == pytest.approx([0.02, 0.93])


def test_it_takes_no_closure():
    with pytest.raises(ValueError, match="no closure"):
        NesterovSGD(KeypointNet().parameters(), lr=0.1, momentum=0.9).step(lambda: 0.0)
