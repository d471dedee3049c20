"""Compact storage of encoder state in RLlib episodes.

By default RLlib writes every STATE_OUT into the episode, so a state of S bytes costs S
bytes per env step: ~120 KB for a default Mamba, ~1.5 MB for a Transformer KV cache. The
learner, however, only needs the state at the start of each ``max_seq_len`` (W) row of
an episode chunk. So on env runners the running states stay in the module (a
``RolloutState``, one row per env, updated in place by every step; STATE_IN only names the
row), and each episode chunk keeps a ``StateStore``:

* ``snapshots``: ``{offset: state before step offset}`` for offsets 0, W, 2W, ... of the
  chunk; copies, taken before the step at that offset runs;
* ``observations``: the chunk's own observation buffer (no copy), through which
  a learner replays the steps from a snapshot to a row that starts elsewhere (state_replay.py):
  a bootstrap row (PPO's) at the chunk's end, or any row of a piece that RLlib cut from the
  chunk at an offset that is no multiple of W;
* ``running``: a view of the episode's row, the state the next env step starts from. It
  lives only on the env runner. RLlib cuts an ongoing episode by deep-copying
  ``custom_data`` into the successor chunk after preparing, but before running, the
  successor's first step: the copy records the running state then, as the successor's
  start state.

Where it lives: ``episode.custom_data[STORE_KEY]``, and a reference at every step of the
chunk in ``extra_model_outputs[STORE_COLUMN]``. The latter is what survives RLlib's sharding
across several learners: ``LearnerGroup.update`` cuts chunks at arbitrary steps with
``SingleAgentEpisode.slice``, which keeps per-step data but drops ``custom_data``.

Multi-agent episodes keep one store per agent chunk (each agent's own steps, rows and time
index); the env runner finds them in the multi-agent episode's ``custom_data[STORE_KEY]`` (an
``AgentStores``), which RLlib's multi-agent cut deep-copies while it rebuilds the agents'
chunks. An agent whose action is still waiting for its next observation at a cut has already
run that step, which belongs to the successor chunk: its copy replays the state before it from
the predecessor's snapshots (with the weights it acted with), instead of copying the running one.

Pickled (shipped to the driver and the learners), a store holds the snapshots before its
chunk's own steps and its observations, never the running state. The observations are the very
array its episode pickles too, so pickle's memo ships them once; only a store pickled without
its episode (with a piece of a cut chunk) ships them again. ``None`` stands for the
fresh-episode state, which is never stored. Shipped state bytes per env step are thus
``state_bytes / W`` plus one state per chunk that continues an episode.
"""
from __future__ import annotations

import copy
import functools
import math
import pickle
from typing import Any, Hashable, Iterator, Optional

import numpy as np
from ray import cloudpickle
from ray.rllib.connectors.common import (
    AddObservationsFromEpisodesToBatch, AddTimeDimToBatchAndZeroPad,
)
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import AddColumnsFromEpisodesToTrainBatch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.env.multi_agent_episode import MultiAgentEpisode
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.env.utils.infinite_lookback_buffer import InfiniteLookbackBuffer
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.spaces.space_utils import BatchedNdArray

from rllib_trajenc.rllib.module import ROLLOUT_ROW
from rllib_trajenc.rllib.rollout_state import copy_to_numpy
from rllib_trajenc.rllib.state_replay import replay

STORE_KEY = "rllib_trajenc_state"
STORE_COLUMN = "rllib_trajenc_state_store"
State = dict[str, np.ndarray]


def _single(rl_module: RLModule, episode: SingleAgentEpisode) -> RLModule:
    """The module that acts in ``episode``, unwrapped (learners hold a MultiRLModule even for one
    policy, and with several learners its modules are DDP wrappers)."""
    if isinstance(rl_module, MultiRLModule):
        rl_module = rl_module[episode.module_id or DEFAULT_MODULE_ID]
    return rl_module.unwrapped()


def _or_initial(state: Optional[State], module: RLModule) -> State:
    return convert_to_numpy(module.get_initial_state()) if state is None else state


class StateStore:
    """The encoder state one episode chunk keeps (see the module docstring).

    On the env runner it knows its ``episode`` (the chunk, whose observations it reads); once
    shipped it holds the observations themselves.
    """

    def __init__(self, t_started: int, episode: Optional[SingleAgentEpisode] = None,
                 running: Optional[dict] = None, observations: Optional[InfiniteLookbackBuffer] = None,
                 module: Optional[RLModule] = None):
        self.t_started = t_started
        self.episode = episode
        self.running = running
        self.module = module  # env runners only: replays a multi-agent cut's start (AgentStores)
        self._observations = observations
        self.snapshots: dict[int, Optional[State]] = {}
        self.state_at_copy: Optional[State] = None  # set by deep copies: a cut's start state

    @property
    def observations(self) -> Optional[InfiniteLookbackBuffer]:
        return self._observations if self.episode is None else self.episode.observations

    def snapshot(self, offset: int, max_seq_len: int) -> None:
        """Records the running state as the state before step ``offset``, if a learner row of the
        chunk may start there (at a multiple of max_seq_len)."""
        if offset % max_seq_len == 0 and offset not in self.snapshots:
            self.snapshots[offset] = None if self.running is None else copy_to_numpy(self.running)

    def __deepcopy__(self, memo: dict) -> StateStore:
        return self.copy_starting(None if self.running is None else copy_to_numpy(self.running), memo)

    def copy_starting(self, state_at_copy: Optional[State], memo: dict) -> StateStore:
        """A deep copy that records ``state_at_copy`` as a cut's start state."""
        # The running state is shared: it is the episode's row, still running. A store copied
        # with its episode follows the episode's copy (in ``memo`` by then); copied alone, as
        # RLlib's cut copies custom_data, it keeps the original episode rather than copy a whole
        # chunk. Shipped observations are copied with ``memo``, so they stay the copied
        # episode's own array.
        copied = StateStore(self.t_started, memo.get(id(self.episode), self.episode), self.running,
                            copy.deepcopy(self._observations, memo), self.module)
        copied.snapshots = copy.deepcopy(self.snapshots, memo)
        copied.state_at_copy = state_at_copy
        return copied

    def state_after_chunk(self) -> State:
        """The state after the chunk's last step, replayed from the snapshots (env runner)."""
        max_seq_len = self.module.model_config["max_seq_len"]
        return self.states_before([len(self.episode)], self.module, max_seq_len)[0]

    def __getstate__(self) -> dict[str, Any]:
        # Pickled = shipped towards a learner: the states before the chunk's own steps and the
        # observations, no running state. The state after the last step is left out: the
        # successor chunk ships it as its start, and a bootstrap row that starts there replays.
        buffer = self.observations
        steps = len(buffer) - 1
        return {"t_started": self.t_started, "observations": (buffer.data, buffer.lookback),
                "snapshots": {offset: state for offset, state in self.snapshots.items() if offset < steps}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        data, lookback = state["observations"]
        self.__init__(state["t_started"], observations=InfiniteLookbackBuffer(data=data, lookback=lookback))
        self.snapshots = state["snapshots"]

    def states_before(self, offsets: list[int], module: RLModule, max_seq_len: int) -> list[State]:
        """The states before steps ``offsets`` of the chunk (its learner rows' starts): the stored
        one where there is one, else the latest stored one before it, replayed through the at most
        ``max_seq_len`` steps in between (rows grouped by that distance, one pass per group)."""
        bases = [self._latest_snapshot(offset, max_seq_len) for offset in offsets]
        states = [_or_initial(self.snapshots[base], module) for base in bases]
        by_lag: dict[int, list[int]] = {}
        for row, (offset, base) in enumerate(zip(offsets, bases)):
            if offset > base:
                by_lag.setdefault(offset - base, []).append(row)
        for lag, rows in by_lag.items():
            replayed = replay(module, [states[row] for row in rows],
                              [self.observations.get(slice(offsets[row] - lag, offsets[row])) for row in rows])
            for row, state in zip(rows, replayed):
                states[row] = state
        return states

    def _latest_snapshot(self, offset: int, max_seq_len: int) -> int:
        base = max((stored for stored in self.snapshots if stored <= offset), default=None)
        if base is None or offset - base > max_seq_len:
            raise ValueError(
                f"no stored encoder state within max_seq_len={max_seq_len} steps before step "
                f"{offset} of an episode chunk; stored offsets: {sorted(self.snapshots)}")
        return base


class AgentStores:
    """A multi-agent episode chunk's stores by agent id, kept in its custom_data on env runners.

    ``stepped``: the agents whose next step the latest env-to-module pass prepared; their running
    states are the states before their next steps. Any other agent has already run the step that
    its next observation will close, so a cut's copy replays its start state instead.
    """

    def __init__(self) -> None:
        self.stores: dict[Hashable, StateStore] = {}
        self.stepped: set[Hashable] = set()

    def __deepcopy__(self, memo: dict) -> AgentStores:
        copied = AgentStores()
        copied.stepped = set(self.stepped)  # still prepared, in the copy's next step
        for agent_id, store in self.stores.items():
            if not store.episode.is_done:  # a finished agent never steps again
                start = (copy_to_numpy(store.running) if agent_id in self.stepped
                         else store.state_after_chunk())
                copied.stores[agent_id] = store.copy_starting(start, memo)
        return copied

    def __reduce__(self) -> tuple:
        # Env runners only: learners find each agent chunk's store in its per-step references.
        return AgentStores, ()


def agent_stores(episode: MultiAgentEpisode) -> AgentStores:
    return episode.custom_data.setdefault(STORE_KEY, AgentStores())


def chunk_store(episode: SingleAgentEpisode, parent: Optional[MultiAgentEpisode] = None,
                module: Optional[RLModule] = None) -> StateStore:
    """This episode chunk's store, started anew when the chunk is new (fresh or just cut), and
    referenced from each of its steps. ``parent``: the multi-agent episode that ``episode`` is an
    agent's part of, which keeps the store; ``module``: the one acting in ``episode``."""
    home, key = (episode.custom_data, STORE_KEY) if parent is None else (agent_stores(parent).stores,
                                                                          episode.agent_id)
    store = home.get(key)
    # One copied into a successor by a cut (which may start at the same step, when the cut
    # chunk had none) still knows the predecessor.
    if store is None or store.episode is not episode:
        successor = StateStore(episode.t_started, episode, None if store is None else store.running,
                               module=module)
        if store is not None:  # a cut: the predecessor's copy holds this chunk's start state
            successor.snapshots[0] = store.state_at_copy if episode.t_started > 0 else None
        home[key] = successor
        # A cut copies the predecessor's last references into the lookback (and a multi-agent
        # step taken across the cut refers to the predecessor): point them here, or shipping
        # this chunk would ship the predecessor's store too.
        column = episode.extra_model_outputs.get(STORE_COLUMN)
        if column is not None:
            episode.extra_model_outputs[STORE_COLUMN] = InfiniteLookbackBuffer(
                data=[successor] * (column.lookback + len(column)), lookback=column.lookback)
        store = successor
    column = episode.extra_model_outputs.get(STORE_COLUMN)
    # Made with the first step, not before: for an agent with no step yet, RLlib's multi-agent
    # episode reads only the columns its agent episode has.
    if column is None and len(episode):
        episode.extra_model_outputs[STORE_COLUMN] = InfiniteLookbackBuffer(data=[store] * len(episode))
    elif column is not None:
        column.extend([store] * (len(episode) - len(column)))  # the step just taken
    return store


def shipped_store(episode: SingleAgentEpisode) -> StateStore:
    """The store of the chunk that ``episode`` (a chunk, or a piece RLlib cut from one) starts in."""
    column = episode.extra_model_outputs.get(STORE_COLUMN)
    store = episode.custom_data.get(STORE_KEY) if column is None else column.get(0)
    if store is None:
        raise ValueError(
            "episode chunk carries no rllib_trajenc encoder state: it was not sampled with a "
            "config prepared by rllib_trajenc.with_traj_encoder()")
    return store


class TakeStoreFromSteps(ConnectorV2):
    """Learner, first: moves each episode's store from its per-step references into its
    custom_data, so that RLlib's pieces, which turn every extra_model_outputs column into a
    train-batch column, never see those references."""

    def __call__(self, *, rl_module: RLModule, batch: dict, episodes: list, **kwargs) -> Any:
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            if STORE_COLUMN in episode.extra_model_outputs:
                if len(episode):  # an agent with no step in a piece needs no state
                    episode.custom_data[STORE_KEY] = shipped_store(episode)
                del episode.extra_model_outputs[STORE_COLUMN]
        return batch


class AddStatesFromEpisodeStore(ConnectorV2):
    """Env-to-module: STATE_IN names each episode's row of the module's RolloutState.
    Learner: STATE_IN from the stores. RLlib's own state and time-dim pieces then find
    STATE_IN in the batch and step aside."""

    def __init__(self, input_observation_space=None, input_action_space=None, *,
                 as_learner_connector: bool = False, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self._as_learner_connector = as_learner_connector

    def __call__(self, *, rl_module: RLModule, batch: dict, episodes: list, **kwargs) -> Any:
        if rl_module is None or not rl_module.is_stateful() or Columns.STATE_IN in batch:
            return batch
        if self._as_learner_connector:
            self._add_learner_states(rl_module, batch, episodes)
        else:
            self._add_rollout_rows(rl_module, batch, episodes)
        return batch

    def _add_learner_states(self, rl_module: RLModule, batch: dict, episodes: list) -> None:
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            module = _single(rl_module, episode)
            if not module.is_stateful() or not len(episode):
                continue
            max_seq_len = module.model_config["max_seq_len"]
            store = shipped_store(episode)
            first = episode.t_started - store.t_started
            n_rows = math.ceil(len(episode) / max_seq_len)
            items = store.states_before([first + k * max_seq_len for k in range(n_rows)], module, max_seq_len)
            self.add_n_batch_items(batch, Columns.STATE_IN, items_to_add=items, num_items=n_rows,
                                   single_agent_episode=episode)

    def _add_rollout_rows(self, rl_module: RLModule, batch: dict, episodes: list) -> None:
        # A MultiRLModule acts only in multi-agent episodes: RLlib's single-agent env runner
        # reduces a multi-module spec to its one module (AlgorithmConfig.get_rl_module_spec).
        if not isinstance(rl_module, MultiRLModule):
            self._add_single_agent_rows(rl_module.unwrapped(), batch, episodes)
            return
        live = _live_owners(episodes)
        acting: dict[Optional[str], Optional[_Acting]] = {}  # by module id; None: stateless
        stepped: dict[str, set[Hashable]] = {}  # agents prepared, by multi-agent episode
        # The column even when only stateless modules act, or no agent at all (every env's
        # episode ended on this step): RLlib's time-rank piece then steps aside every time (the
        # flag it leaves in shared_data for the module-to-env pipeline would outlive this pass).
        batch.setdefault(Columns.STATE_IN, {})
        for episode, parent in _agent_episodes(episodes):
            if episode.module_id not in acting:
                acting[episode.module_id] = _Acting.of(_single(rl_module, episode))
            module = acting[episode.module_id]
            if module is None:
                continue
            store = chunk_store(episode, parent, module.module)
            store.snapshot(len(episode), module.max_seq_len)  # before the step runs
            row = -1  # RLlib does not step finished agents (its last pass of an episode is dropped)
            if not (episode.is_done or parent.is_done):
                row = module.claim_row(episode, store, live)
                stepped.setdefault(parent.id_, set()).add(episode.agent_id)
            self.add_batch_item(batch, Columns.STATE_IN, {ROLLOUT_ROW: np.int64(row)},
                                single_agent_episode=episode)
        for episode in episodes:
            agent_stores(episode).stepped = stepped.get(episode.id_, set())

    def _add_single_agent_rows(self, module: RLModule, batch: dict, episodes: list[SingleAgentEpisode]) -> None:
        """A single-agent env runner's pass: every env's episode acts, and STATE_IN goes in as one
        item already batched (RLlib batches it as it is), not one item per env for RLlib's pieces
        to batch and convert, and only an env whose episode does not hold its row yet claims one;
        env-to-module got about 0.1 ms cheaper per vector step of 16 envs (BENCHMARKS.md)."""
        acting, live = _Acting(module), {episode.id_ for episode in episodes}
        rows = np.empty(len(episodes), dtype=np.int64)
        for i, episode in enumerate(episodes):
            store = chunk_store(episode, module=module)
            store.snapshot(len(episode), acting.max_seq_len)  # before the step runs
            rows[i] = acting.claim_row(episode, store, live)
        # RLlib's marker for an item that has its batch dim already (what add_n_batch_items tags)
        self.add_batch_item(batch, Columns.STATE_IN, {ROLLOUT_ROW: rows.view(BatchedNdArray)})


class _Acting:
    """A stateful module acting in one env-to-module pass, and the rows it has named so far."""

    def __init__(self, module: RLModule):
        self.module, self.max_seq_len = module, module.model_config["max_seq_len"]
        self.rows, self.taken = module.rollout_state(), []

    @classmethod
    def of(cls, module: RLModule) -> Optional[_Acting]:
        return cls(module) if module.is_stateful() else None

    def claim_row(self, episode: SingleAgentEpisode, store: StateStore, live: set[str]) -> int:
        """The row for ``episode``'s next step, loaded with its state if it was another episode's."""
        position, owners = len(self.taken), self.rows.owners
        if position < len(owners) and owners[position] == episode.id_:  # the common case: nothing to do
            self.taken.append(position)
            return position
        row = self.rows.row_for(episode.id_, position, live, self.taken)
        self.taken.append(row)
        if self.rows.claim(row, episode.id_, store.running):
            store.running = self.rows.row(row)  # views: they follow the row from now on
        return row


def _agent_episodes(episodes: list[MultiAgentEpisode]) -> Iterator[tuple[SingleAgentEpisode, MultiAgentEpisode]]:
    """The episodes of the agents that just stepped, each with the multi-agent episode it is part
    of, in the order RLlib's env-to-module pieces add their items."""
    for episode in episodes:
        for agent_id in episode.get_agents_that_stepped():
            yield episode.agent_episodes[agent_id], episode


def _live_owners(episodes: list[MultiAgentEpisode]) -> set[str]:
    """The agent episodes whose rows must be kept: any other row may be given to a newcomer."""
    return {agent.id_ for episode in episodes for agent in episode.agent_episodes.values() if not agent.is_done}


class ReferStepsToStore(ConnectorV2):
    """Module-to-env, multi-agent: each acting agent's step refers to its store from the start,
    through the step's extra_model_outputs; RLlib's multi-agent episodes check at every env step
    that all of an agent's per-step columns are as long as its steps. (A step recorded in a
    successor chunk refers to its predecessor's store until ``chunk_store`` re-points it.)"""

    def __call__(self, *, rl_module: RLModule, batch: dict, episodes: list, **kwargs) -> Any:
        by_id = {episode.id_: episode for episode in episodes}
        for episode_id, agent_id, module_id in list(batch.get(Columns.ACTIONS, {})):
            store = agent_stores(by_id[episode_id]).stores.get(agent_id)
            if store is not None:  # None: a stateless module acts for this agent
                batch.setdefault(STORE_COLUMN, {})[(episode_id, agent_id, module_id)] = [store]
        return batch


def env_to_module_pieces() -> list[ConnectorV2]:
    """RLlib's default observation piece, then STATE_IN from the store. No time dim: RLlib's
    time-dim piece then finds STATE_IN and steps aside, and so does the module-to-env piece that
    would remove it again, item by item (with the GRU, this and rebuilding row views only on a
    change saved ~0.2 ms of every vector step of 16 envs: BENCHMARKS.md); the module takes
    [B, ...] observations as one step each."""
    return [AddObservationsFromEpisodesToBatch(), AddStatesFromEpisodeStore()]


def learner_pieces() -> list[ConnectorV2]:
    return [TakeStoreFromSteps(),
            AddObservationsFromEpisodesToBatch(as_learner_connector=True),
            AddColumnsFromEpisodesToTrainBatch(),
            AddTimeDimToBatchAndZeroPad(as_learner_connector=True),
            AddStatesFromEpisodeStore(as_learner_connector=True)]


def shipped_state_bytes(episodes: list[SingleAgentEpisode | MultiAgentEpisode]) -> int:
    """Bytes that encoder state adds to ``episodes`` pickled together, as Ray ships them: our
    stores (through custom_data or the per-step references, observations they re-ship included)
    or RLlib's per-step STATE_OUT column. Multi-agent episodes hold the policy mapping function,
    which only cloudpickle ships, so they are measured with it."""
    multi = any(isinstance(e, MultiAgentEpisode) for e in episodes)
    dumps = functools.partial(cloudpickle.dumps if multi else pickle.dumps, protocol=5)
    return len(dumps(episodes)) - len(dumps([_bare(e) for e in episodes]))


def _bare(episode: SingleAgentEpisode | MultiAgentEpisode) -> SingleAgentEpisode | MultiAgentEpisode:
    """A shallow copy of ``episode`` (and of its agents' episodes) without any encoder state."""
    bare = copy.copy(episode)
    if isinstance(episode, MultiAgentEpisode):
        bare.agent_episodes = {agent: _bare(e) for agent, e in episode.agent_episodes.items()}
    else:
        bare.extra_model_outputs = copy.copy(episode.extra_model_outputs)
        for column in (STORE_COLUMN, Columns.STATE_OUT):
            bare.extra_model_outputs.pop(column, None)
    bare._custom_data = {key: value for key, value in episode.custom_data.items() if key != STORE_KEY}
    return bare
