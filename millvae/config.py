"""The one validated configuration of a training run.

Every `main` entry-point parameter is a field here, with its default and meaning; the CLI, MLproject
(checked by a test) and README are built from this list. Validation happens once, before any data is
loaded, and raises a one-line MillvaeError.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

from millvae import SIGNAL_NAMES
from millvae.errors import MillvaeError
from millvae.memory import available_gb, estimate

FINAL_ACTIVATIONS = ("sigmoid", "selu")
DATA_KEYWORDS = ("auto", "nasa", "synthetic")
SPLITS = ("window", "case", "cut", "casefold")
POSITIVES = ("failed", "worn")
THRESHOLD_METHODS = ("f1", "percentile")
LR_SCHEDULES = ("constant", "onecycle")
DETECTORS = ("vae", "combined")
SWITCHES = ("false", "true")
# the scores a combined detector may average (and `mse_<signal>`, one signal's reconstruction
# error), and the default parts: chosen on the validation folds of the real data over three
# training seeds (docs/detection.md)
COMBINABLE = ("mse", "kl", "lat", "pca")
COMBINE_DEFAULT = ("mse_smcAC", "lat", "pca")
# what detectors logged before `combine` existed averaged
COMBINE_LEGACY = ("mse", "lat", "pca")
# Upper bounds: no single parameter may exhaust the machine or overflow what consumes it. Sizes
# beyond them are refused; within them `check_memory` has the last word.
MAX_CODINGS = 4096
MAX_FILTERS = 1024
MAX_WINDOW = 9000  # samples per record of mill.mat: no window or stride can be longer
MAX_DILATIONS = 16
MAX_BATCH = 65536
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1  # NumPy's and TensorFlow's seeds are 32-bit
MAX_SCORE_SAMPLES = 100
MAX_BOOTSTRAP = 100_000
MAX_FOLDS = 64  # the data set has 7 failing tools; a fold per tool is the most that can be


def _p(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Parameters of one β-VAE training run (defaults follow the seed's `model_fit`)."""

    beta: float = _p(1.25, "weight of the KL term (β of the β-VAE), >= 0")
    codings_size: int = _p(10, "size of the latent coding")
    conv_layers: int = _p(1, "number of TCN blocks in encoder and decoder")
    start_filter_no: int = _p(32, "filters of the TCN layers")
    kernel_size: int = _p(2, "kernel size of the TCN layers and of the output Conv1D")
    dilations: tuple[int, ...] = _p((1, 2, 4), "TCN dilations, comma-separated, e.g. 1,2,4,8")
    final_activation: str = _p("sigmoid", "activation of the output layer: sigmoid or selu")
    epochs: int = _p(1000, "epoch cap; early stopping normally ends a run long before")
    earlystop_patience: int = _p(8, "epochs without val-loss improvement before stopping")
    batch_size: int = _p(1024, "training batch size")
    learning_rate: float = _p(0.001, "Adam learning rate (onecycle: its start; a tenth at the end)")
    lr_schedule: str = _p("constant", "constant (the seed's) | onecycle (warm-up then cosine)")
    lr_max: float = _p(0.02, "onecycle: peak learning rate, reached at 30 % of the cycle")
    lr_cycle_epochs: int = _p(60, "onecycle: epochs of the cycle; the rate stays low after")
    bn_momentum: float = _p(0.99, "BatchNorm moving-statistics momentum (validation, scoring)")
    seed: int = _p(31, "random seed of weights, sampling and shuffling")
    data: str = _p("auto", "a mill.mat path, or auto | nasa | synthetic")
    signals: str = _p("all", "comma-separated signals, 'all' (the six) or 'available'")
    labels: str = _p("", "labels CSV (seed format) | seed (the seed's, fetched) | empty = detect")
    window_size: int = _p(64, "samples per window; divisible by 2**conv_layers")
    stride: int = _p(64, "samples between window starts")
    split: str = _p(
        "window", "window (seed protocol, leaks) | case (leak-free) | cut | casefold (tool folds)"
    )
    split_seed: int = _p(
        0, "seed of the case/cut splits; split=casefold: the fold, 0..folds-1 (window: 15/10)"
    )
    folds: int = _p(4, "split=casefold: folds of the failing tools, each tested in one fold")
    healthy_max_vb: float = _p(0.2, "flank wear (mm) below which a tool is healthy")
    failed_min_vb: float = _p(0.7, "flank wear (mm) from which a tool is failed")
    positive: str = _p("failed", "positive class of the detection metrics: failed | worn")
    threshold_method: str = _p("f1", "threshold chosen on validation: f1 | percentile")
    threshold_percentile: float = _p(99.0, "percentile of healthy validation scores (percentile)")
    score_samples: int = _p(0, "0: decode the mean coding; K: average K sampled reconstructions")
    detector: str = _p(
        "vae",
        "vae: decide on the β-VAE's best validation score | combined: VAE + PCA (combined_cond)",
    )
    combine: str = _p(
        ",".join(COMBINE_DEFAULT),
        "detector=combined: the condition-aware scores averaged, some of mse, kl, lat, pca and "
        "mse_<signal> (one signal's reconstruction error, e.g. mse_smcAC)",
    )
    conditional: str = _p(
        "false", "true: a conditional β-VAE, DOC, feed and material into encoder and decoder"
    )
    smoothing: float = _p(
        0.0,
        "weight of a tool's earlier cuts in <score>_smooth, each condition-aware score averaged "
        "over the tool's cuts (0 = off; 0.7 chosen on the real data's validation folds)",
    )
    bootstrap: int = _p(1000, "bootstrap resamples (over cuts) of the test AP interval; 0 = none")
    experiment: str = _p("millvae", "MLflow experiment name")
    max_memory_gb: float = _p(
        0.0, "refuse a configuration whose estimated memory exceeds this; 0 = this machine's"
    )

    @property
    def combine_parts(self) -> tuple[str, ...]:
        """`combine` as a tuple of score names, e.g. ('mse_smcAC', 'pca'); any case."""
        return tuple(_part(p) for p in self.combine.split(",") if p.strip())

    @property
    def dilations_str(self) -> str:
        return ",".join(map(str, self.dilations))

    def to_params(self) -> dict[str, str]:
        """Parameter strings as logged to MLflow."""
        out = {}
        for k, v in asdict(self).items():
            out[k] = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return out

    def model_name(self) -> str:
        """The seed's model-naming style: the key hyperparameters at a glance."""
        kind = "cbvae" if self.conditional == "true" else "bvae"
        return (
            f"{kind}_beta-{self.beta:g}_cod-{self.codings_size}_lay-{self.conv_layers}"
            f"_fil-{self.start_filter_no}_ker-{self.kernel_size}"
            f"_dil-{'-'.join(map(str, self.dilations))}"
            f"_{self.final_activation}"
        )

    def run_name(self, data_source: str = "") -> str:
        """The model's name, then what else tells two runs apart in a list: split (and its
        seed), data source once known (real / synthetic), and epochs when capped below the
        default, e.g. ``bvae_..._sigmoid_case-s1_real_ep3``."""
        split = self.split if self.split == "window" else f"{self.split}-s{self.split_seed}"
        if self.split == "casefold":
            split = f"casefold{self.folds}-f{self.split_seed}"
        parts = [self.model_name(), split]
        if data_source:
            parts.append(data_source)
        if self.epochs != TrainConfig.epochs:
            parts.append(f"ep{self.epochs}")
        return "_".join(parts)


PARAM_NAMES = tuple(f.name for f in fields(TrainConfig))
# The published best model of the seed's random search (Hahn & Mechefske 2021); its early-stopping
# patience was not published.
PAPER_BEST = {
    "beta": 3.92,
    "codings_size": 21,
    "start_filter_no": 16,
    "kernel_size": 3,
    "dilations": "1,2,4,8",
    "conv_layers": 2,
    "final_activation": "selu",
}
# The parameters that shape the prepared windows (the rest describe the model and its evaluation).
PREP_PARAMS = (
    "data",
    "signals",
    "labels",
    "window_size",
    "stride",
    "split",
    "split_seed",
    "folds",
    "healthy_max_vb",
    "failed_min_vb",
)
PARAM_HELP = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
PARAM_DEFAULTS = TrainConfig().to_params()


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise MillvaeError(f"{name}: expected an integer; got {value!r}")
    if isinstance(value, int):
        return value
    try:
        f = float(str(value).strip())
    except ValueError:
        raise MillvaeError(f"{name}: expected an integer; got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise MillvaeError(f"{name}: expected an integer; got {value!r}")
    return int(f)


def _float(name: str, value: Any) -> float:
    try:
        f = float(str(value).strip())
    except ValueError:
        raise MillvaeError(f"{name}: expected a number; got {value!r}") from None
    if not math.isfinite(f):
        raise MillvaeError(f"{name}: expected a finite number; got {value!r}")
    return f


def parse_dilations(value: Any) -> tuple[int, ...]:
    """'1,2,4', '[1, 2, 4]' or a sequence of ints -> (1, 2, 4)."""
    if isinstance(value, list | tuple):
        items = [str(v) for v in value]
    else:
        text = str(value).strip().strip("[]()")
        items = [t for t in re.split(r"[,\s]+", text) if t]
    try:
        dil = tuple(int(t) for t in items)
    except ValueError:
        raise MillvaeError(
            f"dilations: expected comma-separated positive integers like 1,2,4; got {value!r}"
        ) from None
    if not dil or any(d < 1 for d in dil):
        raise MillvaeError(
            f"dilations: expected comma-separated positive integers like 1,2,4; got {value!r}"
        )
    return dil


def _as_type(f: Field, value: Any) -> Any:
    """A raw value (a command-line string, or a value) as field `f`'s type; words of a fixed
    list (`Options` in CONSTRAINTS) lower-cased, other text stripped."""
    if f.type == "int":
        return _int(f.name, value)
    if f.type == "float":
        return _float(f.name, value)
    if f.type == "tuple[int, ...]":
        return parse_dilations(value)
    if f.name == "labels":  # none given: regions are detected
        value = value or ""
    text = str(value).strip()
    return text.lower() if isinstance(CONSTRAINTS.get(f.name), Options) else text


def make_config(**raw: Any) -> TrainConfig:
    """Build and validate a TrainConfig from strings or values (unknown keys are an error)."""
    unknown = sorted(set(raw) - set(PARAM_NAMES))
    if unknown:
        raise MillvaeError(
            f"unknown parameter(s) {', '.join(unknown)}; expected some of {', '.join(PARAM_NAMES)}"
        )
    given = {**asdict(TrainConfig()), **raw}
    # field order: the first value that is not of its field's type is the one reported
    cfg = TrainConfig(**{f.name: _as_type(f, given[f.name]) for f in fields(TrainConfig)})
    validate(cfg)
    return cfg


class Constraint(Protocol):
    """One entry of CONSTRAINTS: the error message for a bad value, None for a good one."""

    def error(self, name: str, cfg: TrainConfig) -> str | None: ...


@dataclass(frozen=True)
class Ref:
    """A bound read from another field, so that a cross-field constraint says so in the table."""

    field: str


Bound = float | Ref | None  # None: unbounded on that side


@dataclass(frozen=True)
class Interval:
    """A number between low and high.

    `kind` is the field's type: floats print with :g, integers as they are (a seed of 2**32 - 1
    must not print as 4.29497e+09). `label` stands for the value in the message; a two-sided
    interval defaults to the field's name, a one-sided one to nothing (``expected > 0``).
    """

    kind: type[int] | type[float]
    low: Bound
    high: Bound
    closed: Literal["both", "left", "right", "neither"] = "both"
    label: str = ""

    def error(self, name: str, cfg: TrainConfig) -> str | None:
        value = getattr(cfg, name)
        low, high = _resolve(self.low, cfg), _resolve(self.high, cfg)
        # written as what must hold, not as what fails, so that NaN fails
        above = low is None or (low <= value if self._low_in else low < value)
        below = high is None or (value <= high if self._high_in else value < high)
        if above and below:
            return None
        return f"{name}: expected {self._expected(name, low, high)}; got {self._show(value)}"

    @property
    def _low_in(self) -> bool:
        return self.closed in ("both", "left")

    @property
    def _high_in(self) -> bool:
        return self.closed in ("both", "right")

    def _expected(self, name: str, low: float | None, high: float | None) -> str:
        """``1 <= name <= 4096``, or for one side only ``>= learning_rate (0.001)``."""
        if low is not None and high is not None:
            return (
                f"{self._shown(self.low, low)} {'<=' if self._low_in else '<'} "
                f"{self.label or name} {'<=' if self._high_in else '<'} "
                f"{self._shown(self.high, high)}"
            )
        if low is not None:
            side = f"{'>=' if self._low_in else '>'} {self._shown(self.low, low)}"
        else:
            side = f"{'<=' if self._high_in else '<'} {self._shown(self.high, high)}"
        return f"{self.label} {side}" if self.label else side

    def _shown(self, bound: Bound, value: float) -> str:
        if isinstance(bound, Ref):
            return f"{bound.field} ({self._show(value)})"
        return self._show(value)

    def _show(self, value: Any) -> str:
        return format(value, "g") if self.kind is float else f"{value}"


def _resolve(bound: Bound, cfg: TrainConfig) -> Any:
    return getattr(cfg, bound.field) if isinstance(bound, Ref) else bound


@dataclass(frozen=True)
class Options:
    """One of a fixed list of (lower-cased) words."""

    values: tuple[str, ...]

    def error(self, name: str, cfg: TrainConfig) -> str | None:
        value = getattr(cfg, name)
        if value in self.values:
            return None
        return f"{name}: expected one of {', '.join(self.values)}; got {value!r}"


@dataclass(frozen=True)
class Custom:
    """A constraint that fits no other shape; `check` writes its whole message."""

    check: Callable[[TrainConfig], str | None]

    def error(self, name: str, cfg: TrainConfig) -> str | None:
        return self.check(cfg)


def _conv_layers(cfg: TrainConfig) -> str | None:
    if 1 <= cfg.conv_layers <= 6:
        return None
    return f"conv_layers: expected 1..6; got {cfg.conv_layers}"


def _window_size(cfg: TrainConfig) -> str | None:
    """Reads conv_layers: each encoder block halves the window and each decoder block doubles
    it back, so it must divide by 2**conv_layers."""
    factor = 2**cfg.conv_layers
    if not (cfg.window_size >= factor and cfg.window_size % factor == 0):
        return (
            f"window_size: expected a multiple of 2**conv_layers = {factor}; got {cfg.window_size}"
        )
    return Interval(int, factor, MAX_WINDOW).error("window_size", cfg)


def _dilations(cfg: TrainConfig) -> str | None:
    """Reads window_size."""
    if len(cfg.dilations) <= MAX_DILATIONS and max(cfg.dilations) <= cfg.window_size:
        return None
    return (
        f"dilations: expected at most {MAX_DILATIONS} values, each <= window_size "
        f"({cfg.window_size}); got {cfg.dilations_str}"
    )


def _wear_bands(cfg: TrainConfig) -> str | None:
    """Reads failed_min_vb: the healthy and failed wear bands must not overlap."""
    if 0 < cfg.healthy_max_vb <= cfg.failed_min_vb:
        return None
    return (
        "healthy_max_vb/failed_min_vb: expected 0 < healthy_max_vb <= failed_min_vb; got "
        f"{cfg.healthy_max_vb:g} and {cfg.failed_min_vb:g}"
    )


def _fold(cfg: TrainConfig) -> str | None:
    """Reads split and folds: under split=casefold the split seed names one of the folds."""
    if cfg.split != "casefold" or cfg.split_seed < cfg.folds:
        return None
    return (
        f"split_seed: expected a fold 0..{cfg.folds - 1} under split=casefold with "
        f"folds={cfg.folds}; got {cfg.split_seed}"
    )


def _part(text: str) -> str:
    """One `combine` part under its own name: 'MSE_smcac' -> 'mse_smcAC'."""
    t = text.strip().lower()
    for name in SIGNAL_NAMES:
        if t == f"mse_{name.lower()}":
            return f"mse_{name}"
    return t


def combinable(signals) -> tuple[str, ...]:
    """The parts a combined detector of these signals may average."""
    return (*COMBINABLE, *(f"mse_{s}" for s in signals))


def missing_signals(parts, signals) -> list[str]:
    """The parts that are the error of a signal not among `signals`."""
    return [p for p in parts if p.startswith("mse_") and p[4:] not in signals]


def _combine(cfg: TrainConfig) -> str | None:
    parts = cfg.combine_parts
    if parts and set(parts) <= set(combinable(SIGNAL_NAMES)) and len(set(parts)) == len(parts):
        return None
    return (
        f"combine: expected distinct comma-separated scores from {', '.join(COMBINABLE)} or "
        f"mse_<signal> (one signal's error, e.g. mse_smcAC), e.g. {','.join(COMBINE_DEFAULT)}; "
        f"got {cfg.combine!r}"
    )


def _combine_signals(cfg: TrainConfig) -> str | None:
    if cfg.signals.lower() in ("all", "available"):
        return None  # which signals the data has is known once it is read (`check_combine`)
    return check_combine(cfg, [s.strip() for s in cfg.signals.split(",") if s.strip()])


def check_combine(cfg: TrainConfig, signals) -> str | None:
    """Why `combine` cannot be computed from these signals (None where it can)."""
    if cfg.detector != "combined":
        return None
    missing = missing_signals(cfg.combine_parts, signals)
    if not missing:
        return None
    return (
        f"combine: expected errors of the run's signals ({', '.join(signals)}); got "
        f"{', '.join(missing)}: pass -P combine=mse,pca, or parts of these signals"
    )


def _experiment(cfg: TrainConfig) -> str | None:
    return None if cfg.experiment else "experiment: expected a non-empty MLflow experiment name"


def _data(cfg: TrainConfig) -> str | None:
    if cfg.data.lower() in DATA_KEYWORDS or os.path.isfile(cfg.data):
        return None
    return (
        "data: expected a path to a mill.mat file, 'auto', 'nasa' or 'synthetic'; "
        f"got {cfg.data!r} (no such file)"
    )


def _labels(cfg: TrainConfig) -> str | None:
    # 'seed' is fetched (and checked) when the data is prepared, like data=nasa
    if not cfg.labels or cfg.labels.lower() == "seed" or os.path.isfile(cfg.labels):
        return None
    why = "a directory" if os.path.isdir(cfg.labels) else "no such file"
    return f"labels: expected a CSV file or 'seed'; got {cfg.labels!r} ({why})"


def _signals(cfg: TrainConfig) -> str | None:
    if cfg.signals.lower() in ("all", "available"):
        return None
    names = [s.strip() for s in cfg.signals.split(",") if s.strip()]
    if names and all(s in SIGNAL_NAMES for s in names):
        return None
    return (
        f"signals: expected 'all', 'available' or names from {', '.join(SIGNAL_NAMES)}; "
        f"got {cfg.signals!r}"
    )


# What `validate` checks, in the order it checks: the first error a configuration meets is what the
# user reads (and what tests and scripts quote), so reordering is a change of behaviour. A
# cross-field entry (a Ref bound, or a Custom that reads another field) comes after the fields it
# reads, whose own checks have passed by then.
CONSTRAINTS: dict[str, Constraint] = {
    "beta": Interval(float, 0, None, label="a number"),
    "codings_size": Interval(int, 1, MAX_CODINGS),
    "conv_layers": Custom(_conv_layers),
    "start_filter_no": Interval(int, 1, MAX_FILTERS),
    "final_activation": Options(FINAL_ACTIVATIONS),
    "epochs": Interval(int, 1, MAX_EPOCHS),
    "earlystop_patience": Interval(int, 0, MAX_EPOCHS),
    "batch_size": Interval(int, 1, MAX_BATCH),
    "learning_rate": Interval(float, 0, None, closed="neither"),
    "lr_schedule": Options(LR_SCHEDULES),
    "lr_max": Interval(float, Ref("learning_rate"), None),
    "lr_cycle_epochs": Interval(int, 1, MAX_EPOCHS),
    "bn_momentum": Interval(float, 0, 1, closed="left", label="momentum"),
    "seed": Interval(int, 0, MAX_SEED),
    "split_seed": Interval(int, 0, MAX_SEED),
    "window_size": Custom(_window_size),
    "stride": Interval(int, 1, MAX_WINDOW),
    # a kernel or dilation wider than the window sees only the causal zero padding
    "kernel_size": Interval(int, 1, Ref("window_size")),
    "dilations": Custom(_dilations),
    "split": Options(SPLITS),
    "folds": Interval(int, 2, MAX_FOLDS),
    "split_seed/folds": Custom(_fold),
    "healthy_max_vb": Custom(_wear_bands),
    "positive": Options(POSITIVES),
    "threshold_method": Options(THRESHOLD_METHODS),
    "threshold_percentile": Interval(float, 0, 100, closed="neither", label="p"),
    "score_samples": Interval(int, 0, MAX_SCORE_SAMPLES),
    "detector": Options(DETECTORS),
    "combine": Custom(_combine),
    "conditional": Options(SWITCHES),
    "smoothing": Interval(float, 0, 1, closed="left", label="w"),
    "bootstrap": Interval(int, 0, MAX_BOOTSTRAP),
    "max_memory_gb": Interval(float, 0, None),
    "experiment": Custom(_experiment),
    "data": Custom(_data),
    "labels": Custom(_labels),
    "signals": Custom(_signals),
    "combine/signals": Custom(_combine_signals),
}


def validate(cfg: TrainConfig) -> None:
    """Check every parameter in CONSTRAINTS' order, then the memory estimate; raise a one-line
    MillvaeError naming the first bad one."""
    for name, constraint in CONSTRAINTS.items():
        message = constraint.error(name, cfg)
        if message is not None:
            raise MillvaeError(message)
    check_memory(cfg)


def check_memory(cfg: TrainConfig) -> None:
    """Refuse, before any data is loaded, a run whose estimated memory exceeds max_memory_gb
    (0: what this machine lets the process use)."""
    names = [s for s in cfg.signals.split(",") if s.strip()]
    n_signals = len(names) if cfg.signals.lower() not in ("all", "available") else 6
    est = estimate(cfg, n_signals)
    limit = cfg.max_memory_gb or available_gb()
    if est.total_gb > limit:
        source = f"max_memory_gb={cfg.max_memory_gb:g}" if cfg.max_memory_gb else "this machine"
        raise MillvaeError(
            f"memory: expected a configuration that fits in {limit:.1f} GB ({source}); this one "
            f"needs about {est.total_gb:.1f} GB (weights {est.weights_gb:.1f}, activations "
            f"{est.activations_gb:.1f}, data {est.data_gb:.1f}): lower batch_size, "
            "start_filter_no, kernel_size, dilations, codings_size or raise stride"
        )
