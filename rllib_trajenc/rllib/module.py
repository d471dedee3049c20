"""TrajEncoderRLModule: observation -> TstepEncoder -> TrajEncoder -> actor and critic heads.

One ``_forward`` serves the env runner (one step per call: [B, ...], or [B, 1, ...] through
RLlib's default pieces, with STATE_IN) and the learner ([B, max_seq_len, ...] zero-padded chunks
whose STATE_IN is the state before the chunk), so both compute the same function and the
learner reproduces the rollout's log-probs.

On env runners with with_traj_encoder's connector pieces the module keeps its envs' running
states itself (``rollout_state``, see rollout_state.py): STATE_IN then holds only each env's row
(``ROLLOUT_ROW``), the encoder updates those rows in place, and no STATE_OUT is returned, so a
rollout step never copies a large state such as the Transformer's KV cache. A STATE_IN that
holds the state itself (RLlib's default pieces, your own inference loop) is left unchanged.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import gymnasium as gym
import numpy as np
import torch

from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import (
    TorchCategorical, TorchDiagGaussian, TorchDistribution, TorchMultiCategorical,
)
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import (
    TARGET_NETWORK_ACTION_DIST_INPUTS, InferenceOnlyAPI, SelfSupervisedLossAPI, TargetNetworkAPI,
    ValueFunctionAPI,
)
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID

from rllib_trajenc.nets.base import HiddenState, TrajEncoder
from rllib_trajenc.nets.layers import store_weights_transposed
from rllib_trajenc.rllib.config import AMP_MODES, TrajEncoderModelConfig
from rllib_trajenc.rllib.prev_action_reward import PREV_ACTION, PREV_REWARD
from rllib_trajenc.rllib.rollout_state import RolloutState
from rllib_trajenc.rllib.tstep_encoder import MLP, TstepEncoder

if TYPE_CHECKING:
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
    from ray.rllib.core.learner.learner import Learner

# STATE_IN/STATE_OUT hold the encoder's state plus this entry: the episode time index of the
# next step, which the Transformer needs for its position embedding.
TIME_KEY = "t"

# STATE_IN's only entry on env runners with the compact-state pieces: the row of each env's
# running state in the module's RolloutState.
ROLLOUT_ROW = "rollout_row"

# forward_train's output entry holding the encoder's diagnostics ({name: detached 0-dim tensor}).
DIAGNOSTICS = "traj_encoder_diagnostics"

# The nets that APPO's target policy copies (everything on the path from obs to action logits).
_TARGETED = ("tstep_encoder", "traj_encoder", "pi")

SUPPORTED_ACTIONS = "Discrete and MultiDiscrete (1-D nvec) starting at 0, Box (1-D, float)"


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def action_dist_for(space: gym.Space) -> tuple[type[TorchDistribution], int]:
    """RLlib's action distribution for ``space`` and how many inputs it takes from the actor head."""
    # RLlib's categoricals sample from 0, so a nonzero ``start`` would send the env wrong actions.
    if isinstance(space, gym.spaces.Discrete) and space.start == 0:
        return TorchCategorical, int(space.n)
    if isinstance(space, gym.spaces.MultiDiscrete) and space.nvec.ndim == 1 and not space.start.any():
        lens = [int(n) for n in space.nvec]
        return TorchMultiCategorical.get_partial_dist_cls(space=space, input_lens=lens), sum(lens)
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and np.issubdtype(space.dtype, np.floating):
        return TorchDiagGaussian, 2 * space.shape[0]  # mean and log_std per action dim
    raise ValueError(f"TrajEncoderRLModule cannot act in the action space {space}; supported: {SUPPORTED_ACTIONS}")


def _check_obs_space(cfg: TrajEncoderModelConfig, space: gym.Space) -> None:
    """prev_action/prev_reward need the observations that with_traj_encoder's connector piece makes."""
    wanted = [key for key, on in ((PREV_ACTION, cfg.prev_action), (PREV_REWARD, cfg.prev_reward)) if on]
    if wanted and not (isinstance(space, gym.spaces.Dict) and set(wanted) <= set(space.spaces)):
        raise ValueError(
            f"model_config sets {wanted} to True, but the observation space {space} has no such "
            "entries: build the config with rllib_trajenc.with_traj_encoder(..., prev_action=..., "
            "prev_reward=...), which installs the connector piece that adds them")


def _compile_where_rllib_skipped(module: TorchRLModule, learner: Learner) -> None:
    """Compiles ``module``'s forward passes when the learner was asked to but did not.

    RLlib 2.60's TorchLearner.build, with ``torch_compile_learner=True`` (what_to_compile
    "forward_train", the default), loops over the MultiRLModule's modules but tests the
    MultiRLModule itself for being a TorchRLModule, so it compiles no module and training runs
    eager. The learner's first minibatch then runs eager; every later one runs compiled.
    """
    if getattr(learner, "_torch_compile_forward_train", False) and "_forward_train" not in vars(module):
        module.compile(learner._torch_compile_cfg)


def _first_learner() -> bool:
    """Whether this process is the only learner or rank 0 of the learners' process group."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


class TrajEncoderRLModule(TorchRLModule, ValueFunctionAPI, TargetNetworkAPI, InferenceOnlyAPI,
                          SelfSupervisedLossAPI):
    """Actor-critic RLModule around any TrajEncoder; see TrajEncoderModelConfig for its model_config.

    Memory-free encoders (FF) make a stateless module: RLlib then sends no STATE_IN and no
    time dim, and every row is treated as a one-step sequence.
    """

    @override(TorchRLModule)
    def setup(self) -> None:
        cfg = TrajEncoderModelConfig.from_model_config(self.model_config)
        self.action_dist_cls, n_dist_inputs = action_dist_for(self.action_space)
        _check_obs_space(cfg, self.observation_space)
        self.tstep_encoder = TstepEncoder(self.observation_space, cfg.tstep_dim, cfg.tstep_hiddens,
                                          cfg.activation, cfg.time_scale, cfg.tstep_input_gain)
        self.traj_encoder = cfg.build_traj_encoder()
        self._amp_dtype = AMP_MODES[cfg.amp]  # autocast dtype of the learner's encoder pass, or None
        # Encoders of this package (and custom ones that take the keyword) update the state in
        # place on rollouts; others get the plain call.
        self._encoder_updates_in_place = "in_place" in inspect.signature(self.traj_encoder.forward).parameters
        self._rollout: Optional[RolloutState] = None  # env runners' running states (rollout_state)
        self._laid_out_for_rollouts = False  # see _forward_in_mode
        emb_dim = self.traj_encoder.emb_dim
        self.pi = MLP(emb_dim, cfg.head_hiddens, n_dist_inputs, cfg.activation)
        self.vf = MLP(emb_dim, cfg.head_hiddens, 1, cfg.activation)

    @override(TorchRLModule)
    def get_initial_state(self) -> dict[str, np.ndarray]:
        # Built once: the connectors ask for it at every new episode and learner row that
        # starts one, and a default Transformer's is 1.5 MB of zeros.
        if not hasattr(self, "_initial_state"):
            self._initial_state = self._build_initial_state()
        return self._initial_state

    def _build_initial_state(self) -> dict[str, np.ndarray]:
        state = self.traj_encoder.init_hidden_state(1, torch.device("cpu"))
        if state is None:
            return {}
        if TIME_KEY in state:
            raise ValueError(f"{type(self.traj_encoder).__name__}'s state may not use the key {TIME_KEY!r}")
        return {**{key: value[0].numpy() for key, value in state.items()}, TIME_KEY: np.zeros((), np.int64)}

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], *, keep_embeddings: bool = False,
                 log_dict: Optional[dict[str, torch.Tensor]] = None, amp: bool = False,
                 **kwargs) -> dict[str, Any]:
        embeddings, state_out = self._encode(batch, self.tstep_encoder, self.traj_encoder, log_dict, amp)
        out = {Columns.ACTION_DIST_INPUTS: self.pi(embeddings)}
        if state_out:
            out[Columns.STATE_OUT] = state_out
        if keep_embeddings:
            out[Columns.EMBEDDINGS] = embeddings
        return out

    @override(TorchRLModule)
    def forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._forward_in_mode(super().forward_exploration, self._forward_exploration, batch, **kwargs)

    @override(TorchRLModule)
    def forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._forward_in_mode(super().forward_inference, self._forward_inference, batch, **kwargs)

    def _forward_in_mode(self, rllib_forward: Callable[..., dict], forward: Callable[..., dict],
                         batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """RLlib's forward_exploration/inference switch the module to eval mode and back to train
        mode around every call: two walks over every submodule (~60 for a default Transformer) at
        every env step. An inference-only module (an env runner's) is never trained, so it is put in
        eval mode once and stays there; other modules keep RLlib's behaviour. At its first step on
        CPU, its linear weights are also stored transposed (``store_weights_transposed``).

        Its steps run under ``torch.inference_mode`` (no view or version tracking: Mamba's step,
        ~450 small ops, took ~0.9x its time under no_grad; BENCHMARKS.md), so what they return
        are inference tensors, which may not be updated in place outside it.
        """
        if not self.inference_only:
            return rllib_forward(batch, **kwargs)
        if self.training:
            self.eval()
        if not self._laid_out_for_rollouts:  # its first step
            self._laid_out_for_rollouts = True
            if next(self.parameters()).device.type == "cpu":
                store_weights_transposed(self)
        with torch.inference_mode():
            return forward(batch, **kwargs)

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        # The loss hands the embeddings to compute_values, sparing a second encoder pass, and
        # the diagnostics to the learner's metrics (see compute_self_supervised_loss).
        diagnostics: dict[str, torch.Tensor] = {}
        out = self._forward(batch, keep_embeddings=True, log_dict=diagnostics, amp=True, **kwargs)
        out[DIAGNOSTICS] = diagnostics
        return out

    @override(SelfSupervisedLossAPI)
    def compute_self_supervised_loss(self, *, learner: Learner, module_id: ModuleID,
                                     config: AlgorithmConfig, batch: dict[str, Any],
                                     fwd_out: dict[str, Any], **kwargs) -> torch.Tensor:
        """The algorithm's own loss, unchanged, after logging the encoder's diagnostics.

        RLlib's Learner calls this hook instead of its ``compute_loss_for_module`` and hands it
        the learner, whose MetricsLogger ends up in ``algo.train()["learners"][module_id]``.
        Using it as a pass-through lets the diagnostics of this very forward_train be logged
        for any algorithm whose Learner keeps RLlib's ``compute_losses`` (PPO, APPO, IMPALA,
        ...) without a Learner subclass per algorithm; they are averaged over the minibatches
        of one training iteration. The kernel backends the encoder ran
        (``TrajEncoder.last_backends``) are logged as ``traj_encoder/<kind>``, e.g.
        ``traj_encoder/scan_backend: "mamba_ssm"``, by the first learner of a DDP group only:
        RLlib merges an "item" metric from one learner, and all learners run the same code.
        (RLlib's OfflineEvaluationRunner, which calls this hook too
        but has no ``compute_loss_for_module``, cannot evaluate this module.)
        """
        _compile_where_rllib_skipped(self, learner)
        learner.metrics.log_dict(fwd_out[DIAGNOSTICS], key=module_id, reduce="mean")
        if _first_learner():
            for kind, backend in self.traj_encoder.last_backends.items():
                learner.metrics.log_value((module_id, f"traj_encoder/{kind}"), backend, reduce="item")
        return learner.compute_loss_for_module(module_id=module_id, config=config, batch=batch,
                                               fwd_out=fwd_out, **kwargs)

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        if embeddings is None:
            # A value pass outside the loss (PPO's GAE connector) runs in eval mode like a rollout:
            # no dropout noise in the targets, and no train-mode side effect (e.g. sigma-reparam's
            # power step) that would make the next forward_train differ from the env runner.
            with _eval_mode(self):
                embeddings, _ = self._encode(batch, self.tstep_encoder, self.traj_encoder,
                                             amp=not self.inference_only)
        return self.vf(embeddings).squeeze(-1)

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        for name in _TARGETED:
            setattr(self, f"_old_{name}", make_target_network(getattr(self, name)))

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(getattr(self, name), getattr(self, f"_old_{name}")) for name in _TARGETED]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        # The target encoder starts from the behaviour policy's STATE_IN (the only state stored).
        embeddings, _ = self._encode(batch, self._old_tstep_encoder, self._old_traj_encoder)
        return {TARGET_NETWORK_ACTION_DIST_INPUTS: self._old_pi(embeddings)}

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["vf", *(f"_old_{name}" for name in _TARGETED)]

    def _encode(self, batch: dict[str, Any], tstep_encoder: TstepEncoder, traj_encoder: TrajEncoder,
                log_dict: Optional[dict[str, torch.Tensor]] = None,
                amp: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Obs [B, (T,) ...] -> fp32 embeddings [B, (T,) emb_dim] and the state after the last step
        ({} when the running states live in the module's RolloutState, updated in place).

        Sequences continue from STATE_IN when the batch has one, else start an episode. The
        traj encoder writes its diagnostics into ``log_dict`` when one is given, and runs under
        autocast when ``amp`` and model_config["amp"] ask for it.
        """
        obs = batch[Columns.OBS]
        lead, device = tstep_encoder.lead_shape_and_device(obs)  # lead: (B,) without a time dim, else (B, T)
        state_in = batch.get(Columns.STATE_IN)
        rollout, rows = (self._rollout_rows(state_in[ROLLOUT_ROW]) if state_in and ROLLOUT_ROW in state_in
                         else (None, None))
        hidden, t0 = self._state_to_encoder(state_in if rollout is None else rollout.select(rows), lead[0], device)
        steps = lead[1] if len(lead) == 2 else 1
        # [B, T, 1]; an env runner's single step needs no arange
        time_idxs = (t0.view(-1, 1, 1) if steps == 1
                     else (t0.view(-1, 1) + torch.arange(steps, device=device)).unsqueeze(-1))
        x = tstep_encoder(obs, time_idxs.view(*lead, 1)).reshape(lead[0], steps, -1)
        in_place = ({"in_place": True} if rollout is not None and rows is None and self._encoder_updates_in_place
                    else {})
        # Entering even a disabled autocast costs as much as a small op, on every env step.
        autocast = (torch.autocast(device.type, dtype=self._amp_dtype) if amp and self._amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out, hidden = traj_encoder(x, time_idxs, hidden_state=hidden, log_dict=log_dict, **in_place)
        out = out.float()  # heads, values and the loss stay fp32 under amp
        state_out = self._state_from_encoder(hidden, t0 + steps)
        if rollout is not None:
            rollout.update(state_out, rows)
            state_out = {}
        return (out if len(lead) == 2 else out.squeeze(1)), state_out

    @staticmethod
    def _state_to_encoder(state_in: Optional[dict[str, torch.Tensor]], batch_size: int,
                          device: torch.device) -> tuple[Optional[HiddenState], torch.Tensor]:
        """STATE_IN -> (encoder state or None for an episode start, episode time index [B])."""
        if not state_in:
            return None, torch.zeros(batch_size, dtype=torch.long, device=device)
        hidden = {key: value for key, value in state_in.items() if key != TIME_KEY}
        return hidden, state_in[TIME_KEY].long()

    def rollout_state(self, min_rows: int = 0) -> RolloutState:
        """The running states of an env runner's envs (agents, in multi-agent envs), kept here
        between steps; at least ``min_rows`` rows."""
        if self._rollout is None:
            self._rollout = RolloutState(self.get_initial_state(), 0, next(self.parameters()).device)
        self._rollout.grow(min_rows)
        return self._rollout

    def _rollout_rows(self, rows: torch.Tensor) -> tuple[RolloutState, Optional[torch.Tensor]]:
        """The RolloutState whose rows STATE_IN names, and those rows (None: all of them in
        order, which the encoder may step in place); they must be distinct rows of it."""
        rows = rows.cpu().long()
        n_rows = 0 if self._rollout is None else self._rollout.n_rows
        if n_rows and torch.equal(rows, self._rollout.all_rows):
            return self._rollout, None
        if not (n_rows and len(rows.unique()) == len(rows) and bool(((rows >= 0) & (rows < n_rows)).all())):
            raise ValueError(f"STATE_IN[{ROLLOUT_ROW!r}]={rows.tolist()} must name distinct rows of the "
                             f"module's rollout state, 0 to {n_rows - 1} (what AddStatesFromEpisodeStore sends)")
        return self._rollout, rows.to(self._rollout.tensors[TIME_KEY].device)

    @staticmethod
    def _state_from_encoder(hidden: Optional[HiddenState], t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder state after the sequence -> STATE_OUT ({} when the encoder keeps none)."""
        return {} if hidden is None else {**hidden, TIME_KEY: t}
