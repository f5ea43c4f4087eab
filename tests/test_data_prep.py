"""Loader and data preparation: real fixture files, exact seed counts, vectorised windowing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.io

from millvae import SIGNAL_NAMES
from millvae.config import make_config
from millvae.data.mat import load_mill
from millvae.data.prepare import Prepared, prepare, why_no_detection
from millvae.data.windows import (
    MinMaxScaler,
    cut_windows,
    interpolate_flank_wear,
    read_labels,
    split_cases,
    tool_class,
    window_starts,
)
from millvae.errors import MillvaeError


def test_loader_reads_the_real_two_cut_fixture_with_all_six_signals(fixture2):
    mill = load_mill(fixture2)
    assert mill.signal_names == SIGNAL_NAMES
    assert mill.signals.shape == (2, 9000, 6) and mill.signals.dtype == np.float32
    raw = scipy.io.loadmat(fixture2)["mill"][0]
    for j, name in enumerate(SIGNAL_NAMES):
        np.testing.assert_allclose(mill.signals[1, :, j], raw[1][name].ravel(), rtol=1e-6)
    assert list(mill.cuts.index) == [0, 1]
    assert mill.cuts.loc[0, ["case", "run", "DOC", "feed", "material"]].tolist() == [
        1,
        1,
        1.5,
        0.5,
        1,
    ]
    assert mill.cuts.loc[0, "VB"] == 0 and np.isnan(mill.cuts.loc[1, "VB"])
    assert not mill.synthetic and not mill.dropped


def test_loader_subset_and_order_of_signals(fixture2):
    mill = load_mill(fixture2, "vib_spindle,smcAC")
    assert mill.signal_names == ("vib_spindle", "smcAC") and mill.signals.shape == (2, 9000, 2)
    full = load_mill(fixture2)
    np.testing.assert_array_equal(mill.signals[..., 1], full.signals[..., 0])


def test_five_signal_file_works_with_its_five_and_names_the_missing_one(real5):
    with pytest.raises(MillvaeError) as err:
        load_mill(real5)
    msg = str(err.value)
    assert "AE_spindle" in msg and "smcAC, smcDC, vib_table, vib_spindle, AE_table" in msg
    assert "\n" not in msg
    with pytest.warns(UserWarning, match=r"dropped corrupted records \[17, 94\]"):
        mill = load_mill(real5, "available")
    assert mill.signal_names == SIGNAL_NAMES[:5]
    assert sorted(mill.dropped) == [17, 94] and mill.signals.shape == (165, 9000, 5)
    assert "15360 samples" in mill.dropped[94] and "absurd" in mill.dropped[17]


def test_bad_files(tmp_path):
    text = tmp_path / "notes.mat"
    text.write_text("this is not a MAT file\n" * 20)
    with pytest.raises(MillvaeError, match="not one"):
        load_mill(text)
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"foo": np.zeros(3)})
    with pytest.raises(MillvaeError, match=r"expected a variable 'mill'.*found foo"):
        load_mill(other)
    with pytest.raises(MillvaeError, match="no such file"):
        load_mill(tmp_path / "missing.mat")


def test_flank_wear_interpolation_and_tool_class_by_hand():
    cuts = pd.DataFrame(
        {
            "case": [1, 1, 1, 1, 2, 2, 2],
            "run": [1, 2, 3, 4, 3, 1, 2],  # case 2 out of run order on purpose
            "VB": [0.1, np.nan, 0.3, np.nan, 0.9, np.nan, np.nan],
        }
    )
    vb = interpolate_flank_wear(cuts)
    np.testing.assert_allclose(vb, [0.1, 0.2, 0.3, 0.3, 0.9, 0.0, 0.45])
    np.testing.assert_array_equal(tool_class(vb), [0, 1, 1, 1, 2, 0, 1])
    np.testing.assert_array_equal(tool_class([0.19, 0.2, 0.69, 0.7], 0.2, 0.7), [0, 1, 1, 2])


def test_computed_tool_classes_match_the_seed_labels(real5, labels_csv):
    with pytest.warns(UserWarning):
        mill = load_mill(real5, "available")
    labels = read_labels(labels_csv)
    ours = tool_class(interpolate_flank_wear(mill.cuts))
    np.testing.assert_array_equal(ours, labels.loc[mill.cuts.index, "tool_class"].to_numpy())


def _naive_windows(signals, regions, w, stride):
    out, rows = [], []
    for i, (a, b) in enumerate(regions):
        for s in range(a, b - w + 1, stride):
            out.append(signals[i, s : s + w, :])
            rows.append(i)
    return np.array(out), np.array(rows)


@pytest.mark.parametrize(("w", "stride"), [(64, 64), (64, 32), (32, 48), (16, 7)])
def test_vectorised_windowing_equals_a_naive_loop(w, stride):
    rng = np.random.default_rng(0)
    signals = rng.normal(size=(9, 500, 3)).astype(np.float32)
    starts = rng.integers(0, 200, size=9)
    regions = np.stack([starts, np.minimum(500, starts + rng.integers(0, 300, size=9))], axis=1)
    regions[0] = [10, 10 + w - 1]  # too short for one window
    rows, st = window_starts(regions, w, stride)
    got = cut_windows(signals, rows, st, w)
    want, want_rows = _naive_windows(signals, regions, w, stride)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(got, want)


def test_scaler_maps_training_range_to_unit_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8, 3)) * [1, 10, 100] + [0, 5, -50]
    sc = MinMaxScaler.fit(x, ("a", "b", "c"), 8)
    y = sc.transform(x)
    np.testing.assert_allclose(y.reshape(-1, 3).min(0), 0, atol=1e-6)
    np.testing.assert_allclose(y.reshape(-1, 3).max(0), 1, atol=1e-6)
    naive = np.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(3):
            naive[i, :, j] = (x[i, :, j] - sc.min[j]) / abs(sc.max[j] - sc.min[j])
    np.testing.assert_allclose(y, naive, rtol=1e-5, atol=1e-6)
    assert MinMaxScaler.from_dict(sc.to_dict()).to_dict() == sc.to_dict()


SEED_TABLE = {  # ../shared/data/milling/README.md
    "train": (7751, 2831, 4355, 565),
    "val": (1909, 697, 1072, 140),
    "test": (1910, 698, 1073, 139),
}


def test_seed_protocol_split_counts_are_exact(real5, labels_csv):
    cfg = make_config(data=str(real5), signals="available", labels=str(labels_csv))
    with pytest.warns(UserWarning):
        mill = load_mill(real5, "available")
    p = prepare(cfg, mill=mill)
    c = p.counts()
    assert c["n_windows"] == 11570
    for s, (n, h, d, f) in SEED_TABLE.items():
        assert (c[f"n_{s}"], c[f"n_{s}_healthy"], c[f"n_{s}_degraded"], c[f"n_{s}_failed"]) == (
            n,
            h,
            d,
            f,
        )
        assert c[f"n_{s}_slim"] == h
    assert len(p.get("train", slim=True)) == 2831
    x = p.get("train")
    assert x.dtype == np.float32 and x.min() == 0 and x.max() == 1


def test_case_split_keeps_tools_whole_and_spreads_failing_tools(real5, labels_csv):
    with pytest.warns(UserWarning):
        mill = load_mill(real5, "available")
    seen = set()
    for split_seed in range(4):
        cfg = make_config(
            data=str(real5),
            signals="available",
            labels=str(labels_csv),
            split="case",
            split_seed=split_seed,
        )
        w = prepare(cfg, mill=mill).windows
        per_case = w.groupby("case")["split"].nunique()
        assert (per_case == 1).all()
        failing = set(w.loc[w.tool_class == 2, "case"])
        assert len(failing) == 7
        val = set(w.loc[w.split == "val", "case"])
        test = set(w.loc[w.split == "test", "case"])
        assert val | test == failing and not val & test and len(val) == 4
        assert (w.loc[w.split == "train", "tool_class"] != 2).all()
        seen.add(tuple(sorted(test)))
    assert len(seen) > 1, "split_seed must change which tools are tested"


def test_case_split_needs_failing_tools():
    with pytest.raises(MillvaeError, match="at least 2 tools"):
        split_cases(np.array([1, 1, 2, 2]), np.array([0, 1, 0, 2]), 0)


def test_cut_split_is_stratified_and_whole(real5, labels_csv):
    cfg = make_config(data=str(real5), signals="available", labels=str(labels_csv), split="cut")
    with pytest.warns(UserWarning):
        mill = load_mill(real5, "available")
    w = prepare(cfg, mill=mill).windows
    assert (w.groupby("cut_no")["split"].nunique() == 1).all()
    failed_cuts = w[w.tool_class == 2].groupby("split")["cut_no"].nunique()
    assert set(failed_cuts.index) == {"train", "val", "test"}


def test_labels_with_wrong_columns(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("case,run,start,stop\n1,1,0,64\n")
    with pytest.raises(MillvaeError, match="lacks cut_no, window_start, window_end"):
        read_labels(bad)


def test_synthetic_file_prepares_and_is_tagged_synthetic(synthetic_mat):
    cfg = make_config(data=str(synthetic_mat))
    mill = load_mill(synthetic_mat)
    assert mill.synthetic and mill.signal_names == SIGNAL_NAMES
    p = prepare(cfg, mill=mill)
    assert p.data_source == "synthetic" and p.regions_from == "detected"
    c = p.counts()
    assert c["n_train_slim"] > 500 and c["n_test_failed"] > 0


# --------------------------------------------------------------------------------------------
# tiny mill.mat files written by scipy.io.savemat, in the real struct layout


def cut_signals(seed: int, n: int = 9000) -> dict[str, np.ndarray]:
    """Six [n, 1] signals of one cut: idle, a steady cut in samples 2000-7000, idle again."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    cutting = (t >= 2000) & (t < 7000)
    out = {}
    for k, name in enumerate(SIGNAL_NAMES):
        x = rng.normal(0.0, 0.02, n)
        x[cutting] += 0.5 * np.sin(0.3 * t[cutting] + k) + (1.0 if name == "smcDC" else 0.0)
        out[name] = x.reshape(-1, 1)
    return out


def write_mill(path, records: list[dict]) -> object:
    """Write `records` (field -> value; missing signals are filled by cut_signals) as 'mill'."""
    fields = ["case", "run", "VB", "time", "DOC", "feed", "material", *SIGNAL_NAMES]
    mill = np.empty((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, rec in enumerate(records):
        full = {"time": 2.0 * (i + 1), "DOC": 1.5, "feed": 0.5, "material": 1, **cut_signals(i)}
        full.update(rec)
        for f in fields:
            mill[0, i][f] = full[f]
    scipy.io.savemat(path, {"mill": mill})
    return path


def tool_records(case: int, vbs: list[float]) -> list[dict]:
    """Records of one tool (case), run 1.., with the given flank wear per run (nan = unmeasured)."""
    return [{"case": case, "run": r + 1, "VB": vb} for r, vb in enumerate(vbs)]


# --------------------------------------------------------------------------------------------
# 8a: a dropped record says what is wrong with it

BAD_RECORDS = [
    # (id, fields of record 1, its drop reason)
    ("text", {"vib_table": "x" * 9000}, "signal 'vib_table' is text, expected numbers"),
    (
        "digit-chars",  # 9000 characters: the right size, and each one parses as a number
        {"smcAC": np.array(list("1" * 9000)).reshape(-1, 1)},
        "signal 'smcAC' is text, expected numbers",
    ),
    (
        "letter-chars",
        {"AE_table": np.array(list("a" * 9000)).reshape(-1, 1)},
        "signal 'AE_table' is text, expected numbers",
    ),
    (
        "cell",
        {"vib_spindle": np.array([["a"], ["b"]], dtype=object)},
        "signal 'vib_spindle' is a MATLAB cell or struct, expected numbers",
    ),
    (
        "matrix",  # 4500 x 2 has the right size, the wrong shape
        {"smcDC": np.zeros((4500, 2))},
        "signal 'smcDC' has shape 4500x2, expected a vector of samples",
    ),
    (
        "complex",
        {"AE_spindle": np.ones((9000, 1)) * (1 + 1j)},
        "signal 'AE_spindle' holds complex numbers, expected real numbers",
    ),
    (
        "short",
        {"vib_table": np.zeros((8000, 1))},
        "signal 'vib_table' has 8000 samples, expected 9000",
    ),
    ("empty", {"smcAC": np.zeros((0, 0))}, "signal 'smcAC' has 0 samples, expected 9000"),
    ("text-metadata", {"DOC": "deep"}, "metadata 'DOC' is text, expected a number"),
    (
        "vector-metadata",
        {"feed": np.array([0.5, 0.25])},
        "metadata 'feed' has 2 values, expected one number",
    ),
    ("no-metadata", {"case": np.zeros((0, 0))}, "missing metadata"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("fields", "reason"), [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS]
)
def test_a_bad_record_is_dropped_with_its_true_reason(tmp_path, fields, reason):
    records = tool_records(1, [0.0, 0.1, 0.15])
    records[1].update(fields)
    path = write_mill(tmp_path / "mill.mat", records)
    with pytest.warns(UserWarning) as caught:
        mill = load_mill(path)
    message = str(caught[0].message)
    assert message == f"dropped corrupted records [1]: 1 ({reason})"
    assert mill.dropped == {1: reason}
    assert list(mill.cuts.index) == [0, 2] and mill.signals.shape == (2, 9000, 6)


def test_a_record_of_the_wrong_length_everywhere_keeps_the_short_reason(tmp_path):
    records = tool_records(1, [0.0, 0.1, 0.15])
    records[2].update({s: np.zeros((15360, 1)) for s in SIGNAL_NAMES})  # like record 94
    with pytest.warns(UserWarning):
        mill = load_mill(write_mill(tmp_path / "mill.mat", records))
    assert mill.dropped == {2: "15360 samples, expected 9000"}


@pytest.mark.bad_input
def test_every_record_bad_is_one_line_naming_the_reason(tmp_path):
    records = tool_records(1, [0.0, 0.1])
    for rec in records:
        rec["vib_table"] = "not numbers"
    path = write_mill(tmp_path / "mill.mat", records)
    with pytest.warns(UserWarning), pytest.raises(MillvaeError) as info:
        load_mill(path)
    assert str(info.value) == (
        "data: expected at least one good record in mill.mat; every one of its 2 is corrupted "
        "(record 0: signal 'vib_table' is text, expected numbers)"
    )


# --------------------------------------------------------------------------------------------
# 8b: the prepared data says when detection metrics cannot be computed


def test_two_healthy_records_say_why_there_are_no_detection_metrics(tmp_path):
    path = write_mill(tmp_path / "two.mat", tool_records(1, [0.0, np.nan]))
    p = prepare(make_config(data=str(path)))
    c = p.counts()
    assert c["n_val"] > 0 and c["n_test"] > 0 and c["n_val_failed"] == c["n_test_failed"] == 0
    why = why_no_detection(p)
    nv, nt = c["n_val"], c["n_test"]
    assert why == (
        "detection metrics incomplete (positive=failed): validation has no failed window "
        "(no threshold, detector, validation figures, F1 or cut-level test figures); "
        "test has no failed window (no test figures); the data holds no failed window at all "
        f"(validation: {nv} healthy / 0 degraded / 0 failed; "
        f"test: {nt} healthy / 0 degraded / 0 failed)"
    )
    assert "\n" not in why
    assert why_no_detection(p, "worn").startswith(
        "detection metrics incomplete (positive=worn): validation has no worn (degraded or failed) "
        "window"
    )


def test_no_reason_when_validation_and_test_hold_both_classes(tmp_path):
    vbs = [0.0, 0.05, 0.1, 0.15, 0.3, 0.5, 0.75, 0.9]
    path = write_mill(tmp_path / "tool.mat", tool_records(1, vbs) + tool_records(2, vbs))
    p = prepare(make_config(data=str(path)))
    assert why_no_detection(p) is None and why_no_detection(p, "worn") is None


def test_only_the_split_that_lacks_a_class_is_named():
    windows = pd.DataFrame(
        {
            "cut_no": [0, 1, 2, 3, 4, 5],
            "case": 1,
            "tool_class": [0, 2, 0, 2, 0, 1],
            "split": ["train", "train", "val", "val", "test", "test"],
        }
    )
    p = Prepared(
        x=np.zeros((6, 4, 1), np.float32),
        windows=windows,
        scaler=MinMaxScaler(np.zeros(1), np.ones(1), ("smcAC",), 4),
        signal_names=("smcAC",),
        data_source="real",
        data_path="",
        data_sha256="",
        regions_from="detected",
    )
    assert why_no_detection(p) == (
        "detection metrics incomplete (positive=failed): test has no failed window "
        "(no test figures) (validation: 1 healthy / 0 degraded / 1 failed; "
        "test: 1 healthy / 1 degraded / 0 failed)"
    )
    assert why_no_detection(p, "worn") is None


@pytest.mark.bad_input
def test_no_healthy_window_at_all_is_refused_in_one_line(tmp_path):
    path = write_mill(tmp_path / "worn.mat", tool_records(1, [0.8, 0.9, 1.0]))
    with pytest.raises(MillvaeError) as info:
        prepare(make_config(data=str(path)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "split: expected healthy windows (VB < 0.2 mm) in the training split; found none "
        "(train holds 0 healthy / 0 degraded / "
    )
    assert message.endswith(" failed windows, split=window)")
