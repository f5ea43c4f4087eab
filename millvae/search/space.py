"""The search space: read from YAML/JSON, checked against TrainConfig's rules before any trial,
and sampled: trial i is the i-th `ParameterSampler(space, n_iter, random_state=seed)` draw."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from millvae.config import PARAM_NAMES, TrainConfig, make_config
from millvae.errors import MillvaeError

# The seed's random search (plus the final activation, which the paper also searched).
DEFAULT_SPACE = {
    "beta": {"uniform": [0.5, 9.0]},
    "codings_size": {"randint": [5, 40]},
    "conv_layers": [1, 2, 3],
    "start_filter_no": {"randint": [16, 128]},
    "dilations": ["1,2,4,8", "1,2,4", "1,2"],
    "kernel_size": {"randint": [2, 9]},
    "earlystop_patience": {"randint": [30, 50]},
    "final_activation": ["sigmoid", "selu"],
}
_DISTRIBUTIONS = ("uniform", "loguniform", "randint")
# parameters TrainConfig holds as integers: a continuous distribution over one always fails
_INT_PARAMS = {name: type(value) is int for name, value in asdict(TrainConfig()).items()}


def space_from_spec(spec: Mapping) -> dict:
    """Turn a JSON/YAML space ({name: list | {uniform: [loc, scale]} | {loguniform: [low, high]}
    | {randint: [low, high]}}) into what `ParameterSampler` takes."""
    out = {}
    for name, value in spec.items():
        if name not in PARAM_NAMES:
            raise MillvaeError(f"space: unknown parameter {name!r}; expected some of {PARAM_NAMES}")
        if isinstance(value, list):
            if not value:
                raise MillvaeError(f"space: {name}: expected a non-empty list of choices")
            out[name] = value
        elif isinstance(value, Mapping) and len(value) == 1:
            ((kind, args),) = value.items()
            out[name] = _distribution(name, kind, args)
        else:
            raise MillvaeError(
                f"space: {name}: expected a list of choices or {{uniform|loguniform|randint: "
                f"[a, b]}}; got {value!r}"
            )
    return out


def _numbers(name: str, kind: str, args) -> tuple[float, float]:
    """The two numbers of `{kind: [a, b]}` (YAML reads 1e-3 as a string: numeric strings count)."""
    bad = MillvaeError(f"space: {name}: expected {kind}: [a, b] with two numbers; got {args!r}")
    if not isinstance(args, list | tuple) or len(args) != 2:
        raise bad
    if any(isinstance(x, bool) for x in args):  # float(True) is 1.0: a typo, not a bound
        raise bad
    try:
        a, b = float(args[0]), float(args[1])
    except (TypeError, ValueError):
        raise bad from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise bad
    return a, b


def _distribution(name: str, kind, args):
    """The frozen scipy distribution of `{kind: args}`, its parameters checked here: scipy's own
    complaint about a negative scale is a long traceback from deep inside the sampler."""
    from scipy import stats

    if kind not in _DISTRIBUTIONS:
        raise MillvaeError(f"space: {name}: expected uniform, loguniform or randint; got {kind!r}")
    a, b = _numbers(name, kind, args)
    if kind == "uniform":
        if b <= 0:
            raise MillvaeError(
                f"space: {name}: expected uniform: [loc, scale] with scale > 0; got scale {b:g}"
            )
        return stats.uniform(a, b)
    if kind == "loguniform":
        if not 0 < a < b:
            raise MillvaeError(
                f"space: {name}: expected loguniform: [low, high] with 0 < low < high; "
                f"got {a:g} and {b:g}"
            )
        return stats.loguniform(a, b)
    if a != int(a) or b != int(b) or a >= b:
        raise MillvaeError(
            f"space: {name}: expected randint: [low, high] with integers low < high "
            f"(high excluded); got {a:g} and {b:g}"
        )
    return stats.randint(int(a), int(b))


def _candidates(name: str, value) -> list:
    """The values of one space entry to check: every choice, or a distribution's support ends."""
    if isinstance(value, list):
        return value
    ((kind, args),) = value.items()
    a, b = _numbers(name, kind, args)
    if kind == "randint":
        return [int(a), int(b) - 1]
    if _INT_PARAMS.get(name):
        raise MillvaeError(
            f"space: {name}: expected randint or a list (it takes integers); got {kind}, "
            "whose draws are not whole numbers"
        )
    return [_plain(a), _plain(a + b if kind == "uniform" else b)]


def check_space(spec: Mapping, fixed: Mapping) -> None:
    """Check every value the space can give against TrainConfig's rules, before any trial.

    Each choice (for a distribution: its parameters and both ends of its support) is validated
    with `make_config` over the fixed parameters. A rule between two parameters (lr_max >=
    learning_rate, window_size a multiple of 2**conv_layers) fails a value only where no single
    value of the other searched parameters makes it valid: a combination that fails is left to
    the trial, which is recorded FAILED with its reason.
    """
    space_from_spec(spec)  # names and distribution parameters first
    cands = {name: _candidates(name, value) for name, value in spec.items()}
    for name, values in cands.items():
        value = spec[name]
        where = "" if isinstance(value, list) else f", an end of {_describe(value)},"
        for v in values:
            err = _value_error(name, v, fixed, cands)
            if err:
                raise MillvaeError(f"space: {name}: {v!r}{where} is not allowed ({err})")


def _describe(dist: Mapping) -> str:
    ((kind, args),) = dist.items()
    return f"{kind} {list(args)}"


def _value_error(name: str, value, fixed: Mapping, cands: Mapping) -> str | None:
    """Why `name=value` breaks TrainConfig's rules with every other searched value, or None."""
    err = _config_error({**fixed, name: value})
    if err is None:
        return None
    for other, values in cands.items():
        if other != name and any(
            _config_error({**fixed, other: c, name: value}) is None for c in values
        ):
            return None
    return err


def _config_error(params: Mapping) -> str | None:
    try:
        make_config(**params)
    except MillvaeError as exc:
        return str(exc)
    return None


def load_space(path: str) -> dict:
    """The space spec from a YAML or JSON file ('' = the seed's space)."""
    if not path:
        return dict(DEFAULT_SPACE)
    p = Path(path)
    if not p.is_file():
        raise MillvaeError(f"space: expected a YAML or JSON file; got {path!r} (no such file)")
    import yaml

    try:
        spec = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise MillvaeError(f"space: could not parse {p.name}: {str(exc).splitlines()[0]}") from None
    if not isinstance(spec, Mapping) or not spec:
        raise MillvaeError(f"space: expected a mapping of parameter names in {p.name}")
    return dict(spec)


def sample_trials(spec: Mapping, n_iter: int, seed: int) -> list[dict]:
    """The search's trials, in order: trial i is the i-th ParameterSampler draw."""
    from sklearn.model_selection import ParameterSampler

    trials = []
    for draw in ParameterSampler(space_from_spec(spec), n_iter, random_state=seed):
        trials.append({k: _plain(v) for k, v in sorted(draw.items())})
    return trials


def _plain(v):
    import numpy as np

    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return round(float(v), 6)  # a stable, readable param string
    return v


def default_search_id(spec: Mapping, n_iter: int, seed: int, overrides: Mapping) -> str:
    blob = json.dumps([spec, n_iter, seed, overrides], sort_keys=True, default=str)
    return f"s{seed}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def shard_from_env(shard: int | None, n_shards: int) -> int:
    if shard is not None:
        return shard
    for var in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        if os.environ.get(var, "").strip():
            try:
                return int(os.environ[var])
            except ValueError:
                raise MillvaeError(f"{var}: expected an integer; got {os.environ[var]!r}") from None
    return 0


def shard_indices(n_iter: int, shard: int, n_shards: int) -> list[int]:
    """The trial indices shard `shard` of `n_shards` runs: those ≡ shard (mod n_shards)."""
    return list(range(shard, n_iter, n_shards))
