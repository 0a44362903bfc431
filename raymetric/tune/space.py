"""The sweep file and its search space, checked without Ray.

A sweep file is a training config with a ``tune`` block. It may start from a ``base`` config (a path
relative to the sweep file) whose keys it overrides, so a sweep reads as "this run, varied":

    base: demo.yaml
    max_epochs: 8                                   # overrides the base for every trial
    tune:
      search:
        optimizer.args.lr: {loguniform: [1e-5, 1e-3]}
        criterion.args.margin: {choice: [0.1, 0.2]}
      num_samples: 4

Command-line ``key=value`` overrides apply to the merged file, so ``tune.num_samples=2`` changes the
sweep and ``max_epochs=2`` every trial. A trial's sampled values become ``key=value`` overrides of the
training config, applied by ``raymetric.config.apply_override`` exactly as on the command line.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, ValidationError

from raymetric.config import (
    Block,
    ConfigError,
    TrainConfig,
    apply_override,
    build_config,
    format_validation_error,
    parse_yaml,
)

# Set by the sweep for every trial (its run directory is the trial's directory).
RESERVED_KEYS = ("ray.storage_path", "ray.name")
# Above this many combinations of corner values, each searched key is varied alone.
MAX_CHECKED_COMBINATIONS = 64


class SweepConfig(BaseModel):
    """The ``tune`` block of a sweep file. Every default of a sweep lives here."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Config key -> {kind: arguments}, e.g. {"optimizer.args.lr": {"loguniform": [1e-5, 1e-3]}};
    # kinds: SEARCH_SPACES at the bottom of this module.
    search: dict[str, dict[str, Any]]
    num_samples: PositiveInt = 4  # trials drawn (each grid point is repeated this many times)
    metric: str = "cmc@1"  # a validation metric: cmc@1, map@5, <category>/cmc@1, ...
    mode: Literal["max", "min"] = "max"
    # Early stopping on `metric`, in epochs; null: every trial runs all its epochs.
    # Names: TRIAL_SCHEDULERS in raymetric/tune/schedulers.py.
    scheduler: Block | None = Block(name="asha", args={"grace_period": 1, "reduction_factor": 2})
    max_concurrent_trials: PositiveInt | None = None  # null: as many as the cluster holds at once
    # What each trial's driver (the Tune actor that fits a TorchTrainer and waits) reserves besides
    # its Train workers. Not a CPU, which its own workers may need (on 2 CPUs, Ray's default of one
    # CPU deadlocks a 2-worker trial); memory, and a share of the head node, where Ray's docs want
    # drivers (a worker node may be preempted). Ray gives the head `node:__internal_head__: 1`.
    trial_resources: dict[str, NonNegativeFloat] = Field(
        default_factory=lambda: {"memory": 5e8, "node:__internal_head__": 0.01}
    )
    name: str | None = None  # sweep directory name; default: "<date>_<time>_<postfix>_sweep"
    seed: int = 0  # of the random search, so that a sweep file draws the same trials again


# ---------------------------------------------------------------- loading


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings merge key by key, anything else replaces.

    >>> deep_merge({"a": {"x": 1, "y": 2}, "b": [1]}, {"a": {"y": 3}, "b": [2]})
    {'a': {'x': 1, 'y': 3}, 'b': [2]}
    """
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"{what} not found: {path}")
    with open(path) as f:
        raw = parse_yaml(f.read()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be a mapping of keys, got {type(raw).__name__}")
    return raw


def load_sweep(path: str, overrides: Sequence[str] = ()) -> tuple[SweepConfig, dict]:
    """Read a sweep file, merge it over its ``base``, apply ``key=value`` overrides.

    Returns the typed ``tune`` block and the raw training config (checked later, per trial).
    """
    raw = _read_yaml(path, "sweep file")
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config key 'base': a path to a training config, got {base!r}")
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
        base_raw = _read_yaml(base_path, "config key 'base': file")
        for key in ("base", "tune"):
            if key in base_raw:
                raise ConfigError(f"config key 'base': {base_path} has a {key!r} key; a base is a training config")
        raw = deep_merge(base_raw, raw)
    for override in overrides:
        apply_override(raw, override)
    tune_raw = raw.pop("tune", None)
    if not isinstance(tune_raw, dict):
        raise ConfigError(f"config key 'tune': a sweep file needs a 'tune' block with a 'search', got {tune_raw!r}")
    return parse_sweep_config(tune_raw), raw


def parse_sweep_config(tune_raw: dict) -> SweepConfig:
    """The typed ``tune`` block; errors name the key as ``tune.<key>``.

    >>> parse_sweep_config({"search": {}, "num_samples": 0})
    Traceback (most recent call last):
    ...
    raymetric.config.ConfigError: config key 'tune.num_samples': Input should be greater than 0 (got 0)
    """
    if isinstance(tune_raw.get("search"), dict):
        tune_raw = {**tune_raw, "search": flatten_search(tune_raw["search"])}
    try:
        return SweepConfig.model_validate(tune_raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix="tune")) from None


def flatten_search(search: dict, prefix: str = "") -> dict:
    """Search keys as dotted config keys: ``{sampler: {args: {n_instances: {choice: [2, 4]}}}}`` (what a
    ``tune.search.sampler.args.n_instances=...`` override makes) is ``sampler.args.n_instances``.

    A mapping whose values are all mappings is a level of keys; anything else is a leaf (a search
    spec such as ``{choice: [...]}``, checked later).

    >>> flatten_search({"optimizer.args": {"lr": {"loguniform": [1e-5, 1e-3]}}, "seed": {"choice": [1, 2]}})
    {'optimizer.args.lr': {'loguniform': [1e-05, 0.001]}, 'seed': {'choice': [1, 2]}}
    """
    flat = {}
    for key, value in search.items():
        path = f"{prefix}{key}"
        is_level = isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values())
        if is_level:
            flat |= flatten_search(value, f"{path}.")
        else:
            flat[path] = value
    return flat


# ---------------------------------------------------------------- one override path


def override_value(value: Any) -> str:
    """A sampled value as the right-hand side of a ``key=value`` override (JSON is YAML).

    >>> override_value(0.0003), override_value("adam"), override_value([1, 5])
    ('0.0003', '"adam"', '[1, 5]')
    """
    if hasattr(value, "item"):  # numpy scalars from Tune's samplers
        value = value.item()
    return json.dumps(value)


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's sampled values as ``key=value`` overrides, in the search block's order.

    >>> trial_overrides({"optimizer.args.lr": 1e-4, "sampler.args.n_instances": 2})
    ['optimizer.args.lr=0.0001', 'sampler.args.n_instances=2']
    """
    return [f"{key}={override_value(value)}" for key, value in params.items()]


def config_from_raw(train_raw: dict, overrides: Sequence[str] = ()) -> TrainConfig:
    """The typed training config of a raw dict plus ``key=value`` overrides (as ``load_config``)."""
    raw = copy.deepcopy(train_raw)
    for override in overrides:
        apply_override(raw, override)
    return build_config(raw)


# ---------------------------------------------------------------- search space


def build_search_space(key: str, spec: Any) -> tuple[Any, list]:
    """Ray Tune's sampler for one searched key, and the values the driver checks before any trial.

    The values checked are the ends of a range plus an interior, non-round point (so that a float
    range on an integer key fails here, not in a trial), or every value of a choice.

    >>> domain, corners = build_search_space("criterion.args.margin", {"choice": [0.1, 0.2]})
    >>> corners
    [0.1, 0.2]
    >>> build_search_space("optimizer.args.lr", {"loguniform": [0, 1e-3]})
    Traceback (most recent call last):
    ...
    raymetric.config.ConfigError: config key tune.search.optimizer.args.lr: loguniform needs 0 < low < high, got [0, 0.001]
    """
    where = f"config key tune.search.{key}"
    if key in RESERVED_KEYS:
        raise ConfigError(f"{where}: cannot be searched; the sweep sets it for every trial")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: give one kind and its arguments, e.g. {{choice: [0.1, 0.2]}}; got {spec!r}")
    ((kind, args),) = spec.items()
    if kind not in SEARCH_SPACES:
        raise ConfigError(f"{where}: unknown kind {kind!r}; known: {sorted(SEARCH_SPACES)}")
    return SEARCH_SPACES[kind](where, kind, args)


def corner_combinations(corners: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of corner values, or, above ``MAX_CHECKED_COMBINATIONS``, each key varied
    alone with the others at their first value.

    >>> corner_combinations({"a": [1, 2], "b": ["x", "y"]})
    [{'a': 1, 'b': 'x'}, {'a': 1, 'b': 'y'}, {'a': 2, 'b': 'x'}, {'a': 2, 'b': 'y'}]
    """
    keys = list(corners)
    if math.prod(len(v) for v in corners.values()) <= MAX_CHECKED_COMBINATIONS:
        return [dict(zip(keys, values)) for values in itertools.product(*corners.values())]
    first = {k: v[0] for k, v in corners.items()}
    return [first] + [first | {k: value} for k in keys for value in corners[k][1:]]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _values(where: str, kind: str, args: Any) -> list:
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} takes a non-empty list of values, got {args!r}")
    return args


def _bounds(where: str, kind: str, args: Any, *, q: bool = False, integer: bool = False, log: bool = False) -> list:
    names = "[low, high, q]" if q else "[low, high]"
    n = 3 if q else 2
    if not (isinstance(args, list) and len(args) == n and all(_is_number(a) for a in args)):
        raise ConfigError(f"{where}: {kind} takes {names}, got {args!r}")
    if integer and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: {kind} takes integers {names}, got {args!r}")
    low, high = args[0], args[1]
    if not (0 < low < high if log else low < high):
        raise ConfigError(f"{where}: {kind} needs {'0 < ' if log else ''}low < high, got {args!r}")
    if q and args[2] <= 0:
        raise ConfigError(f"{where}: {kind} needs q > 0, got {args!r}")
    return args


def _interior(low: float, high: float, log: bool) -> float:
    # 1/pi of the way: never a round number, so an integer key given a float range fails the check.
    return low * (high / low) ** (1 / math.pi) if log else low + (high - low) / math.pi


def _choice(where: str, kind: str, args: Any) -> tuple[Any, list]:
    from ray import tune

    values = _values(where, kind, args)
    return tune.choice(values), values


def _grid(where: str, kind: str, args: Any) -> tuple[Any, list]:
    from ray import tune

    values = _values(where, kind, args)
    return tune.grid_search(values), values


def _continuous(make: Callable, *, log: bool, q: bool) -> Callable:
    def build(where: str, kind: str, args: Any) -> tuple[Any, list]:
        args = _bounds(where, kind, args, q=q, log=log)
        low, high = args[0], args[1]
        corners = [low, high] if q else [low, _interior(low, high, log), high]
        return make(*args), corners

    return build


def _integer(make: Callable, *, log: bool, q: bool) -> Callable:
    def build(where: str, kind: str, args: Any) -> tuple[Any, list]:
        args = _bounds(where, kind, args, q=q, integer=True, log=log)
        # Ray: randint and lograndint exclude `high`; the q variants include it.
        return make(*args), [args[0], args[1] if q else args[1] - 1]

    return build


def _lazy(name: str) -> Callable:
    def make(*args):
        from ray import tune

        return getattr(tune, name)(*args)

    return make


SEARCH_SPACES: dict[str, Callable[[str, str, Any], tuple[Any, list]]] = {
    "choice": _choice,  # [v1, v2, ...], drawn at random
    "grid": _grid,  # [v1, v2, ...], every value (times num_samples)
    "uniform": _continuous(_lazy("uniform"), log=False, q=False),  # [low, high]
    "quniform": _continuous(_lazy("quniform"), log=False, q=True),  # [low, high, q]
    "loguniform": _continuous(_lazy("loguniform"), log=True, q=False),  # [low, high], 0 < low
    "qloguniform": _continuous(_lazy("qloguniform"), log=True, q=True),  # [low, high, q]
    "randint": _integer(_lazy("randint"), log=False, q=False),  # [low, high), integers
    "qrandint": _integer(_lazy("qrandint"), log=False, q=True),  # [low, high] in steps of q
    "lograndint": _integer(_lazy("lograndint"), log=True, q=False),  # [low, high), log-uniform
}
