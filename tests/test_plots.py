"""The run figures: each writes a PNG that opens, for normal and edge inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from millvae.detect import plots
from millvae.errors import MillvaeError

SIGNALS = ("smcAC", "smcDC", "vib_table", "vib_spindle", "AE_table", "AE_spindle")


def _png(path, width=(500, 2000), height=(250, 2000)) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 2_000
    img = imread(path)
    h, w = img.shape[:2]
    assert width[0] <= w <= width[1], f"width {w}"
    assert height[0] <= h <= height[1], f"height {h}"
    assert img[..., :3].std() > 0.02  # not a blank canvas
    return img


def _tinted(img: np.ndarray, rgb: tuple[int, int, int], alpha: float) -> int:
    """Pixels of `rgb` blended at `alpha` over white (the class shading of case_trends)."""
    want = 1.0 - alpha * (1.0 - np.asarray(rgb) / 255.0)
    return int((np.abs(img[..., :3] - want) < 0.02).all(axis=-1).sum())


def _windows(cases: int, cuts_per_case: int = 6, per_cut: int = 12, seed: int = 0):
    """Fake window table + a score that grows with wear, as the prepared data would give it."""
    rng = np.random.default_rng(seed)
    rows = []
    cut_no = 0
    for case in range(1, cases + 1):
        for run in range(1, cuts_per_case + 1):
            cls = 0 if run <= cuts_per_case // 2 else (1 if run < cuts_per_case else 2)
            split = ("train", "val", "test")[case % 3]
            rows += [(case, cut_no, run, cls, split)] * per_cut
            cut_no += 1
    w = pd.DataFrame(rows, columns=["case", "cut_no", "run", "tool_class", "split"])
    score = np.exp(rng.normal(-6, 0.4, len(w)) + 1.5 * w["tool_class"].to_numpy())
    return w, score


def _curves(n=400, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("val", "test"):
        y = rng.random(n) < 0.1
        out[split] = {
            "mse": (y, rng.normal(0, 1, n) + 1.5 * y),
            "kl": (y, rng.normal(0, 1, n) + 2.5 * y),
            "mse_cond": (y, rng.normal(0, 1, n) + 2.0 * y),
            "kl_cond": (y, rng.normal(0, 1, n) + 3.0 * y),
        }
    return out


def test_pr_roc_curves_two_splits(tmp_path):
    path = plots.pr_roc_curves(_curves(), tmp_path / "sub" / "pr_roc.png", title="run · seed")
    assert path == tmp_path / "sub" / "pr_roc.png"
    _png(path, width=(900, 1400), height=(850, 1300))


def test_pr_roc_curves_edge_cases(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.2
    s = rng.normal(size=200) + y
    s[:10] = np.nan  # NaN scores are dropped, not fatal
    one = plots.pr_roc_curves({"test": {"kl": (y, s)}}, tmp_path / "one.png")
    _png(one, width=(900, 1400), height=(400, 700))
    # validation without a failed window: AP undefined there, the figure still comes
    no_pos = {"val": {"kl": (np.zeros(50, bool), rng.normal(size=50))}, "test": {"kl": (y, s)}}
    _png(plots.pr_roc_curves(no_pos, tmp_path / "nopos.png"), height=(850, 1300))
    _png(plots.pr_roc_curves({}, tmp_path / "empty.png"), width=(400, 1000), height=(150, 500))
    with pytest.raises(MillvaeError, match="same length"):
        plots.pr_roc_curves({"val": {"kl": (y, s[:-1])}}, tmp_path / "bad.png")


def test_score_distributions_four_scores(tmp_path):
    w, mse = _windows(4)
    tc = w["tool_class"].to_numpy()
    rng = np.random.default_rng(2)
    scores = pd.DataFrame(
        {
            "mse": mse,
            "kl": 5 + 10 * tc + rng.normal(0, 2, len(tc)),
            "mse_cond": rng.normal(0, 1, len(tc)) + tc,
            "kl_cond": rng.normal(0, 1, len(tc)) + 2 * tc,
        }
    )
    thr = {"mse": float(np.percentile(mse, 95)), "kl": 22.0, "kl_cond": 2.0}
    path = plots.score_distributions(scores, tc, thr, tmp_path / "dist.png", title="test")
    _png(path, width=(1300, 1800), height=(350, 600))
    # positive scores over decades go on a log axis; z-scores and narrow ranges do not
    assert plots._use_log(scores["mse"].to_numpy())
    assert not plots._use_log(scores["kl_cond"].to_numpy())
    assert not plots._use_log(scores["kl"].to_numpy())


def test_score_distributions_edge_cases(tmp_path):
    rng = np.random.default_rng(3)
    tc = np.array([0] * 40 + [1] * 30)  # no failed window in this split
    kl = rng.gamma(2.0, 3.0, tc.size)
    kl[::7] = np.nan
    one = pd.DataFrame({"kl": kl})
    _png(plots.score_distributions(one, tc, {"kl": 9.0}, tmp_path / "one.png"), width=(500, 800))
    # a class with a single window or constant scores cannot have a density: points instead
    tc2 = np.array([0] * 20 + [1] * 20 + [2])
    flat = pd.DataFrame({"mse": np.r_[np.full(20, 0.01), rng.random(20), [0.5]]})
    _png(plots.score_distributions(flat, tc2, {}, tmp_path / "flat.png"), width=(500, 800))
    with pytest.raises(MillvaeError, match="one tool class per score row"):
        plots.score_distributions(one, tc[:-1], {}, tmp_path / "bad.png")


def test_case_trends_sixteen_cases(tmp_path):
    w, score = _windows(16)
    thr = float(np.percentile(score, 90))
    path = plots.case_trends(w, score, thr, tmp_path / "trend.png", score_name="mse")
    _png(path, width=(1300, 1700), height=(1000, 1400))


def test_case_trends_one_case_and_nans(tmp_path):
    w, score = _windows(1, cuts_per_case=1)
    score[::3] = np.nan
    path = plots.case_trends(w, score, 0.01, tmp_path / "one.png", score_name="kl", title="kl")
    _png(path, width=(500, 900), height=(250, 600))
    with pytest.raises(MillvaeError, match="one score per window"):
        plots.case_trends(w, score[:-1], 0.01, tmp_path / "bad.png")
    with pytest.raises(MillvaeError, match="missing"):
        plots.case_trends(w.drop(columns="run"), score, 0.01, tmp_path / "bad.png")
    all_nan = plots.case_trends(w, np.full(len(w), np.nan), None, tmp_path / "nan.png")
    _png(all_nan, width=(400, 1000), height=(150, 500))


def test_case_trends_shading_follows_tool_class(tmp_path):
    """The red shading appears where a cut failed and nowhere else."""
    w, score = _windows(2, cuts_per_case=4)
    red = tuple(int(plots.CLASS_COLORS[2][i : i + 2], 16) for i in (1, 3, 5))
    with_failed = imread(plots.case_trends(w, score, 0.01, tmp_path / "a.png"))
    healthy = w.assign(tool_class=0)
    without = imread(plots.case_trends(healthy, score, 0.01, tmp_path / "b.png"))
    assert _tinted(with_failed, red, 0.16) > 2_000
    assert _tinted(without, red, 0.16) < 50


@pytest.mark.parametrize("n_signals", [1, 6])
def test_reconstruction_examples(tmp_path, n_signals):
    rng = np.random.default_rng(4)
    t = np.linspace(0, 6 * np.pi, 64)[:, None]
    names = SIGNALS[:n_signals]
    examples = {}
    for k, cls in enumerate(("healthy", "degraded", "failed")):
        win = 0.5 + 0.2 * np.sin(t + np.arange(n_signals)) + rng.normal(0, 0.02, (64, n_signals))
        examples[cls] = (win, win + rng.normal(0, 0.01 * (1 + 3 * k), win.shape))
    path = plots.reconstruction_examples(examples, names, tmp_path / "rec.png", title="test")
    lo, hi = (350, 700) if n_signals == 1 else (1100, 1500)
    _png(path, width=(1000, 1400), height=(lo, hi))


def test_reconstruction_examples_edge_cases(tmp_path):
    rng = np.random.default_rng(5)
    win = rng.random((64, 2))
    # no failed window in the split, and a window passed with its batch axis
    only = {"healthy": (win, win * 0.9), "degraded": (win[None], win[None] * 1.1)}
    path = plots.reconstruction_examples(only, ["smcAC", "vib_table"], tmp_path / "two.png")
    _png(path, width=(600, 1000))
    _png(plots.reconstruction_examples({}, ["smcAC"], tmp_path / "none.png"), width=(400, 1000))
    with pytest.raises(MillvaeError, match=r"\[window, 3\]"):
        plots.reconstruction_examples({"failed": (win, win)}, SIGNALS[:3], tmp_path / "bad.png")


def test_no_pyplot_figure_is_left_open(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    w, score = _windows(2)
    plots.case_trends(w, score, 0.01, tmp_path / "t.png")
    plots.pr_roc_curves(_curves(50), tmp_path / "p.png")
    assert plt.get_fignums() == before
