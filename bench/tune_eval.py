#!/usr/bin/env python3
"""Score a trained artifact with the legal pass under given eval knobs; tune those knobs on held-out TRAIN docs.

    python3 bench/tune_eval.py ARTIFACT --config "TTT_ENABLED=0" --config "TTT_POLYAK_BIAS_CORRECT=0" ...
    python3 bench/tune_eval.py ARTIFACT --tune [--knobs bias_lr,hedge_eta] [--tokens 262144] [--steps N]

Knobs come from the environment exactly as train_gpt.py reads them (run with PRESET=cpu for the CPU preset), and
each --config "K=V,K=V" runs one more pass with those env vars on top; every pass reloads the artifact (TTT trains
the model in place) and reports every track's bpb (neural, +bias, +n-gram, mixture) and its time.

--split heldout (the default, and the only split --tune accepts): the last --tokens tokens of the LAST train shard,
cut at a BOS so that they are whole documents. train_gpt reads the train shards in order from the start of the
first one, so a run of --steps steps (default ITERATIONS) has read steps * (TRAIN_BATCH_TOKENS + 8) tokens from
the front; the script refuses a slice that overlaps them. --split val scores the validation set (a measurement,
never a tuning target); --tokens 0 means all of it.

--tune: coordinate descent, one sweep over GRID in order (each knob tried at a few values with the others at their
best so far; a value is kept only if it gains at least --min-gain), minimising the declared (mixture) bpb on the
held-out slice. Start values come from the environment, so a second sweep over some --knobs continues the first.
It prints every trial and the chosen values as env vars. All numbers are CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

# The eval knobs of issue 11, a few values each (the CPU preset's value is added if missing). The n-gram knobs
# come first: they move the score most, and the knobs tuned later see their chosen values.
GRID = {
    "ngram_max_order": ["6", "7", "8", "10"],
    "ngram_min_order": ["1", "2"],
    "ngram_top_k": ["3", "4", "6"],
    "ngram_min_count": ["1", "2", "3"],
    "ngram_table_bits": ["20", "22"],
    "ngram_betas": ["0.5,1.0", "0.5,1.0,1.5", "0.75,1.5", "0.5,1.0,2.0", "0.5,1.0,2.0,3.0", "1.0,2.0,3.0"],
    "bias_lr": ["0.01", "0.02", "0.04", "0.08"],
    "hedge_eta": ["0.25", "0.5", "1.0", "2.0"],
    "ttt_lr": ["0.002", "0.005", "0.01", "0.02"],
    "ttt_polyak_decay": ["0", "0.9", "0.998"],
    "ttt_epochs": ["1", "2"],
    "ttt_chunk_tokens": ["16384", "32768"],
    "tilt_enabled": ["0", "1"],
    "tilt_order": ["8", "12", "16"],
    "tilt_threshold": ["0.6", "0.8", "0.9"],
    "tilt_beta": ["1.5", "2.625", "4.0"],
}


def parse_config(text: str) -> dict[str, str]:
    """"K=V,K=V" -> {K: V}; a value may hold commas (NGRAM_BETAS=0.5,1.0): a piece without '=' continues it."""
    out: dict[str, str] = {}
    key = None
    for piece in (p for p in text.split(",") if p):
        if "=" in piece:
            key, value = piece.split("=", 1)
            out[key.strip().upper()] = value
        elif key is None:
            raise ValueError(f"--config {text!r}: expected K=V[,K=V...]")
        else:
            out[key] += "," + piece
    return out


def hparams(env_extra: dict[str, str]) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**os.environ, **env_extra})


def heldout_tokens(h: tg.Hyperparameters, n_tokens: int, steps: int) -> torch.Tensor:
    """The last n_tokens(+1) tokens of the last train shard, starting at a BOS; refuses if training read them."""
    files = tg.shard_files(h.train_files)
    shards = [tg.load_shard(f) for f in files]
    sizes, last = [len(s) for s in shards], shards[-1]
    start = len(last) - (n_tokens + 1)
    if start < 0:
        raise ValueError(f"--tokens {n_tokens} is longer than the last train shard {files[-1]} ({len(last)} tokens)")
    bos = np.flatnonzero(last[start:] == tg.BOS_ID)
    if not len(bos):
        raise ValueError(f"no BOS in the last {n_tokens} tokens of {files[-1]}: cannot cut whole documents")
    start += int(bos[0])
    read = steps * (h.train_batch_tokens + 8)  # 8 micro-steps of (local + 1) tokens per rank, any world size
    heldout_begin = sum(sizes[:-1]) + start
    print(f"heldout: {files[-1]} tokens [{start}, {len(last)}) = {len(last) - start} tokens, whole documents; "
          f"train shards hold {sum(sizes)} tokens, {steps} steps read the first {read} "
          f"({100 * read / sum(sizes):.1f}%)")
    if read > heldout_begin:
        raise ValueError(f"{steps} steps read {read} train tokens, past the held-out start {heldout_begin}: "
                         f"the slice is not held out (use fewer --tokens)")
    tokens = last[start:]
    usable = ((len(tokens) - 1) // h.eval_seq_len) * h.eval_seq_len
    return torch.from_numpy(tokens[:usable + 1].astype(np.int32))


def val_tokens(h: tg.Hyperparameters, n_tokens: int) -> torch.Tensor:
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    if n_tokens > val.numel() - 1:
        raise ValueError(f"--tokens {n_tokens} is larger than the validation set ({val.numel() - 1} targets in "
                         f"{h.val_files})")
    if n_tokens:
        val = val[:(n_tokens // h.eval_seq_len) * h.eval_seq_len + 1]
    return val


def score(artifact: Path, h: tg.Hyperparameters, tokens: torch.Tensor, luts) -> tg.EvalResult:
    """One legal pass (train_gpt's adaptive_pass) over `tokens` with a freshly loaded artifact."""
    rt = tg.Runtime.local()
    torch.manual_seed(h.seed)
    model = tg.load_artifact(artifact, h, rt.device)
    fwd = tg.make_compile_fn(h, rt.device)(model)
    r, _, _ = tg.adaptive_pass(tg.EvalContext(h, rt, tokens, luts), model, fwd, time.perf_counter())
    return r


def report(label: str, r: tg.EvalResult) -> None:
    tracks = " ".join(f"{k}:{v:.5f}" for k, v in r.bpbs.items())
    print(f"RESULT {label} | {tracks} | declared:{r.val_bpb:.5f} pass_s:{r.seconds:.1f}", flush=True)


def env_text(value) -> str:
    """A field's value as its env var reads it (bools are 0/1)."""
    return str(int(value)) if isinstance(value, bool) else str(value)


def tune(artifact: Path, base_env: dict[str, str], tokens, luts, grid=GRID, min_gain: float = 1e-4) -> dict[str, str]:
    """Coordinate descent over grid (one sweep); returns the chosen env overrides. A value replaces the best so far
    only if it lowers the held-out bpb by at least min_gain (below that the difference is noise, and the default
    is kept: e.g. TTT_EPOCHS=2 buys 1e-5 for 1.5x the pass time)."""
    h0 = hparams(base_env)
    best = {k.upper(): env_text(getattr(h0, k)) for k in grid}
    best_bpb = None
    cache: dict[tuple, float] = {}
    for knob, values in grid.items():
        name = knob.upper()
        candidates = list(dict.fromkeys([best[name]] + values))
        for v in candidates:
            trial = {**best, name: v}
            key = tuple(sorted(trial.items()))
            if key not in cache:
                r = score(artifact, hparams({**base_env, **trial}), tokens, luts)
                cache[key] = r.val_bpb
                report(f"tune {name}={v}", r)
            if best_bpb is None or cache[key] < best_bpb - min_gain:
                best, best_bpb = trial, cache[key]
        print(f"chosen {name}={best[name]} heldout_bpb:{best_bpb:.5f}", flush=True)
    print("CHOSEN " + " ".join(f"{k}={v}" for k, v in best.items()) + f" heldout_bpb:{best_bpb:.5f}")
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--split", choices=("heldout", "val"), default="heldout")
    ap.add_argument("--tokens", type=int, default=None, help="slice length (heldout: 262144; val: 0 = all)")
    ap.add_argument("--steps", type=int, default=0, help="training steps of the artifact (default ITERATIONS)")
    ap.add_argument("--config", action="append", default=[], help='"K=V,K=V": one more pass with these knobs')
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--knobs", default="", help="comma-separated GRID knobs to tune (default: all, in GRID order)")
    ap.add_argument("--min-gain", type=float, default=1e-4, help="bpb a value must gain to replace the best (1e-4)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tokens is None:
        a.tokens = 262144 if a.split == "heldout" else 0
    if a.tokens < 0 or (a.split == "heldout" and a.tokens == 0):
        raise SystemExit(f"--tokens must be > 0 (>= 0 with --split val), got {a.tokens}")
    if a.tune and a.split != "heldout":
        raise SystemExit("--tune tunes on held-out train documents only, never on val")
    h = hparams({})
    luts = tg.load_byte_counter(h)
    try:
        tokens = (heldout_tokens(h, a.tokens, a.steps or h.iterations) if a.split == "heldout"
                  else val_tokens(h, a.tokens))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(f"split:{a.split} targets:{tokens.numel() - 1} artifact:{a.artifact} preset:{h.preset or '(none)'} "
          f"threads:{torch.get_num_threads()} (CPU)", flush=True)
    if a.tune:
        names = [k.strip().lower() for k in a.knobs.split(",") if k.strip()] or list(GRID)
        unknown = [k for k in names if k not in GRID]
        if unknown:
            raise SystemExit(f"--knobs: {unknown} not in the grid ({', '.join(GRID)})")
        tune(a.artifact, {}, tokens, luts, {k: GRID[k] for k in names}, a.min_gain)
        return 0
    for cfg in a.config or [""]:
        env = parse_config(cfg)
        report(cfg or "(env)", score(a.artifact, hparams(env), tokens, luts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
