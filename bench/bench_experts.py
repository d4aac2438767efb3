#!/usr/bin/env python3
"""CPU cost of the pass's experts per scored position: Experts.log_probs (online bias, n-gram boosts, Hedge mixture)
on one eval batch of random logits, the CPU preset's pool (PRESET=cpu: neural, neural+bias, one expert per beta),
at the targets only (as the pass scores) and as whole rows (what a recorder gets; --script's older versions: rows).

    python3 bench/bench_experts.py [--rows 8192] [--reps 3] [--script PATH] [--betas 2.0,4.0,8.0]

--script imports another train_gpt.py (e.g. an older commit's, from `git show REV:train_gpt.py > /tmp/old.py`), so
two versions are compared in one session on one machine. Prints microseconds per row, median of --reps.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location("train_gpt_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192, help="scored positions per batch (cpu preset: 64 x 128)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--script", type=Path, default=ROOT / "train_gpt.py")
    ap.add_argument("--betas", default="", help="NGRAM_BETAS (default: the script's cpu preset), for equal pools")
    a = ap.parse_args(argv)
    tg = load_script(a.script)
    h = tg.Hyperparameters.from_env({"PRESET": "cpu", **({"NGRAM_BETAS": a.betas} if a.betas else {})})
    n, V, cpu = a.rows, h.vocab_size, torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, V, generator=g) * 3
    x = torch.randint(2, V, (n,), generator=g)
    x[::500] = tg.BOS_ID  # documents of ~500 tokens
    rng = np.random.default_rng(0)
    cands = (rng.integers(-1, V, (n + 1, h.ngram_top_k)).astype(np.int32), rng.random((n + 1, h.ngram_top_k), np.float32))
    bias = tg.OnlineBias(h, V, cpu)
    betas = h.ngram_beta_list
    experts = tg.Experts(h, bias, cands, tg.HedgeMixer(tg.Experts.pool_size(True, len(betas)), h.hedge_eta, cpu))
    y = torch.randint(0, V, (n, 1), generator=g)
    sparse = "cols" in experts.log_probs.__code__.co_varnames  # older scripts score whole rows only
    for what, cols in [("targets", y), ("rows", None)] if sparse else [("rows", None)]:
        times = []
        for i in range(a.reps + 1):
            bias.begin_chunk(None)
            t0 = time.perf_counter()
            experts.log_probs(logits, x, torch.arange(n), *([cols] if sparse else []))
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
        us = 1e6 * statistics.median(times) / n
        print(f"script:{a.script} rows:{n} experts:{experts.n_experts} betas:{h.ngram_betas} "
              f"threads:{torch.get_num_threads()} at:{what} us_per_row:{us:.1f} (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
