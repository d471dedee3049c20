"""The timestep encoder's input_gain: the same network at initialisation, a faster-learning first layer."""
from __future__ import annotations

import torch

from rllib_trajenc.rllib.tstep_encoder import MLP

GAIN = 10.0


def mlp(gain: float) -> MLP:
    torch.manual_seed(0)
    return MLP(5, [16], 3, "leaky_relu", input_gain=gain)


def effective_first_layer(net: MLP) -> torch.Tensor:
    return net.layers[0].weight.detach() * net.input_gain


def test_gain_leaves_the_initial_function_unchanged():
    x = torch.randn(32, 5)
    torch.testing.assert_close(mlp(GAIN)(x), mlp(1.0)(x))


def test_gain_scales_the_first_layers_adam_step_and_no_other():
    x = torch.randn(32, 5)
    steps = []
    for gain in (1.0, GAIN):
        net = mlp(gain)
        before = [effective_first_layer(net), net.layers[1].weight.detach().clone()]
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        net(x).square().sum().backward()
        optimizer.step()
        steps.append([effective_first_layer(net) - before[0], net.layers[1].weight.detach() - before[1]])
    (first_1, second_1), (first_g, second_g) = steps
    torch.testing.assert_close(first_g, GAIN * first_1)
    torch.testing.assert_close(second_g, second_1)
