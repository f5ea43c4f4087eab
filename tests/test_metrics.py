"""Detection metrics against hand-computed cases and naive reference loops."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import auc

from millvae.detect import metrics as M
from millvae.errors import MillvaeError


def naive_seed_pr_auc(y, s, n=250):
    """Reference: one threshold at a time, as the seed's threshold.py describes it in prose —
    grid np.arange(min, max, |max-min|/n), positive when s >= t, points that would divide by
    zero skipped, trapezoid over (recall, precision)."""
    y = np.asarray(y, bool)
    s = np.asarray(s, float)
    lo, hi = s.min(), s.max()
    prec, rec = [], []
    for t in np.arange(lo, hi, abs(hi - lo) / n):
        pred = s >= t
        tp = int(np.sum(pred & y))
        fp = int(np.sum(pred & ~y))
        fn = int(np.sum(~pred & y))
        tn = int(np.sum(~pred & ~y))
        try:
            p, r, _ = tp / (tp + fp), tp / (tp + fn), fp / (fp + tn)
        except ZeroDivisionError:
            continue
        prec.append(p)
        rec.append(r)
    return auc(rec, prec)


def naive_f1(y, s, t):
    pred = np.asarray(s) >= t
    y = np.asarray(y, bool)
    tp, fp, fn = np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# ---------------------------------------------------------------- labels


def test_positive_labels_failed_and_worn():
    tc = np.array([0, 1, 2, 2, 0, 1])
    assert M.positive_labels(tc).tolist() == [False, False, True, True, False, False]
    assert M.positive_labels(tc, "failed").dtype == bool
    assert M.positive_labels(tc, "worn").tolist() == [False, True, True, True, False, True]
    assert M.positive_labels(np.array([], dtype=int)).shape == (0,)


@pytest.mark.parametrize(
    ("tc", "positive", "match"),
    [
        ([0, 1, 2], "degraded", "expected positive in"),
        ([0, 1, 3], "failed", "tool classes 0, 1, 2, got values"),
        ([0.0, np.nan, 2.0], "failed", "tool classes 0, 1, 2"),
        ([[0, 1], [2, 0]], "failed", "1-D"),
    ],
)
def test_positive_labels_errors(tc, positive, match):
    with pytest.raises(MillvaeError, match=match) as info:
        M.positive_labels(np.array(tc), positive)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(MillvaeError, match="as many labels as scores"):
        M.average_precision([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MillvaeError, match="finite scores, got 1 NaN"):
        M.roc_auc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(MillvaeError, match="binary labels"):
        M.seed_pr_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MillvaeError, match="n_thresholds"):
        M.seed_pr_auc([0, 1, 1], [0.1, 0.2, 0.3], n_thresholds=1)


# ---------------------------------------------------------------- AP and ROC-AUC


def test_ap_and_rocauc_by_hand():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    # ranked: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): AP = 0.5 * 1 + 0.5 * 2/3
    assert M.average_precision(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # positive > negative pairs: 0.8 beats both, 0.35 beats 0.1 -> 3 of 4
    assert M.roc_auc(y, s) == pytest.approx(0.75)


def test_perfect_and_random_scorers():
    rng = np.random.default_rng(0)
    y = rng.random(20000) < 0.1
    perfect = y + rng.random(len(y)) * 0.5
    assert M.average_precision(y, perfect) == 1.0
    assert M.roc_auc(y, perfect) == 1.0
    noise = rng.random(len(y))
    assert M.average_precision(y, noise) == pytest.approx(y.mean(), abs=0.02)
    assert M.roc_auc(y, noise) == pytest.approx(0.5, abs=0.02)


def test_ties_in_scores():
    # one tie of a positive and a negative: precision 1/2 at recall 1, half a pair won
    assert M.average_precision([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert M.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert M.seed_pr_auc([0, 1], [0.5, 0.5]) != M.seed_pr_auc([0, 1], [0.4, 0.5])


@pytest.mark.parametrize("fn", [M.average_precision, M.roc_auc, M.seed_pr_auc])
@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1, 1], []])
def test_one_class_is_nan(fn, y):
    s = np.linspace(0, 1, len(y))
    assert np.isnan(fn(y, s))


# ---------------------------------------------------------------- seed grid PR-AUC


def test_seed_prauc_perfect_scorer_by_hand():
    # grid arange(0, 3, 0.75) = 0, .75, 1.5, 2.25 -> (R, P) = (1, 1/2), (1, 2/3), (1, 1), (1/2, 1)
    # the curve stops at recall 1/2, so a perfect scorer gets 0.5, not 1
    assert len(np.arange(0.0, 3.0, 0.75)) == 4
    assert M.seed_pr_auc([0, 0, 1, 1], [0, 1, 2, 3], n_thresholds=4) == pytest.approx(0.5)


def test_seed_prauc_imperfect_scorer_by_hand():
    # (R, P) = (1, 1/2), (1, 2/3), (1/2, 1/2), (1/2, 1): one step from recall 1 to 1/2
    # with precision 2/3 -> 1/2: (2/3 + 1/2) / 2 * 1/2 = 7/24
    assert M.seed_pr_auc([0, 1, 0, 1], [0, 1, 2, 3], n_thresholds=4) == pytest.approx(7 / 24)


def test_seed_prauc_grid_is_arange_not_linspace():
    # 250 grid points below the max: the top negative and the positive just under it are never
    # separated, every point has recall 1 -> area 0 (a linspace grid would reach the max: 0.25)
    lo, hi = 0.0, 0.52
    assert len(np.arange(lo, hi, hi / 250)) == 250
    assert M.seed_pr_auc([0, 1, 0], [lo, 0.519, hi]) == pytest.approx(0.0)


def test_seed_prauc_grid_rounding_extra_point_kept():
    # arange yields 251 points here, the last a rounding error below the max: only the top
    # negative is predicted there -> point (0, 0) -> area (1/2 + 0) / 2 * 1 = 0.25
    lo, hi = 0.1, 0.63
    grid = np.arange(lo, hi, (hi - lo) / 250)
    assert len(grid) == 251 and grid[-1] < hi
    assert M.seed_pr_auc([0, 1, 0], [lo, 0.6285, hi]) == pytest.approx(0.25)


def test_seed_prauc_grid_rounding_extra_point_above_max_skipped():
    # 251 points, the last just above the max: nothing predicted, precision 0/0, the seed
    # skips it (not 0, not 1) -> every kept point has recall 1 -> area 0
    lo, hi = 0.1, 0.35
    grid = np.arange(lo, hi, (hi - lo) / 250)
    assert len(grid) == 251 and grid[-1] > hi
    assert M.seed_pr_auc([0, 1, 0], [lo, 0.3495, hi]) == pytest.approx(0.0)


def test_seed_prauc_matches_naive_loop():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(150):
        n = int(rng.integers(5, 120))
        y = rng.random(n) < rng.uniform(0.05, 0.5)
        s = rng.normal(size=n) * rng.choice([1e-3, 1.0, 1e3]) + y * rng.uniform(0, 2)
        if rng.random() < 0.3:
            s = np.round(s, 1)  # ties
        if y.all() or not y.any() or s.min() == s.max():
            continue
        assert M.seed_pr_auc(y, s) == pytest.approx(naive_seed_pr_auc(y, s), abs=1e-12)
        checked += 1
    assert checked > 100


def test_seed_prauc_random_scorer_near_prevalence_and_constant_scores_nan():
    rng = np.random.default_rng(1)
    y = rng.random(20000) < 0.07
    assert M.seed_pr_auc(y, rng.random(len(y))) == pytest.approx(0.07, abs=0.02)
    assert np.isnan(M.seed_pr_auc([0, 1, 0], [2.0, 2.0, 2.0]))


# ---------------------------------------------------------------- thresholds


def test_threshold_percentile_by_hand_and_errors():
    s = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    assert M.threshold_percentile(s, 50) == pytest.approx(3.0)
    # rank 0.99 * 4 = 3.96 between 4 and 5
    assert M.threshold_percentile(s) == pytest.approx(4.96)
    with pytest.raises(MillvaeError, match="non-empty"):
        M.threshold_percentile(np.array([]))
    with pytest.raises(MillvaeError, match="finite healthy scores"):
        M.threshold_percentile(np.array([1.0, np.nan]))
    with pytest.raises(MillvaeError, match="between 0 and 100"):
        M.threshold_percentile(s, 101)


def test_threshold_f1_by_hand():
    y = [0, 0, 1, 0, 1, 1]
    s = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # F1 at t = .1 .2 .3 .4 .5 .6: 6/9, 6/8, 6/7, 4/6, 4/5, 2/4 -> best at 0.3
    assert M.threshold_f1(y, s) == pytest.approx(0.3)
    assert M.precision_recall_f1(y, s, 0.3)[2] == pytest.approx(6 / 7)


def test_threshold_f1_ties():
    # equal F1 (2/3) at t = 1 and t = 4: the higher threshold wins
    assert M.threshold_f1([1, 0, 0, 1], [1.0, 2.0, 3.0, 4.0]) == 4.0
    # tied scores: t = 0.5 takes all three windows at 0.5 -> P 2/3, R 1, F1 0.8
    y, s = [0, 1, 1, 0], [0.2, 0.5, 0.5, 0.5]
    assert M.threshold_f1(y, s) == 0.5
    assert M.precision_recall_f1(y, s, 0.5) == pytest.approx((2 / 3, 1.0, 0.8))


def test_threshold_f1_edge_cases():
    assert np.isnan(M.threshold_f1([0, 0, 0], [0.1, 0.2, 0.3]))
    assert M.threshold_f1([1, 1, 1], [0.3, 0.1, 0.2]) == pytest.approx(0.1)


def test_threshold_f1_is_optimal_against_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(5, 80))
        y = rng.random(n) < 0.3
        if not y.any():
            continue
        s = np.round(rng.normal(size=n) + y, 1)
        t = M.threshold_f1(y, s)
        best = naive_f1(y, s, t)
        # any threshold, including ones between and beyond the scores, does no better
        trial = np.concatenate([s, (s[:-1] + s[1:]) / 2, [s.min() - 1, s.max() + 1]])
        assert best >= max(naive_f1(y, s, u) for u in trial) - 1e-12
        assert M.precision_recall_f1(y, s, t)[2] == pytest.approx(best)


def test_thresholds_see_only_the_arrays_they_are_given():
    # by signature: validation labels/scores (or healthy validation scores) and a level, nothing
    # else; by behaviour: pure (read-only inputs untouched, order-free, repeatable)
    assert list(inspect.signature(M.threshold_f1).parameters) == ["y_val", "s_val"]
    assert list(inspect.signature(M.threshold_percentile).parameters) == [
        "scores_healthy_val",
        "q",
    ]
    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.2
    s = rng.normal(size=300) + y
    y_ro, s_ro = y.copy(), s.copy()
    y_ro.setflags(write=False)
    s_ro.setflags(write=False)
    t1 = M.threshold_f1(y_ro, s_ro)
    p1 = M.threshold_percentile(s_ro[~y_ro], 99)
    np.testing.assert_array_equal(s_ro, s)
    perm = rng.permutation(len(y))
    assert M.threshold_f1(y[perm], s[perm]) == t1
    assert M.threshold_percentile(s[~y][rng.permutation((~y).sum())], 99) == p1
    assert M.threshold_f1(y, s) == t1


# ---------------------------------------------------------------- precision / recall / F1


def test_precision_recall_f1_by_hand():
    y = [0, 0, 1, 0, 1, 1]
    s = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # t = .35 -> predicted .4 .5 .6: tp 2, fp 1, fn 1
    assert M.precision_recall_f1(y, s, 0.35) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # s >= t: a window exactly at the threshold is positive
    assert M.precision_recall_f1([1, 0], [0.5, 0.5], 0.5) == pytest.approx((0.5, 1.0, 2 / 3))
    # nothing predicted, or nothing positive: 0/0 -> 0.0
    assert M.precision_recall_f1(y, s, 0.7) == (0.0, 0.0, 0.0)
    assert M.precision_recall_f1([0, 0], [0.1, 0.9], 0.5) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------- cut level


def test_cut_level_by_hand():
    scores = [0.9, 0.1, 0.2, 0.4, 0.6, 0.5]
    cuts = [3, 3, 1, 1, 1, 2]
    y = [1, 0, 0, 0, 0, 0]
    df = M.cut_level(scores, cuts, y, 0.5)
    assert list(df.columns) == ["cut_id", "y", "mean", "share", "n"]
    assert df["cut_id"].tolist() == [1, 2, 3]
    assert df["y"].tolist() == [False, False, True]
    assert df["mean"].tolist() == pytest.approx([0.4, 0.5, 0.5])
    assert df["share"].tolist() == pytest.approx([1 / 3, 1.0, 0.5])
    assert df["n"].tolist() == [3, 1, 2]
    with pytest.raises(MillvaeError, match="one cut id per window"):
        M.cut_level(scores, cuts[:-1], y, 0.5)


# ---------------------------------------------------------------- bootstrap


def _clustered(seed=0, n_cuts=30, per_cut=40):
    """Cuts whose windows share the cut's level: the windows are far from independent."""
    rng = np.random.default_rng(seed)
    cut_y = np.zeros(n_cuts, bool)
    cut_y[rng.choice(n_cuts, 6, replace=False)] = True
    level = rng.normal(size=n_cuts) + 1.0 * cut_y
    groups = np.repeat(np.arange(n_cuts), per_cut)
    y = np.repeat(cut_y, per_cut)
    s = level[groups] + 0.05 * rng.normal(size=len(groups))
    return y, s, groups


def test_bootstrap_groups_wider_than_windows_and_contains_estimate():
    y, s, groups = _clustered()
    point = M.average_precision(y, s)
    lo, hi = M.bootstrap_ci(M.average_precision, y, s, groups, n_boot=300, seed=0)
    wlo, whi = M.bootstrap_ci(M.average_precision, y, s, np.arange(len(y)), n_boot=300, seed=0)
    assert lo <= point <= hi
    assert wlo <= point <= whi
    # 40 near-copies per cut: resampling windows pretends there are 1200 independent samples
    assert (hi - lo) > 3 * (whi - wlo)


def test_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.array([7, 3, 11, 5, 9, 2]), [4, 2, 5, 3, 1, 6])
    s = rng.permutation(len(groups)).astype(float)  # unique scores identify windows
    y = np.isin(groups, [3, 5])
    seen = []

    def recording_metric(yb, sb):
        seen.append(sb.copy())
        return M.average_precision(yb, sb)

    M.bootstrap_ci(recording_metric, y, s, groups, n_boot=50, seed=1)
    assert len(seen) > 10
    varied = False
    for sb in seen:
        vals, counts = np.unique(sb, return_counts=True)
        count_of = dict(zip(vals, counts, strict=True))
        for g in np.unique(groups):
            drawn = {int(count_of.get(v, 0)) for v in s[groups == g]}
            # every window of a group appears as often as the group was drawn (0, 1, 2, ...)
            assert len(drawn) == 1
            varied |= drawn != {1}
    assert varied  # not the identity resample every time


def test_bootstrap_deterministic_and_degenerate_cases():
    y, s, groups = _clustered(seed=2)
    a = M.bootstrap_ci(M.average_precision, y, s, groups, n_boot=100, seed=7)
    b = M.bootstrap_ci(M.average_precision, y, s, groups, n_boot=100, seed=7)
    c = M.bootstrap_ci(M.average_precision, y, s, groups, n_boot=100, seed=8)
    assert a == b
    assert a != c
    # one class only: every resample skipped
    lo, hi = M.bootstrap_ci(M.average_precision, np.zeros(len(s), bool), s, groups, n_boot=50)
    assert np.isnan(lo) and np.isnan(hi)
    # fewer than 10 valid resamples
    assert all(np.isnan(M.bootstrap_ci(M.average_precision, y, s, groups, n_boot=5)))
    with pytest.raises(MillvaeError, match="one group per window"):
        M.bootstrap_ci(M.average_precision, y, s, groups[:-1])


# ---------------------------------------------------------------- conditions


def test_condition_subsets_names_and_masks():
    df = pd.DataFrame(
        {
            "DOC": np.array([1.5, 0.75, 0.75, 1.5, 0.75], dtype=np.float32),
            "feed": np.array([0.5, 0.25, 0.5, 0.25, 0.25], dtype=np.float32),
            "material": [1, 2, 2, 1, 1],
        },
        index=[10, 4, 99, 3, 7],  # a slice of a larger frame: masks are positional
    )
    sub = M.condition_subsets(df)
    assert set(sub) == {"doc0.75", "doc1.5", "feed0.25", "feed0.5", "castiron", "steel"}
    assert sub["doc0.75"].tolist() == [False, True, True, False, True]
    assert sub["doc1.5"].tolist() == [True, False, False, True, False]
    assert sub["feed0.25"].tolist() == [False, True, False, True, True]
    assert sub["feed0.5"].tolist() == [True, False, True, False, False]
    assert sub["castiron"].tolist() == [True, False, False, True, True]
    assert sub["steel"].tolist() == [False, True, True, False, False]
    assert all(m.dtype == bool for m in sub.values())
    # only values present
    assert set(M.condition_subsets(df.iloc[1:3])) == {"doc0.75", "feed0.25", "feed0.5", "steel"}
    with pytest.raises(MillvaeError, match="got no material"):
        M.condition_subsets(df.drop(columns="material"))


@pytest.mark.parametrize("decimals", [0, 1, 6])
def test_bootstrap_ap_fast_path_equals_generic_loop(decimals):
    # the vectorised AP resampling must give the generic loop's interval: same draws, same skips,
    # ties (rounded scores) handled as sklearn does
    rng = np.random.default_rng(decimals)
    for seed in range(6):
        n_cuts = int(rng.integers(3, 50))
        per = rng.integers(1, 30, size=n_cuts)
        groups = np.repeat(rng.permutation(n_cuts) * 3 + 1, per)
        y = np.repeat(rng.random(n_cuts) < 0.3, per)
        s = np.round(rng.normal(size=len(y)) + y, decimals)
        fast = M.bootstrap_ci(M.average_precision, y, s, groups, n_boot=150, seed=seed)
        slow = M.bootstrap_ci(lambda a, b: M.average_precision(a, b), y, s, groups, 150, seed)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
