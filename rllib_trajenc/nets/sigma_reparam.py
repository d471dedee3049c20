"""σReparam linear layer (Zhai et al. 2023, arXiv 2303.06296)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F


class SigmaReparamLinear(nn.Linear):
    """Linear layer with weight ``gamma / sigma_max(W) * W`` and a learned scalar ``gamma`` (init 1).

    Bounding every layer's spectral norm by one learned scalar keeps attention logits from
    blowing up (entropy collapse), which is what makes Transformers unstable in RL.

    sigma_max(W) is tracked by power iteration on the buffers ``u``, ``v``. A training forward
    first computes sigma from the *current* u, v and only then takes one power step for the
    next call; eval never steps. So a training forward computes exactly what an eval forward
    just before it computes: the learner and the rollout workers see the same function.

    Inference (eval mode, no autograd) reuses the scaled weight until weight, gamma, u or v
    change (optimizer step, load_state_dict, a move to another device): env runners would
    otherwise rescale every weight matrix at every env step.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_steps: int = 10):
        super().__init__(in_features, out_features, bias)
        self.gamma = nn.Parameter(torch.ones(()))
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", torch.zeros(in_features))
        for _ in range(init_steps):  # sigma is accurate from the first forward
            self._power_step()
        self._frozen: Optional[tuple[tuple, torch.Tensor]] = None  # (inputs' identity, scaled weight)

    def sigma(self) -> torch.Tensor:
        """The estimate u^T W v of sigma_max(W), differentiable w.r.t. W."""
        # Clones: autograd must not see the in-place power step that follows a training forward.
        u, v = self.u.clone(), self.v.clone()
        with torch.autocast(self.weight.device.type, enabled=False):  # full precision under AMP
            return torch.dot(u, torch.mv(self.weight, v))

    @torch.no_grad()
    def _power_step(self) -> None:
        with torch.autocast(self.weight.device.type, enabled=False):
            self.v.copy_(F.normalize(torch.mv(self.weight.t(), self.u), dim=0))
            self.u.copy_(F.normalize(torch.mv(self.weight, self.v), dim=0))

    def scaled_weight(self) -> torch.Tensor:
        return self.gamma / self.sigma() * self.weight

    def _inference_weight(self) -> torch.Tensor:
        """The scaled weight (no autograd), computed anew only when an input changed."""
        # Storage and version counter identify a tensor's contents: any in-place change or
        # replacement of one of the inputs makes a new key. Written out, not looped: an env
        # runner checks it at every step for every layer.
        w, gamma, u, v = self.weight, self.gamma, self.u, self.v
        key = (w.data_ptr(), w._version, gamma.data_ptr(), gamma._version,
               u.data_ptr(), u._version, v.data_ptr(), v._version)
        if self._frozen is None or self._frozen[0] != key:
            with torch.no_grad():
                self._frozen = (key, self.scaled_weight())
        return self._frozen[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or torch.is_grad_enabled()):
            return F.linear(x, self._inference_weight(), self.bias)
        weight = self.scaled_weight()
        if self.training:
            self._power_step()
        return F.linear(x, weight, self.bias)
