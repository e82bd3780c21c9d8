import pytest
import torch
from torch import nn

from pipeline.base.model import OUTPUT_LAYER, KeypointNet, for_inference, start_from


def test_output_shape_and_layers_follow_the_seed():
    model = KeypointNet()
    assert model(torch.rand(3, 1, 96, 96)).shape == (3, 30)
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convolutions] == [(32, (3, 3)), (64, (2, 2)), (128, (2, 2))]
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(128 * 11 * 11, 500), (500, 500), (500, 30)]


def test_glorot_uniform_weights_and_zero_biases():
    model = KeypointNet()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert module.weight.abs().max() <= bound
            assert module.weight.abs().max() > 0.9 * bound
            assert torch.count_nonzero(module.bias) == 0


def test_pooling_before_relu_equals_the_seeds_order():
    model = KeypointNet()
    images = torch.rand(4, 1, 96, 96)
    seed_order = images
    for layer in model.features:
        if isinstance(layer, nn.Conv2d):
            seed_order = torch.relu(layer(seed_order))
        elif isinstance(layer, nn.MaxPool2d):
            seed_order = layer(seed_order)
    torch.testing.assert_close(model.features(images), seed_order)


def test_channels_last_gives_the_same_outputs():
    model = KeypointNet()
    images = torch.rand(4, 1, 96, 96)
    expected = model(images)
    fast = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(images.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)


NET6 = (0.1, 0.2, 0.3, 0.5)  # the tutorial's dropout rates


def test_a_net_without_dropout_has_the_seeds_modules_and_no_dropout():
    assert not any(isinstance(m, nn.Dropout) for m in KeypointNet().modules())
    assert not any(isinstance(m, nn.Dropout) for m in KeypointNet(dropout=(0.0, 0.0, 0.0, 0.0)).modules())
    only_dense = [m.p for m in KeypointNet(dropout=(0.0, 0.0, 0.0, 0.5)).modules() if isinstance(m, nn.Dropout)]
    assert only_dense == [0.5]


def test_dropout_follows_the_three_blocks_and_the_first_dense_layer():
    model = KeypointNet(dropout=NET6)
    rates = [[m.p for m in slot.modules() if isinstance(m, nn.Dropout)] for slot in (*model.features, *model.head)]
    # conv pool [relu dropout] x 3, then flatten, dense [relu dropout], dense relu, dense.
    assert rates == [[], [], [0.1], [], [], [0.2], [], [], [0.3], [], [], [0.5], [], [], []]


def test_dropout_and_width_keep_the_seeds_weight_names_and_initial_draws():
    torch.manual_seed(0)
    seed = KeypointNet().state_dict()
    torch.manual_seed(0)
    net6 = KeypointNet(dropout=NET6).state_dict()
    assert list(net6) == list(seed)
    assert all(torch.equal(net6[key], seed[key]) for key in seed)
    wide = KeypointNet(hidden=1000).state_dict()
    assert list(wide) == list(seed)
    assert [tuple(wide[key].shape) for key in ("head.1.weight", "head.3.weight", "head.5.weight")] == [
        (1000, 128 * 11 * 11), (1000, 1000), (30, 1000)]


def test_dropout_draws_new_masks_in_training_and_does_nothing_in_evaluation():
    torch.manual_seed(0)
    seed = KeypointNet()
    torch.manual_seed(0)
    net6 = KeypointNet(dropout=NET6)
    images = torch.rand(4, 1, 96, 96)
    assert not torch.equal(net6(images), net6(images))  # training mode, as a module starts
    net6.eval()
    with torch.no_grad():
        assert torch.equal(net6(images), seed(images))


def test_the_number_of_rates_is_checked():
    with pytest.raises(ValueError, match=r"dropout takes 4 rates, got \[0.5\]"):
        KeypointNet(dropout=(0.5,))


def test_the_inference_net_of_trained_weights_has_their_width_and_no_dropout():
    trained = KeypointNet(hidden=64, dropout=NET6)
    model = for_inference(trained.state_dict())
    assert model.hidden == 64 and not any(isinstance(m, nn.Dropout) for m in model.modules())
    model.load_state_dict(trained.state_dict())
    images = torch.rand(3, 1, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(images), trained.eval()(images))


def test_a_group_nets_output_layer_has_two_units_per_keypoint_and_loads_from_its_weights_alone():
    net = KeypointNet(outputs=4)
    assert net(torch.zeros(2, 1, 96, 96)).shape == (2, 4)
    assert for_inference(net.state_dict())(torch.zeros(1, 1, 96, 96)).shape == (1, 4)


def test_starting_from_another_net_copies_every_layer_but_the_output_layer():
    torch.manual_seed(0)
    trained = KeypointNet().state_dict()
    torch.manual_seed(1)
    specialist = KeypointNet(outputs=4)
    fresh = {name: value.clone() for name, value in specialist.state_dict().items()}
    copied = start_from(specialist, trained)
    state = specialist.state_dict()
    assert copied == [name for name in state if not name.startswith(OUTPUT_LAYER)] and len(copied) == 10
    for name in state:
        torch.testing.assert_close(state[name], trained[name] if name in copied else fresh[name], rtol=0, atol=0)
    # The output layer is the fresh net's: Glorot weights, zero biases, of its own width.
    assert state[OUTPUT_LAYER + "weight"].shape == (4, 500) and not state[OUTPUT_LAYER + "weight"].equal(
        trained[OUTPUT_LAYER + "weight"][:4])
