"""Command-line flags that size and place an RLlib job's learners, env runners and driver.

Placement works through custom resource labels: each node type in cluster.yaml advertises
``learner_node``, ``rollout_node`` or ``driver_node``, and each actor requests a sliver of its
label, so Ray can only schedule it on that node type. The sliver (LABEL_SHARE) is tiny on
purpose: the label says *where* an actor may run, while CPUs and GPUs decide *how many* fit.
"""
from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

# The labels cluster.yaml gives its node types (and docs/cluster.md uses).
LEARNER_RESOURCE = "learner_node"
ENV_RUNNER_RESOURCE = "rollout_node"
DRIVER_RESOURCE = "driver_node"
LABEL_SHARE = 0.01  # per actor: up to 100 actors fit on a node that advertises a label of 1

# Ray's own resource names: requesting one as a "label" would consume real capacity.
_RESERVED = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def _count(value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"must be an int >= {minimum}, got {value!r}")
    return value


def _amount(value: Any, *, positive: bool) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ValueError(f"must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return value


def _gpus(value: Any) -> float:
    """Ray hands out fractions of one GPU, but above one GPU only whole GPUs."""
    value = _amount(value, positive=False)
    if value > 1 and value != int(value):
        raise ValueError(f"must be at most 1 or a whole number (Ray splits only single GPUs), got {value!r}")
    return value


def _label(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value or value != value.strip() or value in _RESERVED:
        raise ValueError(f"must be a custom resource name (non-empty, no surrounding spaces, none of "
                         f"{sorted(_RESERVED)}), e.g. {LEARNER_RESOURCE!r}, got {value!r}")
    return value


@dataclass(frozen=True)
class _Flag:
    name: str
    parse: Callable[[str], Any]
    check: Callable[[Any], Any]
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    def checked(self, value: Any) -> Any:
        try:
            return self.check(value)
        except ValueError as error:
            raise ValueError(f"{self.name} {error}") from None

    def convert(self, text: str) -> Any:
        """argparse ``type``: a bad value fails at parse time, with the usage message."""
        try:
            value = self.parse(text)
        except ValueError:
            value = text  # unparsable: the check then says what was expected
        try:
            return self.check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None


_FLAGS = [
    _Flag("--num-learners", int, functools.partial(_count, minimum=0), 0,
          "remote learner actors; 0 runs one learner in the driver, 2+ train data-parallel with "
          "torch DDP (gloo on CPU, NCCL on GPU)"),
    _Flag("--gpus-per-learner", float, _gpus, 0.0, "GPUs per learner; a fraction shares one GPU"),
    _Flag("--num-env-runners", int, functools.partial(_count, minimum=0), 1,
          "remote env runner actors; 0 samples in the driver"),
    _Flag("--envs-per-runner", int, functools.partial(_count, minimum=1), 4,
          "vectorized envs per env runner (they share one batched forward pass per step)"),
    _Flag("--cpus-per-env-runner", float, functools.partial(_amount, positive=True), 1.0,
          "CPUs Ray reserves per env runner"),
    _Flag("--learner-resource", str, _label, None,
          f"custom resource that pins learners to a node type, e.g. {LEARNER_RESOURCE!r}; "
          "default: none, learners go wherever resources are free"),
    _Flag("--env-runner-resource", str, _label, None,
          f"custom resource that pins env runners to a node type, e.g. {ENV_RUNNER_RESOURCE!r}; "
          "default: none"),
    _Flag("--driver-resource", str, _label, None,
          f"custom resource that pins the algorithm's driver (under Tune, the trial actor) to a node "
          f"type, e.g. {DRIVER_RESOURCE!r} for the head, where Tune's local results and checkpoint "
          "directory is; default: none"),
]
_BY_DEST = {flag.dest: flag for flag in _FLAGS}


def add_scaling_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the flags apply_scaling reads; their defaults fit one machine (no labels, no GPU)."""
    group = parser.add_argument_group("scaling", "how many learners and env runners, and on which nodes")
    for flag in _FLAGS:
        group.add_argument(flag.name, type=flag.convert, default=flag.default,
                           help=f"{flag.help} (default: %(default)s)")
    return parser


def apply_scaling(config: AlgorithmConfig, args: argparse.Namespace) -> AlgorithmConfig:
    """Sets ``config``'s learner and env-runner counts, resources and placement from ``args``.

    Labels only act on remote actors, and under Tune on the driver: the learner and env runner
    that run inside the driver process (0 remote ones) go wherever the driver goes.

    Values are checked again here, not only by the flags, because callers may build ``args``
    themselves; a bad value raises ValueError naming the flag.
    """
    v = {dest: flag.checked(getattr(args, dest)) for dest, flag in _BY_DEST.items()}
    if v["learner_resource"] and v["num_learners"] == 0:
        raise ValueError("--learner-resource needs --num-learners >= 1: with 0 the learner runs "
                         "inside the driver process (place that with --driver-resource)")
    if v["env_runner_resource"] and v["num_env_runners"] == 0:
        raise ValueError("--env-runner-resource needs --num-env-runners >= 1: with 0 the driver "
                         "samples itself (place it with --driver-resource)")
    return config.resources(
        custom_resources_for_main_process=_pin(v["driver_resource"]),
    ).learners(
        num_learners=v["num_learners"],
        num_gpus_per_learner=v["gpus_per_learner"],
        custom_resources_per_learner=_pin(v["learner_resource"]),
    ).env_runners(
        num_env_runners=v["num_env_runners"],
        num_envs_per_env_runner=v["envs_per_runner"],
        num_cpus_per_env_runner=v["cpus_per_env_runner"],
        custom_resources_per_env_runner=_pin(v["env_runner_resource"]),
    )


def _pin(label: Optional[str]) -> dict[str, float]:
    return {label: LABEL_SHARE} if label else {}
