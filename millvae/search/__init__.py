"""The `search` entry point: a random search whose trials are `ParameterSampler` draws.

One parent run per search and one child run per trial, trained by the same `train_run` as
`main`. Trial i is always the i-th draw of `ParameterSampler(space, n_iter, random_state=seed)`,
so running the same search again skips FINISHED trials and redoes the rest; shard k of n runs
the trials i ≡ k (mod n) against a shared tracking server. Workers are processes that import
TensorFlow once, keep prepared data in memory and split the machine's cores between them.

By job: `space` (the search space), `store` (the parent run, claims and trials in MLflow),
`trial` (one trial), `workers` (the worker processes) and `driver` (`main`, `run_search`).
"""

from millvae.search.driver import main

__all__ = ["main"]
