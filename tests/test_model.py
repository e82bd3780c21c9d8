import torch
from torch import nn

from pipeline.base.model import KeypointNet


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
