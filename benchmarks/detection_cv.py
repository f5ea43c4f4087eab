"""The detection table on the real 5-signal data: every detector under the leak-free tool-fold
cross-validation (`split=casefold`, out-of-fold test scores pooled over all failing tools), and the
seed's leaky window split beside the paper's 0.411 / 0.450.

Every number comes from real MLflow runs (sqlite store in --store, default ./evidence-cv):
`baseline` (PCA, Isolation Forest, time in use) over every fold, `repeat` with `detector=combined`
(the β-VAE's scores, PCA's and their combination from one training per fold) for the seed default
and the paper's best configuration, then the same detectors once under `split=window`.
The detector to ship is the one with the best mean validation AP over the folds (`cv_val_ap`);
test figures are reported, never used to choose. Writes the table as markdown (--out). Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "milling"
PAPER = (
    "paper (6 signals, seed protocol, best of ~1000 chosen on test): PR-AUC 0.411 mse / 0.450 kl"
)
VAE_ROWS = (
    ("mse", "β-VAE reconstruction error"),
    ("kl", "β-VAE KL from the prior"),
    ("mse_cond", "β-VAE reconstruction, condition-aware"),
    ("kl_cond", "β-VAE KL, condition-aware"),
    ("lat", "β-VAE coding's Mahalanobis distance from healthy codings"),
    ("lat_cond", "β-VAE coding distance, condition-aware"),
    ("combined_cond", "combined: β-VAE smcAC error + coding distance + PCA (`combine` default)"),
    ("mse_cond_smooth", "β-VAE reconstruction, condition-aware, smoothed over the tool's cuts"),
    ("lat_cond_smooth", "β-VAE coding distance, condition-aware, smoothed"),
    ("combined_cond_smooth", "combined, smoothed over the tool's cuts"),
)
BASELINE_ROWS = (
    ("time_in_use", "time in use (cut number; no model)"),
    ("pca", "PCA reconstruction error"),
    ("pca_cond", "PCA, condition-aware"),
    ("iforest", "Isolation Forest"),
    ("iforest_cond", "Isolation Forest, condition-aware"),
)
SMOOTHED_BASELINE_ROWS = (
    ("pca_cond_smooth", "PCA, condition-aware, smoothed over the tool's cuts"),
    ("iforest_cond_smooth", "Isolation Forest, condition-aware, smoothed"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=SHARED)
    ap.add_argument("--store", type=Path, default=Path("evidence-cv"))
    ap.add_argument("--out", type=Path, default=Path("detection_cv.md"))
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--no-paper-best", action="store_true", help="skip the paper's configuration")
    ap.add_argument(
        "--smoothing", type=float, default=0.7, help="the β-VAE runs' smoothing (chosen offline)"
    )
    ap.add_argument(
        "--baseline-smoothing",
        default="0.3,0.5,0.7",
        help="the baselines' smoothings, each a run over the folds (the best on validation wins)",
    )
    args = ap.parse_args()
    mat = args.data_dir / "mill_partial_no_AE_spindle.mat"
    labels = args.data_dir / "labels_with_tool_class.csv"
    if not mat.is_file() or not labels.is_file():
        print(f"skipped: real milling data absent ({mat})")
        return 0
    out = args.out.resolve()
    args.store.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.store.resolve() / 'mlflow.db'}"
    os.chdir(args.store)
    warnings.simplefilter("ignore")
    import mlflow

    from millvae.baseline import run_baseline, run_baseline_folds
    from millvae.config import PAPER_BEST, make_config
    from millvae.metric_groups import flat
    from millvae.repeat import run_repeat
    from millvae.train import train_run

    common = dict(
        data=str(mat),
        signals="available",
        labels=str(labels),
        experiment="detection-cv",
        bootstrap=args.bootstrap,
        epochs=args.epochs,
    )
    # the paper did not publish its patience; 30 is the lowest of its search space
    configs = {"seed default": {}}
    if not args.no_paper_best:
        configs["paper's best"] = {**PAPER_BEST, "earlystop_patience": 30}
    t_start = time.time()
    cv, window, seconds = {}, {}, {}
    t0 = time.time()
    for w in [float(v) for v in args.baseline_smoothing.split(",")]:
        key = f"baselines, smoothing {w:g}"
        fold = make_config(**common, split="casefold", folds=args.folds, smoothing=w)
        rid = run_baseline_folds(fold, list(range(args.folds)), 0.95, 200)
        cv[key] = flat(mlflow.get_run(rid).data.metrics)
        rid, _ = run_baseline(make_config(**common, split="window", smoothing=w), 0.95, 200)
        window[key] = flat(mlflow.get_run(rid).data.metrics)
    seconds["baselines"] = time.time() - t0
    common["smoothing"] = args.smoothing
    for label, params in configs.items():
        t0 = time.time()
        cfg = make_config(
            **common, **params, split="casefold", folds=args.folds, detector="combined"
        )
        rid, _ = run_repeat(cfg, list(range(args.folds)), verbose=0)
        cv[label], seconds[label] = flat(mlflow.get_run(rid).data.metrics), time.time() - t0
        res = train_run(
            make_config(**common, **params, split="window", detector="combined"), verbose=0
        )
        window[label] = flat(mlflow.get_run(res.run_id).data.metrics)
        print(f"{label}: {time.time() - t0:.0f} s", flush=True)
    text = report(cv, window, args, time.time() - t_start, seconds)
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {out}")
    return 0


def _cpu() -> str:
    """The CPU's model name (speed differs between machines), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ci(m: dict, key: str) -> str:
    if key not in m:
        return "n/a"
    lo, hi = m.get(f"{key}_lo"), m.get(f"{key}_hi")
    band = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{m[key]:.3f}{band}"


def _f(m: dict, key: str) -> str:
    return f"{m[key]:.3f}" if key in m else "n/a"


def rows(cv: dict, window: dict):
    """(model, score, label, pooled figures, window-split figures) for every detector."""
    keys = [k for k in cv if k.startswith("baselines")]
    for score, label in BASELINE_ROWS:  # the same in every baseline run
        yield "baselines", score, label, cv[keys[0]], window[keys[0]]
    for key in keys:
        for score, label in SMOOTHED_BASELINE_ROWS:
            yield key, score, label, cv[key], window[key]
    for model in cv:
        if model in keys:
            continue
        for score, label in VAE_ROWS:
            yield model, score, label, cv[model], window[model]


def report(cv: dict, window: dict, args, total: float, seconds: dict) -> str:
    table = list(rows(cv, window))
    chosen = max(table, key=lambda r: r[3].get(f"cv_val_ap_{r[1]}", -1.0))
    lines = [
        "# Detection on whole held-out tools (real 5-signal data)",
        "",
        f"`python benchmarks/detection_cv.py` on {_cpu()}, "
        f"{os.cpu_count()} cores: {total / 60:.1f} min "
        f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in seconds.items())} for the folds).",
        "",
        f"Leak-free protocol: `split=casefold`, {args.folds} folds over the 7 failing tools (every "
        "failing tool tested in exactly one fold, the other failing tools validate, the 9 tools "
        "that never fail train); each fold's scores and thresholds come from its own training and "
        "validation split; test figures pool the out-of-fold test windows of all folds; intervals "
        f"are 95 % bootstraps over whole tools ({args.bootstrap} resamples). Positive class: "
        "failed (VB >= 0.7 mm). `cv_val_ap`: mean validation AP over the folds, the figure the "
        "detector is chosen by. The window split (the seed's, leaky: windows of one cut in "
        f"training and test) is there to compare with the paper: {PAPER}.",
        "",
        f"Smoothed scores (`<score>_smooth`): each cut's mean score averaged over its tool's cuts "
        f"in order, earlier cuts weighing `smoothing` (β-VAE runs: {args.smoothing:g}; baselines: "
        f"{args.baseline_smoothing}); known when a cut ends.",
        "",
        "| model | score | cv_val_ap | pooled test AP | pooled cut AP | pooled ROC-AUC | window "
        "split: test PR-AUC (seed grid) | window split: test AP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, score, label, m, w in table:
        mark = " **(chosen on validation)**" if (model, score) == chosen[:2] else ""
        lines.append(
            f"| {model} | {label} (`{score}`){mark} | {_f(m, f'cv_val_ap_{score}')} | "
            f"{_ci(m, f'pooled_test_ap_{score}')} | {_ci(m, f'pooled_test_cut_ap_{score}')} | "
            f"{_ci(m, f'pooled_test_rocauc_{score}')} | {_f(w, f'test_prauc_{score}')} | "
            f"{_f(w, f'test_ap_{score}')} |"
        )
    first = next(iter(cv.values()))
    n_pos = first.get("pooled_test_n_positive", float("nan"))
    n_all = first.get("pooled_test_n_windows", float("nan"))
    lines += [
        "",
        f"The pooled test windows ({n_all:.0f}, all windows of the 7 failing tools) hold "
        f"{n_pos:.0f} failed windows: no-skill AP {n_pos / n_all:.3f}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
