"""Env runners keep their envs' states in the module and update them in place; nothing else does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.utils.spaces.space_utils import BatchedNdArray

from rllib_trajenc.rllib.module import ROLLOUT_ROW
from rllib_trajenc.rllib.rollout_state import RolloutState
from conftest import build_module, logp_error, ppo_config, sample_and_recompute, with_small_encoder

IN_PLACE = ["mamba", "transformer"]


@pytest.mark.parametrize("encoder", ["gru", *IN_PLACE])
def test_env_runner_steps_update_the_module_rows_in_place_and_stay_exact(ray_session, encoder, monkeypatch):
    algo = with_small_encoder(ppo_config(), encoder).build_algo()
    state_items = []
    add_item = ConnectorV2.add_batch_item

    def record(batch, column, item_to_add, single_agent_episode=None):
        if column == Columns.STATE_IN:
            state_items.append(item_to_add)
        add_item(batch, column, item_to_add, single_agent_episode)

    monkeypatch.setattr(ConnectorV2, "add_batch_item", staticmethod(record))
    try:
        runner = algo.env_runner
        traj_encoder = runner.module.traj_encoder
        calls: list[bool] = []
        original = traj_encoder.forward

        def spy(*args, **kwargs):
            calls.append(kwargs.get("in_place", False))
            return original(*args, **kwargs)

        traj_encoder.forward = spy
        episodes, batch, module = sample_and_recompute(algo)  # several sample() calls: cut chunks
        assert calls and all(calls), "every rollout step takes the in-place path"
        # STATE_IN names rows only; the states themselves stay in the module, one row per env.
        # One item per pass, already batched: the rows of the envs in order, stepped in place.
        assert set(runner._cached_to_module[Columns.STATE_IN]) == {ROLLOUT_ROW}
        assert torch.equal(runner._cached_to_module[Columns.STATE_IN][ROLLOUT_ROW], torch.arange(runner.num_envs))
        rollout_items = [item for item in state_items if ROLLOUT_ROW in item]  # (learner items: states)
        assert rollout_items and all(isinstance(item[ROLLOUT_ROW], BatchedNdArray)
                                     and len(item[ROLLOUT_ROW]) == runner.num_envs for item in rollout_items)
        assert runner.module._rollout.n_rows == runner.num_envs
        assert logp_error(module, batch) <= 1e-4
    finally:
        algo.stop()


def test_env_runners_act_with_the_weights_they_were_sent(ray_session):
    """After a training iteration the learner's new weights reach the env runner by set_state:
    the weights sigma-reparam reuses at inference must follow, or the rollout would act with the
    old policy and PPO's ratio would be off from the first minibatch."""
    algo = with_small_encoder(ppo_config(), "transformer").build_algo()
    try:
        before = algo.env_runner.module.traj_encoder.blocks[0].attn.qkv._inference_weight().clone()
        algo.train()
        after = algo.env_runner.module.traj_encoder.blocks[0].attn.qkv._inference_weight()
        assert not torch.equal(before, after)
        episodes, batch, module = sample_and_recompute(algo)
        assert logp_error(module, batch) <= 1e-4
    finally:
        algo.stop()


@pytest.mark.parametrize("encoder", IN_PLACE)
def test_a_callers_state_is_left_alone(encoder):
    module = build_module(encoder=encoder)
    obs = torch.randn(3, 1, 2)
    state = {k: torch.as_tensor(v).repeat(3, *[1] * v.ndim) for k, v in module.get_initial_state().items()}
    first = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state})
    second = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state})
    assert torch.equal(first[Columns.ACTION_DIST_INPUTS], second[Columns.ACTION_DIST_INPUTS])
    assert all(not v.any() for v in state.values())  # still the fresh-episode state
    assert all(not np.any(v) for v in module.get_initial_state().values())
    assert all(first[Columns.STATE_OUT][k] is not state[k] for k in state)


def fresh_rows(module, n_rows: int = 3) -> RolloutState:
    """The module's rollout state with ``n_rows`` rows, each a fresh episode's."""
    rows = module.rollout_state(n_rows)
    for row in range(n_rows):
        rows.claim(row, f"episode{row}", None)
    return rows


@pytest.mark.parametrize("encoder", IN_PLACE)
def test_the_rollout_path_computes_what_the_state_path_computes(encoder):
    module = build_module(encoder=encoder)
    rows = fresh_rows(module)
    big = max(rows.tensors, key=lambda k: rows.tensors[k].numel())
    memory = rows.tensors[big].data_ptr()
    state = {k: v.clone() for k, v in rows.tensors.items()}
    for _ in range(4):
        obs = torch.randn(3, 1, 2)
        expected = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state})
        out = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: {ROLLOUT_ROW: torch.arange(3)}})
        assert Columns.STATE_OUT not in out
        state = expected[Columns.STATE_OUT]
        # Mamba's single-step recurrence vs its scan: rounding only.
        torch.testing.assert_close(out[Columns.ACTION_DIST_INPUTS], expected[Columns.ACTION_DIST_INPUTS],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.tensors, state, atol=1e-5, rtol=0)
    assert rows.tensors[big].data_ptr() == memory  # updated where it lives, never reallocated
    with pytest.raises(ValueError, match=r"STATE_IN\['rollout_row'\]=\[1, 1\] must name distinct rows of "
                                         r"the module's rollout state, 0 to 2"):
        module.forward_inference({Columns.OBS: obs[:2], Columns.STATE_IN: {ROLLOUT_ROW: torch.tensor([1, 1])}})


@pytest.mark.parametrize("encoder", IN_PLACE)
def test_some_rows_in_any_order_step_only_those_rows(encoder):
    """Multi-agent env runners step the agents that act: a subset of the rows, in batch order."""
    module = build_module(encoder=encoder)
    rows = fresh_rows(module)
    module.forward_inference({Columns.OBS: torch.randn(3, 1, 2), Columns.STATE_IN: {ROLLOUT_ROW: torch.arange(3)}})
    state = {k: v.clone() for k, v in rows.tensors.items()}
    obs, some = torch.randn(2, 1, 2), torch.tensor([2, 0])
    expected = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: {k: v[some] for k, v in state.items()}})
    out = module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: {ROLLOUT_ROW: some}})
    torch.testing.assert_close(out[Columns.ACTION_DIST_INPUTS], expected[Columns.ACTION_DIST_INPUTS], atol=1e-5, rtol=0)
    for key, value in rows.tensors.items():
        torch.testing.assert_close(value[some], expected[Columns.STATE_OUT][key], atol=1e-5, rtol=0)
        assert torch.equal(value[1], state[key][1])  # the row that did not act is untouched


def test_a_row_changes_hands_by_loading_the_new_owners_state():
    initial = {"h": np.zeros(2, np.float32), "t": np.zeros((), np.int64)}
    rows = RolloutState(initial, 2, torch.device("cpu"))
    rows.claim(0, "a", None)
    rows.tensors["h"][0] += 5.0  # a step
    rows.claim(0, "a", {"h": np.ones(2), "t": np.int64(9)})  # same owner: nothing is loaded
    assert rows.tensors["h"][0].tolist() == [5.0, 5.0]
    view = rows.row(0)
    rows.claim(0, "b", {"h": np.full(2, 3.0), "t": np.int64(9)})  # another episode takes the row
    assert view["h"].tolist() == [3.0, 3.0] and int(view["t"]) == 9  # views follow the row
    rows.claim(0, "c", None)  # a fresh episode starts from the initial state
    assert not rows.tensors["h"][0].any() and int(rows.tensors["t"][0]) == 0
    assert rows.tensors["h"][1].tolist() == [0.0, 0.0]  # other rows untouched


def test_a_fresh_episode_starts_from_a_nonzero_initial_state_too():
    """Zero initial states are written by zeroing the row; any other is copied in."""
    rows = RolloutState({"h": np.array([0.5, -1.0], np.float32), "t": np.zeros((), np.int64)}, 1,
                        torch.device("cpu"))
    rows.tensors["h"][0] += 2.0
    rows.tensors["t"][0] += 7
    rows.claim(0, "a", None)
    assert rows.tensors["h"][0].tolist() == [0.5, -1.0] and int(rows.tensors["t"][0]) == 0


def test_rows_go_to_newcomers_once_their_owners_are_gone_and_views_survive_growth():
    rows = RolloutState({"h": np.zeros(2, np.float32), "t": np.zeros((), np.int64)}, 0, torch.device("cpu"))
    for position, owner in enumerate(["a", "b"]):
        row = rows.row_for(owner, position, live={"a", "b"}, taken=[])
        rows.claim(row, owner, None)
    assert rows.n_rows == 2 and rows.row_for("a", 1, live={"a", "b"}, taken=[]) == 0  # kept
    view = rows.row(1)
    rows.tensors["h"][1] += 4.0
    assert rows.row_for("c", 0, live={"a", "b", "c"}, taken=[]) == 2 and rows.n_rows == 3  # none free: grows
    assert view["h"].tolist() == [4.0, 4.0]  # the view reads the grown tensors
    assert rows.row_for("d", 0, live={"a", "d"}, taken=[]) == 1  # "b" is gone: its row is free


def test_rows_are_stored_layer_first_also_after_growing():
    """Each layer's state of all rows is one contiguous block, which the Transformer's CPU rollout
    step needs for its matmul path (FlashAttention.forward); rows stay the same values."""
    initial = {"k": np.arange(24, dtype=np.float32).reshape(3, 2, 4), "t": np.int64(0)}
    rows = RolloutState(initial, 5, torch.device("cpu"))
    rows.grow(7)
    k = rows.tensors["k"]
    assert k.shape == (7, 3, 2, 4) and all(k[:, layer].is_contiguous() for layer in range(3))
    assert torch.equal(k, torch.as_tensor(initial["k"]).expand(7, 3, 2, 4))
    assert rows.tensors["t"].shape == (7,) and rows.tensors["t"].is_contiguous()


def test_rows_keep_each_layers_memory_order_within_the_layer():
    """Mamba's conv state is channel last (a transposed view); its rows keep that order inside each
    layer's block, so the rollout step reads them along channels, also after growing."""
    conv = np.zeros((2, 3, 5), dtype=np.float32).transpose(0, 2, 1)  # [n_layers, d_inner, width], channel last
    conv[...] = np.arange(30, dtype=np.float32).reshape(2, 5, 3)
    rows = RolloutState({"conv": conv}, 4, torch.device("cpu"))
    rows.grow(6)
    stored = rows.tensors["conv"]
    assert stored.shape == (6, 2, 5, 3)
    assert all(stored[:, layer].mT.is_contiguous() for layer in range(2))
    assert torch.equal(stored, torch.as_tensor(conv).expand(6, 2, 5, 3))
