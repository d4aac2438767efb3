#!/usr/bin/env python3
"""Benchmark the causal n-gram candidate kernel (train_gpt.ngram_candidates).

    python bench/bench_ngram.py [--tokens N] [--synthetic] [--sweep] [--ref-tokens 200000] [--warm-cache]

Stream: the stand-in shards (val then train) under data/standin/datasets/fineweb10B_sp1024/ when
they exist, else a synthetic Zipf phrase stream of 28.7M tokens (vocab 1024). Reports JIT compile
time, end-to-end throughput (table allocation and output post-processing included) with and
without the compile, CPU time, peak RSS, coverage and top-1 / top-k accuracy, and the speedup over
the plain-Python fallback (the same code under NUMBA_DISABLE_JIT=1) on a slice.
"""
import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT / "data/standin/datasets/fineweb10B_sp1024"
SWEEP = [  # min_order, max_order, table_bits, top_k, min_count
    (2, 5, 22, 3, 1), (2, 6, 22, 3, 1), (2, 8, 22, 3, 1), (1, 4, 22, 3, 1), (2, 4, 22, 3, 2), (1, 6, 22, 3, 2),
    (2, 4, 20, 3, 1), (2, 4, 23, 3, 1),
]


def load():
    sys.path.insert(0, str(ROOT))
    import train_gpt
    return train_gpt


def synthetic(n, vocab=1024, seed=0):
    """Zipf-distributed phrases (1-16 Zipf tokens each) drawn with Zipf popularity, concatenated."""
    rng = np.random.default_rng(seed)
    n_phrases = 200_000
    lengths = rng.integers(1, 17, n_phrases)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    store = ((rng.zipf(1.2, int(lengths.sum())) - 1) % vocab).astype(np.uint16)
    ids = (rng.zipf(1.1, 2 * n // 8 + 16) - 1) % n_phrases
    ids = ids[: np.searchsorted(np.cumsum(lengths[ids]), n) + 1]
    lens = lengths[ids]
    offsets = np.repeat(starts[ids] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return store[offsets + np.arange(lens.sum())][:n]


def token_stream(ng, args):
    files = [f for split in ("val", "train") for f in sorted(glob.glob(str(SHARDS / ng.SHARD_GLOB.format(split=split))))]
    if files and not args.synthetic:
        toks = np.concatenate([ng.load_shard(f) for f in files])
        source = f"stand-in shards ({len(files)} files, val+train)"
    else:
        why = "--synthetic" if files else f"no shards under {SHARDS.relative_to(ROOT)}"
        toks, source = synthetic(args.tokens or 28_700_000), f"SYNTHETIC Zipf phrase stream, vocab 1024 ({why})"
    return (toks[: args.tokens] if args.tokens else toks), source


def accuracy(tokens, cand_tok):
    return (float((cand_tok[:, 0] >= 0).mean()), float((cand_tok[:, 0] == tokens).mean()),
            float((cand_tok == tokens[:, None]).any(1).mean()))


def python_fallback_seconds(tokens, settings):
    """Run the same code with NUMBA_DISABLE_JIT=1 in a subprocess; return (seconds, rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/t.npy", tokens)
        code = (f"import sys, time, json, numpy as np; sys.path.insert(0, {str(ROOT / 'bench')!r});"
                f"from bench_ngram import load; ng = load(); t = np.load('{tmp}/t.npy'); t0 = time.perf_counter();"
                f"tok, logc, _ = ng.ngram_candidates(t, **{settings!r}); dt = time.perf_counter() - t0;"
                f"np.save('{tmp}/o.npy', tok); print(json.dumps(dt))")
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_DISABLE_JIT="1"),
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1]), np.load(f"{tmp}/o.npy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=0, help="truncate the stream (0 = all)")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic stream even if shards exist")
    ap.add_argument("--sweep", action="store_true", help="also report accuracy/speed for a few settings")
    ap.add_argument("--ref-tokens", type=int, default=200_000, help="slice for the plain-Python timing (0 = skip)")
    ap.add_argument("--warm-cache", action="store_true", help="keep numba's on-disk cache (default: compile cold)")
    args = ap.parse_args()
    cold_cache = None if args.warm_cache else tempfile.TemporaryDirectory(prefix="ngram_bench_cache_")
    if cold_cache:
        os.environ["NUMBA_CACHE_DIR"] = cold_cache.name
    ng = load()
    tokens, source = token_stream(ng, args)
    n = tokens.size
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    t0 = time.perf_counter()
    ng.ngram_candidates(tokens[:1000])
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    h = ng.Hyperparameters()  # the settings train_gpt.py's pass uses
    settings = dict(min_order=h.ngram_min_order, max_order=h.ngram_max_order, table_bits=h.ngram_table_bits,
                    top_k=h.ngram_top_k, min_count=h.ngram_min_count)
    cand_tok, cand_logc, stats = ng.ngram_candidates(tokens, **settings)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cov, top1, topk = accuracy(tokens, cand_tok)

    threads = ng.numba.get_num_threads() if ng.numba else 1
    rows = [
        ("stream", f"{source}: {n:,} tokens"),
        ("settings (Hyperparameters defaults)", ", ".join(f"{k}={v}" for k, v in settings.items()) + f"; numba threads={threads}"),
        ("machine load (1 min avg)", f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"),
        ("JIT compile (first call, cold cache)" if not args.warm_cache else "first call (cache load)", f"{compile_s:.2f} s"),
        ("end to end, without compile", f"{wall:.2f} s = {n / wall / 1e6:.2f} M tok/s"),
        ("end to end, with compile", f"{wall + compile_s:.2f} s = {n / (wall + compile_s) / 1e6:.2f} M tok/s"),
        ("CPU time (all threads)", f"{cpu:.2f} s = {cpu / n * 1e9:.0f} ns/token"),
        ("peak RSS (ru_maxrss)", f"{peak:.2f} GiB (stream loaded: {rss0:.2f} GiB)"),
        ("coverage (>=1 candidate)", f"{cov:.4f}"),
        ("top-1 accuracy", f"{top1:.4f}"),
        (f"top-{cand_tok.shape[1]} accuracy", f"{topk:.4f}"),
        ("emitting order share", " ".join(f"{k}:{v / n:.3f}" for k, v in stats["hits_per_order"].items())),
    ]
    if args.ref_tokens:
        sl = tokens[: args.ref_tokens]
        t0 = time.perf_counter()
        jit_tok, _, _ = ng.ngram_candidates(sl, **settings)
        jit_s = time.perf_counter() - t0
        py_s, py_tok = python_fallback_seconds(sl, settings)
        same = "identical rows" if np.array_equal(py_tok, jit_tok) else "ROWS DIFFER"
        rows.append((f"plain Python fallback, {sl.size:,} tokens",
                     f"{py_s:.2f} s ({sl.size / py_s / 1e3:.1f} k tok/s) vs numba {jit_s:.3f} s: "
                     f"speedup x{py_s / jit_s:.0f}, {same}"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))

    if args.sweep:
        del cand_tok, cand_logc, stats
        print(f"\n{'orders':>7} {'bits':>4} {'top_k':>5} {'min_count':>9} {'M tok/s':>8} {'cpu ns/tok':>10} "
              f"{'coverage':>8} {'top1':>6} {'top-k':>6}")
        for lo, hi, bits, top_k, mc in SWEEP:
            t0, c0 = time.perf_counter(), time.process_time()
            tok, _, _ = ng.ngram_candidates(tokens, lo, hi, bits, top_k, mc)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            cov, top1, topk = accuracy(tokens, tok)
            print(f"{lo:>3}..{hi:<2} {bits:>4} {top_k:>5} {mc:>9} {n / wall / 1e6:>8.2f} {cpu / n * 1e9:>10.0f} "
                  f"{cov:>8.4f} {top1:>6.4f} {topk:>6.4f}")
            del tok


if __name__ == "__main__":
    main()
