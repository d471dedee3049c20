"""Mamba encoder (Gu & Dao, arXiv 2312.00752): a stack of selective state-space blocks.

Its memory is a fixed-size recurrent state per layer (the last d_conv-1 conv inputs and the SSM
state), so acting one step at a time costs the same at step 10 as at step 10,000, while training on
whole sequences uses a parallel scan.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from rllib_trajenc.nets.base import Backends, HiddenState, TrajEncoder
from rllib_trajenc.nets.layers import check_choice, check_positive, make_norm
from rllib_trajenc.nets.selective_scan import conv_backend, run_causal_conv1d, run_selective_scan, scan_backend

logger = logging.getLogger(__name__)


class MambaMixer(nn.Module):
    """One Mamba block: gated (conv -> selective SSM) branch, as in Fig. 3 of the paper."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int):
        """Initialised as in the paper; ``long_horizons_`` and ``high_pass_`` re-initialise it for
        long recall."""
        super().__init__()
        d_inner = expand * d_model
        self.d_state, self.dt_rank = d_state, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        # Holds the depthwise weights [d_inner, 1, d_conv] (and their default init); applied causally.
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        self._init_step_sizes(1e-3, 1e-1)
        # S4D-real init: A = -(1, 2, ..., d_state) for every channel, kept negative via A = -exp(A_log).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    @torch.no_grad()
    def _init_step_sizes(self, dt_min: float, dt_max: float) -> None:
        """Step sizes log-uniform in [dt_min, dt_max]: a spread of memory horizons over channels."""
        d_inner = self.dt_proj.out_features
        dt = torch.exp(torch.empty(d_inner).uniform_(math.log(dt_min), math.log(dt_max)))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    @torch.no_grad()
    def long_horizons_(self) -> None:
        """Step sizes in [1e-2, 1] and A log-spaced over [1e-3, 1] across each channel's state:
        a channel can write strongly and still forget slowly. B and C start 3x larger."""
        self._init_step_sizes(1e-2, 1.0)
        self.A_log.copy_(torch.linspace(math.log(1e-3), 0.0, self.d_state).expand_as(self.A_log))
        self.x_proj.weight[self.dt_rank:] *= 3.0

    @torch.no_grad()
    def high_pass_(self) -> None:
        """Half the channels' conv becomes a difference filter (this input minus the last, no bias)
        and step sizes start independent of the input: in those channels a constant input writes
        nothing after its first step, so a long run of uninformative steps does not bury a cue."""
        half = self.conv.out_channels // 2
        self.conv.weight[:half] = 0.0
        self.conv.weight[:half, 0, -1] = 1.0
        self.conv.weight[:half, 0, -2] = -1.0
        self.conv.bias[:half] = 0.0
        self.dt_proj.weight.zero_()

    def forward(self, x: torch.Tensor, conv_state: Optional[torch.Tensor] = None,
                ssm_state: Optional[torch.Tensor] = None, log_dict: Optional[dict] = None,
                log_key: str = "", fused: bool = True, backends: Optional[Backends] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """x [B, L, d_model] -> (y [B, L, d_model], conv state, SSM state after the last step);
        the states are None when none were passed in (training from the start of episodes).
        ``fused`` allows the fused kernels; ``backends``, if given, gets the ones that ran."""
        stateful = ssm_state is not None  # without a state in, no state comes out
        x, z = self.in_proj(x).chunk(2, dim=-1)                               # [B, L, d_inner] each
        weight = self.conv.weight[:, 0]
        if backends is not None:
            backends["conv_backend"] = conv_backend(x.device.type, x.dtype, x.shape[-1], weight.shape[1],
                                                    stateful, fused)
        conv = run_causal_conv1d(x.mT, weight, self.conv.bias, conv_state, return_final_state=stateful,
                                 fused=fused)
        x, conv_state = conv if stateful else (conv, None)
        x = F.silu(x)                                                         # [B, d_inner, L]
        dt, B, C = self.x_proj(x.mT).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # its bias is added inside the scan, before softplus
        if log_dict is not None:
            log_dict[log_key] = F.softplus(delta.detach().float() + self.dt_proj.bias.detach()).mean()
        if backends is not None:
            backends["scan_backend"] = scan_backend(x.device.type, x.dtype, self.d_state, fused)
        scan = run_selective_scan(x, delta.mT, -torch.exp(self.A_log), B.mT, C.mT, self.D, z.mT,
                                  delta_bias=self.dt_proj.bias, delta_softplus=True,
                                  initial_state=ssm_state, return_last_state=stateful, fused=fused)
        y, ssm_state = scan if stateful else (scan, None)
        return self.out_proj(y.mT), conv_state, ssm_state

    def step_(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One step x [B, d_model] -> y [B, d_model] for inference, updating both states in place.

        The recurrence written out for a single step (what the scan computes for L=1), with no
        state-sized copies: a rollout step costs O(d_inner * d_state) work and writes only the
        states themselves.
        """
        x, z = self.in_proj(x).chunk(2, dim=-1)                               # [B, d_inner] each
        # Time-major [B, d_conv, d_inner]: every op runs along contiguous channels when the state
        # is channel last, as init_hidden_state makes it (any layout gives the same values).
        past = conv_state.mT
        window = torch.cat([past, x.unsqueeze(1).to(conv_state.dtype)], 1)
        past.copy_(window[:, 1:])
        x = F.silu((window.to(x.dtype) * self.conv.weight[:, 0].T).sum(1) + self.conv.bias)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        decay = torch.mul(delta.unsqueeze(-1), -torch.exp(self.A_log)).exp_()  # [B, d_inner, d_state]
        ssm_state.mul_(decay).addcmul_((delta * x.float()).unsqueeze(-1), B.float().unsqueeze(1))
        # C·h as one reduction (no [B, d_inner, d_state] product), D u added in the same op
        y = torch.linalg.vecdot(ssm_state.float(), C.float().unsqueeze(1))
        y = torch.addcmul(y, self.D.float(), x.float())
        return self.out_proj(y.mul_(F.silu(z.float())).to(x.dtype))


# "paper": the paper's initialisation. "long_memory": MambaMixer.long_horizons_ and high_pass_,
# for recall across hundreds of steps of noise (BENCHMARKS.md, benchmarks/mamba_init.py).
SSM_INITS = ("paper", "long_memory")


class MambaTrajEncoder(TrajEncoder):
    """Linear -> n_layers x (x + MambaMixer(norm(x))) -> norm.

    ``ssm_init`` (keyword-only, beyond the spec's signature) picks one of SSM_INITS.

    State: ``{"conv": [B, n_layers, d_inner, d_conv-1], "ssm": [B, n_layers, d_inner, d_state]}``,
    zeros at the start of an episode (conv stored channel last; any layout computes the same).
    With ``in_place=True`` (inference, no autograd) a one-step forward updates the state passed in
    and returns it, instead of scanning and copying.

    ``fused_kernels`` is read at every forward. ``last_backends`` names what the last scanning
    forward ran; the in-place one-step path runs no kernel and leaves it as it was. With
    ``compile_rollout`` that path runs ``_step_`` compiled by torch.compile (inductor fuses the
    elementwise state update; on CPU it needs a C++ compiler), built on the process's first such
    step and shared by every encoder of the same sizes.
    """

    compiles_rollout_step = True

    def __init__(self, tstep_dim: int, max_seq_len: int, d_model: int = 256, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, n_layers: int = 3, norm: str = "layer", *,
                 ssm_init: str = "paper"):
        super().__init__(tstep_dim, max_seq_len)
        check_positive(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, n_layers=n_layers)
        check_choice("ssm_init", ssm_init, SSM_INITS)
        self.d_model, self.d_state, self.d_conv, self.n_layers = d_model, d_state, d_conv, n_layers
        self.d_inner = expand * d_model
        self.inp = nn.Linear(tstep_dim, d_model)
        self.norms = nn.ModuleList(make_norm(norm, d_model) for _ in range(n_layers))
        self.mixers = nn.ModuleList(MambaMixer(d_model, d_state, d_conv, expand) for _ in range(n_layers))
        if ssm_init == "long_memory":
            for mixer in self.mixers:
                mixer.long_horizons_()
                mixer.high_pass_()
        self.out_norm = make_norm(norm, d_model)

    @property
    def emb_dim(self) -> int:
        return self.d_model

    def kernel_backends(self, device: torch.device, dtype: torch.dtype) -> Backends:
        device_type = torch.device(device).type
        return {"scan_backend": scan_backend(device_type, dtype, self.d_state, self.fused_kernels),
                "conv_backend": conv_backend(device_type, dtype, self.d_inner, self.d_conv, True,
                                             self.fused_kernels)}

    def extra_repr(self) -> str:
        dtype = self.inp.weight.dtype
        return (f"fused_kernels={self.fused_kernels}, backends: cuda={self.kernel_backends('cuda', dtype)}, "
                f"cpu={self.kernel_backends('cpu', dtype)}")

    def init_hidden_state(self, batch_size: int, device: torch.device) -> HiddenState:
        kw = dict(dtype=self.inp.weight.dtype, device=device)
        # conv [B, n_layers, d_inner, d_conv-1] is stored channel last (a transposed view): the
        # layout of causal-conv1d's states, and the one the rollout step reads along channels.
        return {"conv": torch.zeros(batch_size, self.n_layers, self.d_conv - 1, self.d_inner, **kw).mT,
                "ssm": torch.zeros(batch_size, self.n_layers, self.d_inner, self.d_state, **kw)}

    def forward(self, seq: torch.Tensor, time_idxs: Optional[torch.Tensor] = None,
                hidden_state: Optional[HiddenState] = None, log_dict: Optional[dict] = None,
                *, in_place: bool = False) -> tuple[torch.Tensor, Optional[HiddenState]]:
        """time_idxs is ignored: the recurrence itself knows the order of the steps."""
        self.check_input(seq, in_place)
        x = self.inp(seq)
        if in_place and hidden_state is not None and seq.shape[1] == 1:
            step = _compiled_step() if self.compile_rollout else MambaTrajEncoder._step_
            return step(self, x, hidden_state["conv"].unbind(1), hidden_state["ssm"].unbind(1)), hidden_state
        if hidden_state is None:
            states = [(None, None)] * self.n_layers
        else:
            states = list(zip(hidden_state["conv"].unbind(1), hidden_state["ssm"].unbind(1)))
        new_states, backends = [], {}
        for i, (norm, mixer, (conv_state, ssm_state)) in enumerate(zip(self.norms, self.mixers, states)):
            y, conv_state, ssm_state = mixer(norm(x), conv_state, ssm_state, log_dict, f"mamba/mean_delta_layer{i}",
                                             self.fused_kernels, backends)
            x = x + y
            new_states.append((conv_state, ssm_state))
        self.last_backends = backends
        x = self.out_norm(x)
        if hidden_state is None:
            return x, None
        conv, ssm = zip(*new_states)
        return x, {"conv": torch.stack(conv, 1).to(hidden_state["conv"].dtype),
                   "ssm": torch.stack(ssm, 1).to(hidden_state["ssm"].dtype)}

    def _step_(self, x: torch.Tensor, convs: Sequence[torch.Tensor], ssms: Sequence[torch.Tensor]) -> torch.Tensor:
        """x [B, 1, d_model] through every layer's single-step recurrence, updating each layer's
        states (``convs[i]``, ``ssms[i]``) in place.

        The layers' states come as separate tensors, not indexed from the whole state inside: a
        compiled step then updates each layer's state where it is, where indexing made inductor
        rebuild the whole state at every layer (``benchmarks/compare_commits.py``, BENCHMARKS.md).
        """
        x = x[:, 0]
        for norm, mixer, conv, ssm in zip(self.norms, self.mixers, convs, ssms):
            x = x + mixer.step_(norm(x), conv, ssm)
        return self.out_norm(x).unsqueeze(1)


@functools.cache
def _compiled_step() -> Callable[..., torch.Tensor]:
    """MambaTrajEncoder._step_ through torch.compile. It compiles on its first call for each
    shape of input and state (seconds); parameters stay inputs, so weight syncs need no recompile."""
    logger.info("rllib_trajenc: compiling MambaTrajEncoder's rollout step with torch.compile "
                "on its first call (once per process and state shape)")
    return torch.compile(MambaTrajEncoder._step_, dynamic=False)
