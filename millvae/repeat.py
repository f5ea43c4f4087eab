"""The `repeat` entry point: one configuration over several split seeds, mean ± spread; under
`split=casefold` every fold, with the out-of-fold test scores pooled into one figure.

Only 12 cuts of 7 tools ever fail, so a leak-free test figure from one split moves a lot with the
tools that happen to be tested. `repeat` trains the same configuration once per `split_seed` (child
runs under one parent) and logs the mean, standard deviation, min and max of the main metrics on the
parent, plus a table of every seed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from millvae import tracking
from millvae.config import PARAM_DEFAULTS, PARAM_HELP, PARAM_NAMES, make_config
from millvae.crossval import (
    covers_every_fold,
    each_fold,
    parse_seeds,
    record_pooled,
    tag_data,
)
from millvae.detect.pooled import fold_scores
from millvae.errors import ArgParser, MillvaeError
from millvae.train import train_run

_MAIN = ("val_ap", "test_ap", "test_rocauc", "test_prauc", "test_f1", "test_cut_ap")
SUMMARY_METRICS = (
    *(f"{k}_{s}" for s in ("mse", "kl", "mse_cond", "kl_cond") for k in _MAIN),
    "best_val_loss",
    "epochs_trained",
)


def summarize(per_seed: pd.DataFrame) -> dict[str, float]:
    """mean_/std_/min_/max_ of each metric over the seeds (std with ddof=1 when > 1 seed)."""
    out = {}
    for col in per_seed.columns:
        v = per_seed[col].dropna().to_numpy(dtype=float)
        if len(v) == 0:
            continue
        out[f"mean_{col}"] = float(v.mean())
        out[f"std_{col}"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out[f"min_{col}"] = float(v.min())
        out[f"max_{col}"] = float(v.max())
    return out


def run_repeat(cfg, seeds: list[int], verbose: int = 2) -> tuple[str, pd.DataFrame]:
    if cfg.split == "window":
        raise MillvaeError(
            "repeat: split=window always uses the seed's fixed random states; use split=casefold, "
            "case or cut"
        )
    name = f"repeat_{cfg.model_name()}_split-{cfg.split}_seeds-{'-'.join(map(str, seeds))}"
    with tracking.tracked_run(cfg, run_name=name, tags={"model_type": "repeat"}) as parent:
        seeds_param = {"split_seeds": ",".join(map(str, seeds))}
        tracking.start_record({**cfg.to_params(), **seeds_param}, model_type="repeat")
        rows, folds = [], []
        for seed, child_cfg, prepared in each_fold(cfg, seeds):
            res = train_run(child_cfg, prepared=prepared, nested=True, verbose=verbose)
            m = tracking.run_metrics(res.run_id)
            if res.evaluation is not None:
                folds.append(fold_scores(seed, res.evaluation, prepared.windows))
                score_names = res.evaluation.score_names
            rows.append(
                {
                    "split_seed": seed,
                    "run_id": res.run_id,
                    **{k: m.get(k, np.nan) for k in SUMMARY_METRICS},
                }
            )
            print(f"millvae repeat: split_seed {seed} done (run {res.run_id})", flush=True)
        tag_data(prepared)
        table = pd.DataFrame(rows)
        stats = summarize(table.drop(columns=["split_seed", "run_id"]))
        tracking.log_metrics(stats)
        if covers_every_fold(cfg, seeds) and len(folds) == len(seeds):
            record_pooled(folds, score_names, cfg, "repeat")
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / "per_seed.csv", index=False)
            tracking.log_files(Path(tmp), {"per_seed.csv": None})
        for s in ("mse", "kl", "mse_cond", "kl_cond"):
            k = f"test_ap_{s}"
            if f"mean_{k}" in stats:
                print(
                    f"  {k}: {stats[f'mean_{k}']:.3f} ± {stats[f'std_{k}']:.3f} "
                    f"(min {stats[f'min_{k}']:.3f}, max {stats[f'max_{k}']:.3f})"
                )
        return parent.info.run_id, table


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="millvae repeat", description="One configuration over several split seeds.")
    for name in PARAM_NAMES:
        default = "case" if name == "split" else PARAM_DEFAULTS[name]
        p.add_argument(f"--{name}", default=default, help=PARAM_HELP[name])
    p.add_argument(
        "--split_seeds",
        default="",
        help="comma-separated split seeds; empty: every fold (split=casefold), else 0,1,2",
    )
    p.add_argument("--quiet", action="store_true")
    args = vars(p.parse_args(argv))
    seeds_text = args.pop("split_seeds")
    quiet = args.pop("quiet")
    cfg = make_config(**args)
    seeds = parse_seeds(seeds_text, cfg, default=[0, 1, 2])
    run_repeat(cfg, seeds, verbose=0 if quiet else 2)
    return 0
