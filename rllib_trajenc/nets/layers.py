"""Small building blocks shared by the encoders: argument checks, activations, norms."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "leaky_relu": F.leaky_relu,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

NORMS = ("layer", "rms", "none")


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int")


def check_probability(**rates: float) -> None:
    for name, value in rates.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} must be a dropout rate in [0, 1)")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def make_norm(name: str, dim: int) -> nn.Module:
    """LayerNorm, RMSNorm or identity, selected by the spec's ``norm`` string."""
    check_choice("norm", name, NORMS)
    if name == "layer":
        return nn.LayerNorm(dim)
    if name == "rms":
        return nn.RMSNorm(dim)
    return nn.Identity()


@torch.no_grad()
def store_weights_transposed(module: nn.Module) -> None:
    """Lays out every linear weight of ``module`` (nn.Linear and subclasses, nn.GRU and the other
    RNNs) as the transpose of a contiguous matrix: same shape and values, strides (1, out).

    ``F.linear`` multiplies by ``weight.t()``, which is then contiguous. At an env runner's batch
    (16 rows), torch's CPU GEMM took that in 0.56-0.91x the time on the Intel Xeon measured
    (benchmarks/weight_layout_cpu.py, BENCHMARKS.md). ``load_state_dict`` copies into a parameter
    in place, so weight syncs keep the layout.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.RNNBase)):
            for param in layer.parameters(recurse=False):
                if param.dim() == 2:
                    param.data = param.data.t().contiguous().t()
