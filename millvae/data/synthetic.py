"""Deterministic simulator of the UC Berkeley milling data, written in the real ``mill.mat`` layout.

The project's offline data source and the fixture of its tests. Each cut is a face-milling pass:
idle → the cutter engages the workpiece over about one cutter diameter of travel → steady cut →
exit (only at feed 0.5 mm/rev; at feed 0.25 the pass outlasts the 36 s record) → idle. Six sensor
signals follow the cutting load, which grows with depth of cut, feed, material and flank wear VB;
wear also adds spindle run-out, chatter, broadband noise and entry impacts, so a model of healthy
windows can tell worn ones apart. Levels, ripple frequencies and ADC steps follow the real file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import savemat

from millvae.errors import MillvaeError

SYNTHETIC_VERSION: int = 1

_FIELDS = (
    "case",
    "run",
    "VB",
    "time",
    "DOC",
    "feed",
    "material",
    "smcAC",
    "smcDC",
    "vib_table",
    "vib_spindle",
    "AE_table",
    "AE_spindle",
)
_SIGNALS = _FIELDS[7:]

# case -> (DOC mm, feed mm/rev, material 1 cast iron / 2 steel, cuts in the real file)
_CASES: dict[int, tuple[float, float, int, int]] = {
    1: (1.5, 0.5, 1, 17),
    2: (0.75, 0.5, 1, 14),
    3: (0.75, 0.25, 1, 14),
    4: (1.5, 0.25, 1, 7),
    5: (1.5, 0.5, 2, 6),
    6: (1.5, 0.25, 2, 1),
    7: (0.75, 0.25, 2, 8),
    8: (0.75, 0.5, 2, 6),
    9: (1.5, 0.5, 1, 9),
    10: (1.5, 0.25, 1, 10),
    11: (0.75, 0.25, 1, 23),
    12: (0.75, 0.5, 1, 15),
    13: (0.75, 0.25, 2, 15),
    14: (0.75, 0.5, 2, 9),
    15: (1.5, 0.25, 2, 7),
    16: (1.5, 0.5, 2, 6),
}
# The real file stores the cases in this order, not sorted.
_FILE_ORDER = (1, 2, 3, 4, 9, 10, 11, 12, 5, 6, 7, 8, 13, 14, 15, 16)
# The seven tools that fail in the real data plus case 3, so that both tools of one condition
# (cases 3 and 11) fail and failures come from first (1-8) and second (9-16) tools alike.
_FAILING_CASES = frozenset({3, 5, 9, 10, 11, 13, 14, 15})
# The real corrupted records are the first cuts of cases 2 and 12 (records 17 and 94).
_CORRUPT_CASES = (2, 12)

_FS_HZ = 250.0
_REF_SAMPLES = 9000  # event positions below are given for 9000 samples and scaled
_SPINDLE_HZ = 826.0 / 60.0  # 826 rev/min, six inserts
_N_HARMONICS = 8

# (ADC step, lowest code, highest code): values are multiples of the step like the real ones.
_ADC = {
    "smcAC": (10 / 4096, -4096, 4095),
    "smcDC": (20 / 4096, -2048, 2047),
    "vib_table": (10 / 4096, -4096, 4095),
    "vib_spindle": (5 / 4096, -2048, 2047),
    "AE_table": (2.5 / 4096, -2048, 2047),
    "AE_spindle": (2.5 / 4096, -2048, 2047),
}

_DESCRIPTION = "millvae synthetic milling simulator"
_MIN_SAMPLES = 512
_MAX_SAMPLES = 36_000
_FAIL_VB = 0.7


@dataclass(frozen=True)
class _CasePlan:
    """Per-cut metadata and events of one case (tool), independent of the record length."""

    case: int
    doc: float
    feed: float
    material: int
    runs: np.ndarray  # int
    times: np.ndarray  # int, minutes
    vb_true: np.ndarray  # smooth wear that drives the signals
    vb_label: np.ndarray  # measured VB, NaN where not measured
    entry: np.ndarray  # samples at the 9000-sample reference
    ramp_in: np.ndarray
    exit: np.ndarray  # inf where the pass outlasts the record
    ramp_out: np.ndarray


def _wear_shape(x: np.ndarray) -> np.ndarray:
    """Wear curve on x in [0, 1]: quick break-in, steady growth, accelerating end; g(1) = 1."""

    def g(v: np.ndarray) -> np.ndarray:
        return 0.1 * (1 - np.exp(-v / 0.08)) + 0.5 * v + 0.4 * v**5

    return g(x) / g(np.ones(1))


def _plan_case(seed: int, case: int) -> _CasePlan:
    doc, feed, material, n_cuts = _CASES[case]
    rng = np.random.default_rng(np.random.SeedSequence([seed, case, 0]))

    steps = rng.poisson(2.5 if feed == 0.5 else 4.0, n_cuts) + 1
    times = int(rng.integers(0, 4)) + np.concatenate([[0], np.cumsum(steps[1:])])
    runs = np.cumsum(1 + (rng.random(n_cuts) < 0.03))  # the real runs skip a number now and then
    runs[0] = 1
    x = (times - times[0]) / max(times[-1] - times[0], 1)
    shape = _wear_shape(x)

    vb0 = 0.0 if rng.random() < 0.65 else float(rng.uniform(0.03, 0.1))
    fails = case in _FAILING_CASES and n_cuts >= 3
    if fails:
        # The last k cuts reach 0.7 mm: pick the crossing cut, then the end wear that puts it there.
        k = min(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])), n_cuts - 2)
        while True:
            first_failed = n_cuts - k
            target = _FAIL_VB + float(rng.uniform(0.02, 0.07))
            end = vb0 + (target - vb0) / shape[first_failed]
            if end <= 1.6 or k == 1:
                break
            k -= 1
    else:
        end = float(rng.uniform(0.4, 0.64))
    vb_true = vb0 + (end - vb0) * shape

    label = np.round(vb_true + rng.normal(0.0, 0.015, n_cuts), 2)
    label[0] = round(vb0, 2)  # a new tool is measured at (or near) zero
    label = np.clip(label, 0.0, None)
    failed = np.zeros(n_cuts, bool)
    if fails:
        failed[first_failed:] = True
        label[failed] = np.maximum(label[failed], _FAIL_VB)
    label[~failed] = np.minimum(label[~failed], _FAIL_VB - 0.01)
    # About 12 % of the real VB values are missing, never on a case's last cut.
    missing = rng.random(n_cuts) < 0.13
    missing[-1] = False
    missing &= ~failed
    label[missing] = np.nan

    # Engagement takes about one cutter diameter of travel: twice as long at the lower feed.
    if feed == 0.5:
        entry = rng.uniform(900, 1600, n_cuts)
        ramp_in = rng.uniform(900, 1500, n_cuts)
        exit_ = rng.uniform(6300, 7700, n_cuts)
        ramp_out = rng.uniform(700, 1100, n_cuts)
    else:
        entry = rng.uniform(150, 1300, n_cuts)
        ramp_in = rng.uniform(2600, 3300, n_cuts)
        exit_ = np.full(n_cuts, np.inf)
        ramp_out = np.full(n_cuts, 1000.0)
    return _CasePlan(
        case, doc, feed, material, runs, times, vb_true, label, entry, ramp_in, exit_, ramp_out
    )


def _regions(plan: _CasePlan, n: int) -> np.ndarray:
    """True stable region [start, end) of each cut: full engagement, in samples of n."""
    scale = n / _REF_SAMPLES
    start = np.round((plan.entry + plan.ramp_in) * scale).astype(np.int64)
    end = np.where(np.isinf(plan.exit), n, np.round(np.minimum(plan.exit, 1e9) * scale))
    end = np.minimum(end.astype(np.int64), n)
    start = np.minimum(start, end - 64)  # at least one 64-sample window, even for short records
    return np.stack([start, end], axis=1)


_COL = np.s_[:, None]  # index that turns a per-cut (m,) array into an (m, 1) column


@dataclass(frozen=True)
class _Pass:
    """What every signal step of one case shares: its random stream, time axes and conditions."""

    rng: np.random.Generator
    m: int  # cuts
    n: int  # samples per cut
    t: np.ndarray  # (n,) seconds
    idx: np.ndarray  # (1, n) sample numbers
    vb: np.ndarray  # (m,) true flank wear, mm
    steel: bool
    d_rel: float  # depth of cut relative to 0.75 mm
    f_rel: float  # feed relative to 0.25 mm/rev

    @classmethod
    def of(cls, seed: int, plan: _CasePlan, n: int) -> _Pass:
        """The pass of ``plan``'s cuts over ``n`` samples, with the case's own signal stream."""
        return cls(
            rng=np.random.default_rng(np.random.SeedSequence([seed, plan.case, 1])),
            m=len(plan.runs),
            n=n,
            t=np.arange(n) / _FS_HZ,
            idx=np.arange(n)[None, :],
            vb=plan.vb_true,
            steel=plan.material == 2,
            d_rel=plan.doc / 0.75,
            f_rel=plan.feed / 0.25,
        )

    def noise(self, sd: np.ndarray | float) -> np.ndarray:
        """Fresh white noise of standard deviation ``sd`` on every (cut, sample)."""
        return self.rng.standard_normal((self.m, self.n)) * sd


def _signals(seed: int, plan: _CasePlan, n: int) -> dict[str, np.ndarray]:
    """Six (cuts, n) signal arrays of one case, before ADC quantisation."""
    p = _Pass.of(seed, plan, n)
    # The steps share one generator, so their order fixes every draw: reordering them changes
    # all signals of every seed, which would call for a new SYNTHETIC_VERSION.
    e = _engagement(p, plan)
    drift = 1.0 + p.rng.normal(0.0, 0.03, p.m)[_COL] * (p.idx / n)  # slow heating over the pass
    load = _cutting_load(p)
    once_per_rev, vib_wave, ae_wave = _spindle_harmonics(p, load)
    chatter = _chatter(p)
    impact, impact_gain = _entry_impact(p, plan)
    smc_dc, smc_ac = _motor_current(p, e, load, drift, once_per_rev)
    vib_table, vib_spindle = _vibration(p, e, vib_wave, chatter, impact, impact_gain)
    ae_table, ae_spindle = _acoustic_emission(p, e, ae_wave, chatter, impact, impact_gain)
    return {
        "smcAC": smc_ac,
        "smcDC": smc_dc,
        "vib_table": vib_table,
        "vib_spindle": vib_spindle,
        "AE_table": ae_table,
        "AE_spindle": ae_spindle,
    }


def _engagement(p: _Pass, plan: _CasePlan) -> np.ndarray:
    """(m, n) engagement in [0, 1]: how much of the cutter is in the workpiece."""
    scale = p.n / _REF_SAMPLES
    entry, ramp_in = plan.entry * scale, plan.ramp_in * scale
    # Concave rise as the cutter arc fills, convex fall as it leaves at the exit.
    s = np.clip((p.idx - entry[_COL]) / ramp_in[_COL], 0.0, 1.0)
    e = 1.0 - (1.0 - s) ** 2
    exit_ = np.where(np.isinf(plan.exit), 2.0 * p.n, plan.exit * scale)
    u = np.clip((p.idx - exit_[_COL]) / (plan.ramp_out * scale)[_COL], 0.0, 1.0)
    e *= (1.0 - u) ** 2
    return e


def _cutting_load(p: _Pass) -> np.ndarray:
    """(m,) cutting load above idle, in smcDC volts: grows with DOC, feed, steel and flank wear."""
    tool = p.rng.normal(1.0, 0.06)  # tools differ a little even when new
    wear_gain = 2.1 * p.rng.uniform(0.8, 1.25)
    return (
        2.35
        * p.d_rel**0.9
        * p.f_rel**0.5
        * (1.12 if p.steel else 1.0)
        * tool
        * p.rng.normal(1.0, 0.03, p.m)
        * (1.0 + wear_gain * p.vb)
    )


def _spindle_harmonics(p: _Pass, load: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spindle harmonics: the (m, n) once-per-rev sine, vibration wave and AE wave.

    Vibration and AE share the harmonics' phases: one excitation heard by several sensors.
    """
    # A heavier load slows the spindle slightly.
    f_sp = _SPINDLE_HZ * (1.0 + p.rng.normal(0.0, 0.004, p.m)) * (1.0 - 0.002 * load)
    phases = p.rng.uniform(0.0, 2 * np.pi, (p.m, _N_HARMONICS))
    harm = np.stack(
        [
            np.sin(2 * np.pi * (k + 1) * f_sp[_COL] * p.t[None, :] + phases[:, k, None])
            for k in range(_N_HARMONICS)
        ]
    )  # (K, m, n)
    base_profile = p.rng.dirichlet(np.full(_N_HARMONICS, 1.5))
    base_profile[5] += 0.4  # tooth passing: six inserts
    base_profile /= np.linalg.norm(base_profile)
    runout = np.zeros(_N_HARMONICS)
    runout[:2] = (0.25, 0.12)  # one worn insert cuts more: once- and twice-per-rev components grow
    vib_amp = 0.28 * base_profile[None, :] + p.vb[_COL] * runout[None, :]  # (m, K)
    ae_profile = p.rng.dirichlet(np.full(_N_HARMONICS, 1.0))
    ae_profile /= np.linalg.norm(ae_profile)
    vib_wave = np.einsum("mk,kmn->mn", vib_amp, harm)
    ae_wave = np.einsum("k,kmn->mn", 0.25 * ae_profile, harm)
    return harm[0], vib_wave, ae_wave


def _chatter(p: _Pass) -> np.ndarray:
    """(m, n) chatter of a worn tool between spindle harmonics, growing past VB ~ 0.4."""
    f_ch = p.rng.choice([p.rng.uniform(31.0, 38.0), p.rng.uniform(45.0, 52.0)])
    amp = 0.25 * np.clip((p.vb - 0.4) / 0.4, 0.0, 1.5) ** 1.5
    return amp[_COL] * np.sin(
        2 * np.pi * f_ch * (1.0 + p.rng.normal(0.0, 0.01, p.m))[_COL] * p.t[None, :]
        + p.rng.uniform(0.0, 2 * np.pi, p.m)[_COL]
    )


def _entry_impact(p: _Pass, plan: _CasePlan) -> tuple[np.ndarray, np.ndarray]:
    """(m, n) impact of the edge on first contact, decaying within the entry ramp; (m,) gain.

    The gain grows with wear: a worn edge hits harder, steel harder than cast iron.
    """
    entry = plan.entry * (p.n / _REF_SAMPLES)
    since_entry = np.maximum(p.idx - entry[_COL], 0.0) / _FS_HZ  # seconds after first contact
    engaged = p.idx >= entry[_COL]
    impact = np.where(engaged, np.exp(-since_entry / p.rng.uniform(0.6, 1.2, p.m)[_COL]), 0.0)
    gain = (0.3 + 2.5 * p.vb**2) * (1.6 if p.steel else 0.8)
    return impact, gain


def _motor_current(
    p: _Pass, e: np.ndarray, load: np.ndarray, drift: np.ndarray, once_per_rev: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """smcDC and smcAC, the spindle motor's DC and AC current, (m, n) each."""
    # smcDC: idle 1.37 V; the steady level follows the load with a slow 2-3 Hz ripple.
    ripple = (0.03 * load)[_COL] * np.sin(
        2 * np.pi * p.rng.uniform(2.0, 2.8, p.m)[_COL] * p.t[None, :]
        + p.rng.uniform(0, 2 * np.pi, p.m)[_COL]
    )
    dc_load = e * (load[_COL] * drift + ripple + (0.02 * load)[_COL] * once_per_rev)
    smc_dc = 1.37 + dc_load + p.noise(0.02 + 0.006 * load[_COL] * e)

    # smcAC: a 12-14 Hz current whose amplitude follows the DC current, its frequency wandering.
    f_ac = p.rng.uniform(12.3, 13.9, p.m)[_COL] * (
        1.0 + 0.003 * np.sin(2 * np.pi * 0.05 * p.t[None, :])
    )
    phi = 2 * np.pi * np.cumsum(f_ac, axis=1) / _FS_HZ + p.rng.uniform(0, 2 * np.pi, p.m)[_COL]
    ac_amp = 0.48 + 0.354 * dc_load
    smc_ac = (
        -0.17
        + ac_amp * (np.sin(phi) + 0.06 * np.sin(3 * phi + 1.0))
        + p.noise(0.05 + 0.04 * ac_amp * (1.0 + p.vb[_COL]))
    )
    return smc_dc, smc_ac


def _vibration(
    p: _Pass,
    e: np.ndarray,
    vib_wave: np.ndarray,
    chatter: np.ndarray,
    impact: np.ndarray,
    impact_gain: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """vib_table and vib_spindle, (m, n) each: one forced vibration heard by two sensors."""
    # vib_table: level falls with wear on cast iron and rises on steel, as in the real cases.
    vib_base = (
        (0.65 * p.d_rel**0.3 * p.f_rel**0.15 if p.steel else 1.0 * p.d_rel**0.6 * p.f_rel**0.25)
        * p.rng.lognormal(0.0, 0.25)
        * p.rng.lognormal(0.0, 0.12, p.m)
    )
    vib_level = vib_base * np.maximum(0.3, 1.0 + (0.5 if p.steel else -1.0) * p.vb)
    vib_shape = vib_wave + p.noise(0.05 * (1.0 + p.vb[_COL]))
    # Chatter rides on the unworn level: a blunt edge damps the forced vibration, not the chatter.
    vib_table = (
        0.07
        + p.rng.uniform(0.0, 0.04)
        + np.sqrt(e) * (vib_level[_COL] * (1.0 + vib_shape) + vib_base[_COL] * chatter)
        + (impact * impact_gain[_COL] * vib_level[_COL])
        + p.noise(0.005)
    )
    vib_table = np.abs(vib_table)  # the channel is rectified: never below zero

    # vib_spindle: small rise over the 0.28 V idle, same excitation, spikes on worn-edge impacts;
    # the sensor sits near the tool, so it hears chatter well.
    spindle_rise = (
        0.03
        * p.d_rel**0.5
        * p.f_rel**0.7
        * p.rng.lognormal(0.0, 0.7)
        * np.maximum(0.25, 1.0 - 1.2 * p.vb)
        * p.rng.lognormal(0.0, 0.1, p.m)
    )
    vib_spindle = (
        0.28
        + e * (spindle_rise[_COL] * (1.0 + 1.3 * vib_shape) + 0.1 * chatter)
        # Worn tools read below idle, as in the data.
        - e * (0.02 * np.clip(p.vb / 0.6, 0.0, 1.0))[_COL]
        + impact**8 * (0.05 + 1.5 * p.vb**2 * (1.0 if p.steel else 0.4))[_COL]
        + p.noise(0.011)
    )
    return vib_table, vib_spindle


def _acoustic_emission(
    p: _Pass,
    e: np.ndarray,
    ae_wave: np.ndarray,
    chatter: np.ndarray,
    impact: np.ndarray,
    impact_gain: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """AE_table and AE_spindle, (m, n) each: spiky, right-skewed rises over the 0.1 V idle."""
    # The rise grows with load and wear, and is quieter on steel.
    ae_rise = (
        (0.015 * (p.d_rel * p.f_rel) ** 1.3 if p.steel else 0.04 * p.d_rel**0.7 * p.f_rel**0.5)
        * p.rng.lognormal(0.0, 0.15)
        * p.rng.lognormal(0.0, 0.08, p.m)
        * (1.0 + 3.0 * p.vb)
    )
    # Half-normal bursts, mean removed: AE is positive and right-skewed around its level.
    bursts = (np.abs(p.noise(1.0)) - 0.8) * (0.25 + 0.15 * p.vb[_COL])
    ae_common = e * ae_rise[_COL] * (1.0 + ae_wave + 0.5 * chatter + bursts)
    ae_impact = impact * (impact_gain * ae_rise * 2.0)[_COL]
    ae_table = 0.1 + ae_common + ae_impact + p.noise(0.008 + 0.1 * ae_rise[_COL] * e)
    # The spindle AE sensor sees the same events a little louder and climbs over the pass.
    climb = 1.0 + p.rng.uniform(0.0, 0.3, p.m)[_COL] * (p.idx / p.n)
    ae_spindle = (
        0.1
        + p.rng.uniform(0.95, 1.3) * ae_common * climb
        + 0.8 * ae_impact
        + p.noise(0.008 + 0.12 * ae_rise[_COL] * e)
    )
    return ae_table, ae_spindle


def _adc(name: str, x: np.ndarray) -> np.ndarray:
    step, low, high = _ADC[name]
    return np.clip(np.round(x / step), low, high) * step


def _meta(value: float) -> np.ndarray:
    """A (1, 1) value typed as loadmat shows MATLAB's compact storage: integers as uint8/uint16."""
    if np.isfinite(value) and float(value).is_integer() and 0 <= value <= 65535:
        return np.array([[int(value)]], dtype=np.uint8 if value <= 255 else np.uint16)
    return np.array([[float(value)]], dtype=np.float64)


def _garbage_records(seed: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two broken records like the real 17 (mostly sane, sprinkled with junk) and 94 (long junk)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 99, 2]))
    sprinkled, long_junk = {}, {}
    n_long = round(n * 15360 / _REF_SAMPLES)
    for name in _SIGNALS:
        x = rng.normal(1.0, 0.5, n)
        bad = rng.random(n) < 0.04
        x[bad] = rng.choice([-1.0, 1.0], bad.sum()) * 10.0 ** rng.uniform(-40, 34, bad.sum())
        x[rng.choice(n, 4, replace=False)] = [np.nan, np.inf, -np.inf, 1e30]
        sprinkled[name] = x
        long_junk[name] = 10.0 ** rng.uniform(-33, 3.4, n_long)
    return sprinkled, long_junk


def _check_args(seed: int, n_samples: int, cases: Sequence[int] | None) -> tuple[int, ...]:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise MillvaeError(f"seed: expected a non-negative integer, got {seed!r}")
    if (
        isinstance(n_samples, bool)
        or not isinstance(n_samples, int | np.integer)
        or not _MIN_SAMPLES <= n_samples <= _MAX_SAMPLES
    ):
        raise MillvaeError(
            f"n_samples: expected an integer in [{_MIN_SAMPLES}, {_MAX_SAMPLES}], got {n_samples!r}"
        )
    if cases is None:
        return _FILE_ORDER
    wanted = list(cases)
    unknown = [
        c
        for c in wanted
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or c not in _CASES
    ]
    if not wanted or unknown or len(set(wanted)) != len(wanted):
        raise MillvaeError(
            f"cases: expected distinct case numbers from 1 to 16, got {list(cases)!r}"
        )
    return tuple(c for c in _FILE_ORDER if c in set(wanted))


def _corrupt_targets(plans: list[_CasePlan]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(plan index, cut index) of the records to break: first cuts of cases 2 and 12 if present."""
    firsts = [(i, 0) for i, p in enumerate(plans)]
    preferred = [(i, 0) for i, p in enumerate(plans) if p.case in _CORRUPT_CASES]
    chosen = preferred + [f for f in firsts if f not in preferred]
    if len(chosen) < 2:  # a single case: break its first two cuts
        chosen = [(0, 0), (0, 1)] if len(plans[0].runs) >= 2 else []
    if len(chosen) < 2:
        raise MillvaeError(
            "corrupt_records: expected at least two cuts to corrupt, got a single cut"
        )
    return chosen[0], chosen[1]


def write_synthetic_mat(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    n_samples: int = 9000,
    cases: Sequence[int] | None = None,
    corrupt_records: bool = False,
) -> Path:
    """Write a simulated ``mill.mat`` (real struct layout) to ``path`` atomically; return the path.

    Besides ``mill`` the file holds ``millvae_synthetic`` (a description naming version and seed)
    and ``millvae_regions`` ((N, 2) int64: each record's true stable-cut [start, end) in samples;
    (0, 0) for corrupted records). A case's records are the same whichever other cases are chosen.
    With ``corrupt_records`` the first cuts of cases 2 and 12 (as in the real file; other first
    cuts when those cases are not chosen) are replaced by garbage, the second one 15360/9000 times
    longer.
    """
    order = _check_args(seed, n_samples, cases)
    seed, n = int(seed), int(n_samples)
    plans = [_plan_case(seed, c) for c in order]

    records: list[tuple[np.ndarray, ...]] = []
    regions: list[np.ndarray] = []
    broken = _corrupt_targets(plans) if corrupt_records else ()
    junk = _garbage_records(seed, n) if corrupt_records else ({}, {})
    for i, plan in enumerate(plans):
        raw = _signals(seed, plan, n)
        signals = {k: _adc(k, v) for k, v in raw.items()}
        case_regions = _regions(plan, n)
        for j in range(len(plan.runs)):
            cut = {k: v[j] for k, v in signals.items()}
            region = case_regions[j]
            if (i, j) in broken:
                cut = junk[broken.index((i, j))]
                region = np.zeros(2, np.int64)
            meta = (
                plan.case,
                plan.runs[j],
                plan.vb_label[j],
                plan.times[j],
                plan.doc,
                plan.feed,
                plan.material,
            )
            records.append(
                tuple(_meta(v) for v in meta)
                + tuple(cut[k].reshape(-1, 1).astype(np.float64) for k in _SIGNALS)
            )
            regions.append(region)

    mill = np.empty((1, len(records)), dtype=[(f, object) for f in _FIELDS])
    for j, rec in enumerate(records):
        mill[0, j] = rec
    content = {
        "mill": mill,
        "millvae_synthetic": f"{_DESCRIPTION} v{SYNTHETIC_VERSION}, seed={seed}",
        "millvae_regions": np.stack(regions).astype(np.int64),
    }
    return _write_atomic(Path(path), content)


def _write_atomic(path: Path, content: dict) -> Path:
    """savemat into a temp file beside ``path``, then rename: readers never see half a file."""
    if not path.parent.is_dir():
        raise MillvaeError(f"path: expected a file in an existing folder, got {str(path)!r}")
    # A fresh name opened with "xb" (not mkstemp) so the file gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            savemat(f, content, format="5", do_compression=False, oned_as="column")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
