"""Compact storage of encoder state in RLlib episodes.

By default RLlib writes every STATE_OUT into the episode, so a state of S bytes costs S
bytes per env step: ~120 KB for a default Mamba, ~1.5 MB for a Transformer KV cache. The
learner, however, only needs the state at the start of each ``max_seq_len`` (W) piece of
an episode chunk. So STATE_OUT is taken out of the batch before it reaches the episode,
and each episode chunk keeps a ``StateStore`` in ``episode.custom_data[STORE_KEY]``:

* ``snapshots``: ``{offset: state before step offset}`` for offsets 0, W, 2W, ... of the
  chunk, and for its length when that is a multiple of W (where a bootstrap row, like
  PPO's, starts) -- exactly the STATE_IN rows the learner builds;
* ``running``: the state after the chunk's latest step, which the next env step starts
  from. It lives only on the env runner: it is left out when the episode is pickled for
  the learners, and RLlib's deep copy of ``custom_data`` into the successor chunk (when it
  cuts an ongoing episode) shares it while dropping the snapshots.

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

from rllib_trajenc.rllib.module import FRESH_STATE_IN

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

    def __init__(self, t_started: int, running: Optional[State] = None):
        self.t_started = t_started
        self.running = running
        self.snapshots: dict[int, Optional[State]] = {}

    def snapshot(self, offset: int, max_seq_len: int) -> None:
        """Records the running state as the state before step ``offset``, if a learner row starts there."""
        if offset % max_seq_len == 0 and offset not in self.snapshots:
            # Copied: `running` is a row view into the batched state of one env-runner step.
            self.snapshots[offset] = None if self.running is None else tree.map_structure(np.array, self.running)

    def __deepcopy__(self, memo: dict) -> StateStore:
        # Called when RLlib cuts an episode: the successor continues from `running` (never
        # changed in place, so it is shared) and needs none of its predecessor's snapshots.
        return StateStore(self.t_started, self.running)

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
        store = StateStore(episode.t_started, None if store is None else store.running)
        episode.custom_data[STORE_KEY] = store
    return store


class SaveStateOutToEpisodes(ConnectorV2):
    """Module-to-env: moves STATE_OUT out of the batch into the episodes' stores."""

    def __call__(self, *, rl_module: RLModule, batch: dict, episodes: list, **kwargs) -> Any:
        states = batch.pop(Columns.STATE_OUT, None)
        if not states:
            return batch
        by_id = {episode.id_: episode for episode in episodes}
        for (episode_id, *_), items in states.items():
            episode = by_id.get(episode_id)
            if episode is None:  # finished episode: its row only produced a discarded action
                continue
            store = chunk_store(episode)
            # A chunk cut from an ongoing episode first gets its start state here.
            store.snapshot(len(episode), _single(rl_module, episode).model_config["max_seq_len"])
            # A view, not a copy: the module wrote this step's state into a batch of its own,
            # which nothing changes later (each step's STATE_IN is a fresh stack of these rows).
            store.running = items[-1]
        return batch


class AddStatesFromEpisodeStore(ConnectorV2):
    """Env-to-module / learner: STATE_IN from the stores. RLlib's own state and time-dim
    pieces then find STATE_IN in the batch and step aside."""

    def __init__(self, input_observation_space=None, input_action_space=None, *,
                 as_learner_connector: bool = False, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self._as_learner_connector = as_learner_connector

    def __call__(self, *, rl_module: RLModule, batch: dict, episodes: list, **kwargs) -> Any:
        if rl_module is None or not rl_module.is_stateful() or Columns.STATE_IN in batch:
            return batch
        for episode in self.single_agent_episode_iterator(
            episodes, agents_that_stepped_only=not self._as_learner_connector
        ):
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
            # Before RLlib may cut or finish the chunk: a bootstrap row would start here.
            store.snapshot(len(episode), max_seq_len)
            state = _or_initial(store.running, module)
            self.add_batch_item(batch, Columns.STATE_IN, state, single_agent_episode=episode)
        if not self._as_learner_connector:
            # RLlib stacks these rows into a new STATE_IN batch, which the module may then update
            # in place instead of copying (the running states above are views of its last output).
            batch[FRESH_STATE_IN] = [True]
        return batch


def env_to_module_pieces() -> list[ConnectorV2]:
    """RLlib's default observation and time-dim pieces, then STATE_IN from the store."""
    return [AddObservationsFromEpisodesToBatch(), AddTimeDimToBatchAndZeroPad(),
            AddStatesFromEpisodeStore()]


def module_to_env_pieces() -> list[ConnectorV2]:
    return [SaveStateOutToEpisodes()]


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
