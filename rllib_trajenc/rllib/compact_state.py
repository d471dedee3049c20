"""Compact storage of encoder state in RLlib episodes.

By default RLlib writes every STATE_OUT into the episode, so a state of S bytes costs S
bytes per env step: ~120 KB for a default Mamba, ~1.5 MB for a Transformer KV cache. The
learner, however, only needs the state at the start of each ``max_seq_len`` (W) piece of
an episode chunk. So on env runners the running states stay in the module (a
``RolloutState``, one row per env, updated in place by every step; STATE_IN only names the
row), and each episode chunk keeps a ``StateStore`` in ``episode.custom_data[STORE_KEY]``:

* ``snapshots``: ``{offset: state before step offset}`` for offsets 0, W, 2W, ... of the
  chunk, and for its length when that is a multiple of W (where a bootstrap row, like
  PPO's, starts) -- exactly the STATE_IN rows the learner builds; copies, taken before the
  step at that offset runs;
* ``running``: a view of the episode's row, the state the next env step starts from. It
  lives only on the env runner: it is left out when the episode is pickled for the learners.
  RLlib cuts an ongoing episode by deep-copying ``custom_data`` into the successor chunk
  after preparing, but before running, the successor's first step: the copy records the
  running state then, as the successor's start state.

``None`` stands for the fresh-episode state, which is never stored. Shipped bytes per env
step are thus ``state_bytes / W`` plus one state per chunk that continues an episode.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import tree
from ray.rllib.connectors.common import (
    AddObservationsFromEpisodesToBatch, AddTimeDimToBatchAndZeroPad,
)
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import AddColumnsFromEpisodesToTrainBatch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.numpy import convert_to_numpy

from rllib_trajenc.rllib.module import ROLLOUT_ROW
from rllib_trajenc.rllib.rollout_state import copy_to_numpy

STORE_KEY = "rllib_trajenc_state"
State = dict[str, np.ndarray]


def _single(rl_module: RLModule, episode: SingleAgentEpisode) -> RLModule:
    """The module that acts in ``episode`` (learners hold a MultiRLModule even for one policy)."""
    if not isinstance(rl_module, MultiRLModule):
        return rl_module
    return rl_module[episode.module_id or DEFAULT_MODULE_ID]


def _or_initial(state: Optional[State], module: RLModule) -> State:
    return convert_to_numpy(module.get_initial_state()) if state is None else state


class StateStore:
    """The encoder state one episode chunk keeps (see the module docstring)."""

    def __init__(self, t_started: int, running: Optional[dict] = None):
        self.t_started = t_started
        self.running = running
        self.snapshots: dict[int, Optional[State]] = {}
        self.state_at_copy: Optional[State] = None  # set by deep copies: a cut's start state

    def snapshot(self, offset: int, max_seq_len: int) -> None:
        """Records the running state as the state before step ``offset``, if a learner row starts there."""
        if offset % max_seq_len == 0 and offset not in self.snapshots:
            self.snapshots[offset] = None if self.running is None else copy_to_numpy(self.running)

    def __deepcopy__(self, memo: dict) -> StateStore:
        # The running state is shared (it is the episode's row, still running); snapshots are
        # never changed in place, so the copy may share them too.
        copied = StateStore(self.t_started, self.running)
        copied.snapshots = dict(self.snapshots)
        copied.state_at_copy = None if self.running is None else copy_to_numpy(self.running)
        return copied

    def __getstate__(self) -> dict[str, Any]:
        # Pickled = shipped to a learner, which needs the snapshots only.
        return {"t_started": self.t_started, "snapshots": self.snapshots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["t_started"])
        self.snapshots = state["snapshots"]

    def state_before(self, offset: int) -> Optional[State]:
        """The state before step ``offset`` of the chunk, as the learner needs it."""
        if offset not in self.snapshots:
            raise ValueError(
                f"no stored encoder state before step {offset} of an episode chunk; stored "
                f"offsets: {sorted(self.snapshots)}")
        return self.snapshots[offset]

    def nbytes(self) -> int:
        """Bytes this store ships to the learners."""
        return sum(leaf.nbytes for s in self.snapshots.values() if s is not None
                   for leaf in tree.flatten(s))


def chunk_store(episode: SingleAgentEpisode) -> StateStore:
    """This episode chunk's store, started anew when the chunk is new (fresh or just cut)."""
    store = episode.custom_data.get(STORE_KEY)
    if store is None or store.t_started != episode.t_started:
        successor = StateStore(episode.t_started, None if store is None else store.running)
        if store is not None:  # a cut: the predecessor's copy holds this chunk's start state
            successor.snapshots[0] = store.state_at_copy
        episode.custom_data[STORE_KEY] = successor
        store = successor
    return store


class AddStatesFromEpisodeStore(ConnectorV2):
    """Env-to-module: STATE_IN names each episode's row of the module's RolloutState.
    Learner: STATE_IN from the stores' snapshots. RLlib's own state and time-dim pieces then
    find STATE_IN in the batch and step aside."""

    def __init__(self, input_observation_space=None, input_action_space=None, *,
                 as_learner_connector: bool = False, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self._as_learner_connector = as_learner_connector

    def __call__(self, *, rl_module: RLModule, batch: dict, episodes: list, **kwargs) -> Any:
        if rl_module is None or not rl_module.is_stateful() or Columns.STATE_IN in batch:
            return batch
        episodes = list(self.single_agent_episode_iterator(
            episodes, agents_that_stepped_only=not self._as_learner_connector))
        rows_used: list[int] = []
        for episode in episodes:
            module = _single(rl_module, episode)
            max_seq_len = module.model_config["max_seq_len"]
            if self._as_learner_connector:
                store = episode.custom_data.get(STORE_KEY)
                if store is None:
                    raise ValueError(
                        "episode chunk carries no rllib_trajenc encoder state. Either it was "
                        "not sampled with a config prepared by rllib_trajenc.with_traj_encoder(), "
                        "or RLlib split it to shard it across num_learners > 1 (splits drop "
                        "custom_data): set config.learners(num_learners=...) before calling "
                        "with_traj_encoder(), which then keeps RLlib's per-step state storage.")
                n_chunks = math.ceil(len(episode) / max_seq_len)
                items = [_or_initial(store.state_before(k * max_seq_len), module)
                         for k in range(n_chunks)]
                self.add_n_batch_items(batch, Columns.STATE_IN, items_to_add=items,
                                       num_items=n_chunks, single_agent_episode=episode)
                continue
            store = chunk_store(episode)
            # Before the step runs (and before RLlib may cut or finish the chunk: a bootstrap
            # row would start here).
            store.snapshot(len(episode), max_seq_len)
            rows, row = module.rollout_state(len(episodes)), len(rows_used)
            rows.claim(row, episode.id_, store.running)
            store.running = rows.row(row)
            rows_used.append(row)
            self.add_batch_item(batch, Columns.STATE_IN, {ROLLOUT_ROW: np.int64(row)},
                                single_agent_episode=episode)
        return batch


def env_to_module_pieces() -> list[ConnectorV2]:
    """RLlib's default observation and time-dim pieces, then STATE_IN from the store."""
    return [AddObservationsFromEpisodesToBatch(), AddTimeDimToBatchAndZeroPad(),
            AddStatesFromEpisodeStore()]


def learner_pieces() -> list[ConnectorV2]:
    return [AddObservationsFromEpisodesToBatch(as_learner_connector=True),
            AddColumnsFromEpisodesToTrainBatch(),
            AddTimeDimToBatchAndZeroPad(as_learner_connector=True),
            AddStatesFromEpisodeStore(as_learner_connector=True)]


def stored_state_bytes(episode: SingleAgentEpisode) -> int:
    """Bytes of encoder state this episode chunk holds (its store plus any STATE_OUT column)."""
    store: Optional[StateStore] = episode.custom_data.get(STORE_KEY)
    total = 0 if store is None else store.nbytes()
    if Columns.STATE_OUT in episode.extra_model_outputs:
        per_step = episode.get_extra_model_outputs(Columns.STATE_OUT)
        total += sum(np.asarray(leaf).nbytes for leaf in tree.flatten(per_step))
    return total
