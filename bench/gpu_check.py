#!/usr/bin/env python3
"""GPU check for one CUDA device (about 6 min on one H100; skips cleanly without CUDA).

Full default config (26.9M params) on synthetic shards:
  1. training: torch.compile time (both QAT variants), ms/step and tokens/s at 786,432 tokens/step, peak memory;
  2. artifact: quantize + compress (every codec) time and size (weights are barely trained: size is indicative);
  3. evaluation: plain and sliding windows/s, score-first TTT seconds per 32K chunk with n-gram/bias/Hedge on,
     n-gram precompute tokens/s, and the projected 8xH100 eval time for the 62,021,632-token FineWeb val set.

    python3 bench/gpu_check.py            # writes $OUT/gpu_check.json when OUT is set
    python3 bench/gpu_check.py --smoke    # tiny config, any device: checks this script's plumbing on CPU
"""
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FINEWEB_VAL_TOKENS = 62_021_632
TRAIN_STEPS, QAT_STEPS = (3, 2) if "--smoke" in sys.argv else (45, 15)


def synthetic_tokens(n: int, seed: int) -> np.ndarray:
    """A learnable stream: a random walk over the vocabulary with BOS every ~1200 tokens."""
    rng = np.random.default_rng(seed)
    toks = (np.cumsum(rng.integers(-3, 4, n)) % 1020 + 4).astype(np.uint16)
    toks[rng.random(n) < 1 / 1200] = 1
    return toks


def write_shard(path: Path, toks: np.ndarray) -> None:
    header = np.zeros(256, "<i4")
    header[:3] = (20240520, 1, len(toks))
    path.write_bytes(header.tobytes() + toks.astype("<u2").tobytes())


def fake_luts(vocab: int, device):
    """Every token 2 bytes (the check measures speed, not BPB)."""
    return (torch.full((vocab,), 2, dtype=torch.int16, device=device), torch.zeros(vocab, dtype=torch.bool, device=device),
            torch.zeros(vocab, dtype=torch.bool, device=device))


def timed(fn, device):
    import train_gpt as tg
    tg.sync(device)
    t0 = time.perf_counter()
    out = fn()
    tg.sync(device)
    return out, time.perf_counter() - t0


SMOKE = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, bigram_vocab_size=64, bigram_dim=8, xsa_last_n=1,
             ve_dim=8, ve_layers="1", train_seq_len=64, eval_seq_len=64, eval_stride=16, train_batch_tokens=4096,
             ttt_chunk_tokens=1024, ngram_table_bits=12)


def main() -> int:
    smoke = "--smoke" in sys.argv
    if not torch.cuda.is_available() and not smoke:
        print("gpu_check: skipped (no CUDA device)")
        return 0
    import train_gpt as tg
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    work = Path(tempfile.mkdtemp())
    write_shard(work / "fineweb_train_000000.bin", synthetic_tokens(20_000_000, 0))
    rt = tg.init_runtime()
    dev = rt.device
    h = dataclasses.replace(tg.Hyperparameters.from_env({}), data_path=str(work), max_wallclock_seconds=0.0, **(SMOKE if smoke else {}))
    res = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)", torch=torch.__version__)
    res["attention_backend"] = backend = tg.select_attention_backend("auto", dev)
    print(json.dumps(res), flush=True)

    def save():
        (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=2))

    # 1. training ------------------------------------------------------------------------------
    torch.manual_seed(0)
    model = tg.build_model(h).to(dev)
    model.attn_backend = backend
    fwd = tg.make_compile_fn(h, dev)(model)
    opt = tg.Optimizers(h, model, rt)
    loader = tg.DistributedTokenLoader(str(work / "fineweb_train_*.bin"), rt)
    opt.set_schedule(0, 1.0)
    _, res["compile_s"] = timed(lambda: [tg.train_step(h, rt, fwd, opt, loader, q) for q in (False, True, False, True)], dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    losses = []
    _, t = timed(lambda: losses.extend(tg.train_step(h, rt, fwd, opt, loader, False).item() for _ in range(TRAIN_STEPS)), dev)
    res["ms_per_step"] = 1000 * t / TRAIN_STEPS
    _, t = timed(lambda: losses.extend(tg.train_step(h, rt, fwd, opt, loader, True).item() for _ in range(QAT_STEPS)), dev)
    res["ms_per_step_qat"] = 1000 * t / QAT_STEPS
    res["tokens_per_s"] = h.train_batch_tokens / res["ms_per_step"] * 1000
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    res["loss_first_last"] = [losses[0], losses[-1]]
    res["projected_steps_in_600s_8gpu_no_comm"] = int(600_000 / (res["ms_per_step"] / 8))
    print(json.dumps(res), flush=True)
    save()

    # 2. artifact -------------------------------------------------------------------------------
    path = work / "final_model.int6.ptz"
    (size, codec), res["export_s"] = timed(lambda: tg.export_artifact(h, rt, model, path), dev)
    res["artifact_bytes_barely_trained"], res["codec"] = size, codec
    model, res["artifact_load_s"] = timed(lambda: tg.load_artifact(path, h, dev), dev)
    model.attn_backend = backend
    print(json.dumps(res), flush=True)
    save()

    # 3. evaluation -----------------------------------------------------------------------------
    luts = fake_luts(h.vocab_size, dev)
    scorer = tg.make_compile_fn(h, dev)(model)
    scale = 16 if smoke else 1
    val_small = torch.from_numpy(synthetic_tokens(2 * 65536 // scale + 1, 1).astype(np.int32))
    tg.run_pass(h, rt, scorer, val_small, luts, h.eval_seq_len)  # compile warm-up (plain and sliding shapes)
    tg.run_pass(h, rt, scorer, val_small, luts, h.eval_stride)
    val = torch.from_numpy(synthetic_tokens(1_048_576 // scale + 1, 2).astype(np.int32))
    r, t = timed(lambda: tg.run_pass(h, rt, scorer, val, luts, h.eval_seq_len), dev)
    res["plain_tokens_per_s"] = r.tokens / t
    r, t = timed(lambda: tg.run_pass(h, rt, scorer, val, luts, h.eval_stride), dev)
    n_win = len(tg.plan_windows(val.numel() - 1, h.eval_seq_len, h.eval_stride))
    res["sliding_windows_per_s"] = n_win / t
    tg.ngram_candidates(val_small.numpy(), 1, 2, 8, 2, 1)  # numba JIT compile (cached on disk) outside the timing
    t0 = time.perf_counter()
    tg.ngram_candidates(val.numpy(), h.ngram_min_order, h.ngram_max_order, h.ngram_table_bits, h.ngram_top_k, h.ngram_min_count)
    res["ngram_tokens_per_s"] = val.numel() / (time.perf_counter() - t0)
    print(json.dumps(res), flush=True)
    save()
    n_chunks = 10
    val_ttt = torch.from_numpy(synthetic_tokens(n_chunks * h.ttt_chunk_tokens + 1, 3).astype(np.int32))
    warm = torch.from_numpy(synthetic_tokens(2 * h.ttt_chunk_tokens + 1, 4).astype(np.int32))
    _, res["ttt_warmup_s"] = timed(lambda: tg.adaptive_pass(h, rt, model, warm, luts, time.perf_counter()), dev)
    model = tg.load_artifact(path, h, dev)
    model.attn_backend = backend
    _, t = timed(lambda: tg.adaptive_pass(h, rt, model, val_ttt, luts, time.perf_counter()), dev)
    res["pass_s_per_chunk"] = t / n_chunks
    n_fw = math.ceil(FINEWEB_VAL_TOKENS / h.ttt_chunk_tokens)
    proj = dict(roundtrip=FINEWEB_VAL_TOKENS / res["plain_tokens_per_s"] / 8,
                sliding_diag=FINEWEB_VAL_TOKENS / h.eval_stride / res["sliding_windows_per_s"] / 8,
                ngram=FINEWEB_VAL_TOKENS / res["ngram_tokens_per_s"],
                adaptive_pass=n_fw * res["pass_s_per_chunk"] / 8,
                export=res["export_s"], load=res["artifact_load_s"])
    proj["total"] = sum(proj.values())
    res["projected_8xh100_eval_s"] = proj
    res["projection_note"] = ("per-GPU work / 8, no communication cost; the pass's n-gram stage counted once "
                              "(every rank runs it on its own CPU cores)")
    print(json.dumps(res, indent=1), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
