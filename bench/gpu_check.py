#!/usr/bin/env python3
"""Device check on one CUDA GPU: one script, at most --budget-s seconds (default 450, under 8 minutes), writing
$OUT/gpu_check.json (or --out PATH) after every section, so a cut-short run still leaves what it measured.

Full default config (the 04-27 record's model: 35.9M params, 786,432 tokens/step = 8 micro-batches of 48x2048 on
one GPU), synthetic shards:
  1. attention: every candidate kernel's forward+backward ms at the run's shape, document-masked as training runs it
     (FA3/FA2 varlen, SDPA with a block-diagonal mask: the start-up measurement), and the kernel start-up would choose;
  2. PRESET=1gpu's schedule, first 30 steps, through the real train() loop (compile warmup over the loop and QAT
     variants, GPTQ's measured reserve and Hessian collection, the one-sync-per-step clock): compile time, ms/step,
     tokens/s, peak memory;
  3. the training step before and after the depth-recurrence switch (looping off / on), and with and without QAT
     where the config uses it (the compiled model of 2), each with its peak memory;
  4. evaluation on 8 ranks, projected (issue 9): one rank's real share measured on this GPU (rank 0 of 8: each chunk
     with 1/8 of its windows and 1/8 of its TTT sequences, every per-batch and per-step overhead included) plus the
     collectives modelled from --busbw-gbs and --latency-ms, beside the naive figure (1-rank time / 8), phase by
     phase, for the FineWeb validation set of the default dataset (47,853,344 tokens, sp8192 CaseOps); and the
     frontier's pass (docs plan, per-document LoRA TTT, phases at boundaries scaled to the sample's documents),
     rank 0 of 8 and 1 rank measured, projected by tokens (an alternative pass: not in the total);
  5. ms/step and tokens/s at the full config for every other attention candidate (one compile each), as long as
     the budget lasts (skipped ones say so);
  6. the fused Triton kernels (MLP, softcapped CE): start-up's fwd+bwd table and choice (made before section 2, whose
     training uses it), and ms/step with each FUSED_KERNELS value (eager, mlp, ce, both; run before section 5)
     while the budget lasts. --smoke lists the kernels only (their CPU tests: tests/test_kernels.py).

    python3 bench/gpu_check.py [--out gpu_check.json] [--budget-s 450] [--busbw-gbs 200] [--latency-ms 0.05]
    python3 bench/gpu_check.py --smoke    # tiny config on the CPU in seconds: the plumbing only, no GPU figure
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import train_gpt as tg  # noqa: E402

# FineWeb validation tokens by dataset (the projection's length): sp1024, plain sp8192, sp8192 CaseOps
FINEWEB_VAL_TOKENS = {"fineweb10B_sp1024": 62_021_632, "fineweb10B_sp8192": 40_540_160,
                      "fineweb10B_sp8192_caseops": 47_853_344}
VAL_TOKENS = FINEWEB_VAL_TOKENS[Path(tg.Hyperparameters().data_path).name]  # the default config's dataset
WORLD = 8  # the ranks of the projected evaluation
FINEWEB_VAL_DOCS = 50_000  # documents in the challenge's validation split
# --smoke: a tiny model, a short stream, a few steps; every path of the full check runs.
SMOKE = dict(num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0, vocab_size=1024, loop_start=1,
             loop_end=2, parallel_start_layer=3, xsa_last_n=4, gate_dims=8, rope_dims=4, train_seq_len=32, eval_seq_len=32,
             eval_stride=16, eval_batch_seqs=8, train_batch_tokens=512, ttt_chunk_tokens=256, ttt_batch_seqs=8,
             ttt_epochs=1, ngram_table_bits=12, torch_compile="0", compressor="lzma")


def synthetic_tokens(n: int, seed: int) -> np.ndarray:
    """A learnable stream: a random walk over the vocabulary with BOS every ~1200 tokens."""
    rng = np.random.default_rng(seed)
    toks = (np.cumsum(rng.integers(-3, 4, n)) % 1020 + 4).astype(np.uint16)
    toks[rng.random(n) < 1 / 1200] = tg.BOS_ID
    return toks


def fake_luts(vocab: int, device):
    """Every token 2 bytes: the check measures time, not BPB."""
    flags = torch.zeros(vocab, dtype=torch.bool, device=device)
    return tg.ByteCounter((torch.full((vocab,), 2, dtype=torch.int16, device=device), flags, flags))


def timed(fn, device):
    tg.sync(device)
    t0 = time.perf_counter()
    out = fn()
    tg.sync(device)
    return out, time.perf_counter() - t0


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


class Budget:
    """Wallclock left for the check; a section that would not fit is skipped with its reason."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, res: dict, key: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        res[key] = f"skipped: {self.left():.0f} s of budget left, needs ~{need_s:.0f} s"
        return False


def attention_section(h, rt, res: dict) -> str:
    shape = tg.attention_shape(h)
    cands = tg.attention_candidates(rt.device)
    table = tg.measure_attention(cands, shape, rt.device, tg.compile_enabled(h, rt.device), doc_mask=h.doc_mask)
    notes = []
    choice = tg.resolve_attention("auto", rt.device, shape, notes, tg.compile_enabled(h, rt.device), h.doc_mask)
    res["attention"] = dict(shape_B_T_H_KV_D=list(shape), doc_mask=h.doc_mask, fwd_bwd_ms=table, chosen=choice,
                            log_line=notes[:1])
    return choice


def fused_section(h, rt, res: dict) -> str:
    """The fused kernels and, on CUDA, start-up's measured choice (its log line holds the fwd+bwd table)."""
    try:
        import triton
        version = triton.__version__
    except ImportError:
        version = None
    out = res["fused_kernels"] = dict(kernels=list(tg.FUSED_CHOICES["1"]), triton=version)
    if rt.device.type != "cuda":
        out["note"] = "unmeasured: no GPU"
        return "0"
    notes = []
    out["chosen"] = tg.resolve_fused("auto", rt.device, tg.fused_shape(h), notes, tg.compile_enabled(h, rt.device))
    out["log_line"] = notes[:1]
    return out["chosen"]


def step_timing(h, rt, fwd, model, steps: int, qat: bool, looping: bool = True) -> dict:
    """ms/step, tokens/s and peak memory of `steps` real optimizer steps (8 micro-batches each) after one untimed
    step, with the depth-recurrence loop off or on (its flag restored after)."""
    opt = tg.Optimizers(h, model, rt)
    loader = tg.DistributedTokenLoader(h.train_files, rt)
    opt.set_schedule(0, 1.0)
    was, model.looping = model.looping, looping
    tg.train_step(h, rt, fwd, opt, loader, qat)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    _, t = timed(lambda: [tg.train_step(h, rt, fwd, opt, loader, qat) for _ in range(steps)], rt.device)
    model.looping = was
    return dict(ms_per_step=1000 * t / steps, tokens_per_s=h.train_batch_tokens * steps / t,
                peak_mem_gib=peak_gib(rt.device))


def training_section(h, rt, val, luts, res: dict, work: Path, steps: int):
    """PRESET=1gpu's first `steps` steps through the real train(); returns the trained model and its compiled fwd."""
    h1 = dataclasses.replace(h, **{k: v for k, v in tg.PRESETS["1gpu"].items() if k not in SMOKE}, iterations=steps,
                             warmup_steps=2, val_loss_every=0, train_log_every=10, run_id="gpu_check_1gpu",
                             ema_min_steps=steps + 1)
    log = work / "logs" / "gpu_check_1gpu.txt"
    tg.init_logging(log, True)
    torch.manual_seed(h1.seed)
    model = tg.build_model(h1).to(rt.device)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    (n, train_ms, fwd), wall = timed(lambda: tg.train(tg.EvalContext(h1, rt, val, luts), model), rt.device)
    tg.init_logging(None, True)
    lines = log.read_text(encoding="utf-8").splitlines()
    compile_ms = next(float(l.split(":")[1][:-2]) for l in lines if l.startswith("compile_time:"))
    res["train_1gpu_preset"] = dict(steps=n, ms_per_step=train_ms / n, tokens_per_s=h1.train_batch_tokens * n / train_ms * 1000,
                                    compile_s=compile_ms / 1000, wall_s=wall, peak_mem_gib=peak_gib(rt.device),
                                    log_tail=[l for l in lines if l.startswith(("step:", "compile", "qat:", "ema:"))][-6:],
                                    # the measured reserve must cover the collection (GPTQ_CALIB_BATCHES batches)
                                    gptq=[l for l in lines if l.startswith(("gptq_reserve:", "gptq_calibration "))])
    return h1, model, fwd


def comm_ms(nbytes: float, args) -> float:
    """Ring all-reduce time of nbytes across WORLD ranks: latency + 2 (n-1)/n bytes / bus bandwidth."""
    return args.latency_ms + 2 * (WORLD - 1) / WORLD * nbytes / (args.busbw_gbs * 1e9) * 1000


def eval_phase(ctx1, ctx8, run, sample_units: float, full_units: float, comm_s: float, stride: int, chunk: int) -> dict:
    """Run a phase as 1 rank and as rank 0 of 8 on the same sample; project both to the full validation set."""
    (_, t1) = run(ctx1)
    (_, t8) = run(ctx8)
    scale = full_units / sample_units
    windows = [sum(len(s.mine) for s in tg.plan_chunks(c, stride, chunk)) for c in (ctx1, ctx8)]
    return dict(sample_1rank_s=t1, sample_rank0_of_8_s=t8, naive_div8_s=t1 * scale / WORLD,
                one_rank_share_s=t8 * scale + comm_s, comm_modelled_s=comm_s, windows_1rank=windows[0],
                windows_rank0_of_8=windows[1])


def eval_section(h, rt, model_path: Path, luts, res: dict, args, n_chunks: int, budget: Budget, need_pass_s: float):
    """Issue 9's projection: rank 0's share of the 8-rank evaluation, measured here, beside the naive /8."""
    dev = rt.device
    rt8 = tg.Runtime(0, 0, WORLD, dev)  # no process group: every collective is a no-op, so only rank 0's work runs
    sample = torch.from_numpy(synthetic_tokens(n_chunks * h.ttt_chunk_tokens + 1, 7).astype(np.int32))
    model = tg.load_artifact(model_path, h, dev)
    fwd = tg.make_compile_fn(h, dev)(model)
    ctx1, ctx8 = tg.EvalContext(h, rt, sample, luts), tg.EvalContext(h, rt8, sample, luts)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    proj = {}
    for name, stride in (("roundtrip_plain", h.eval_seq_len), ("sliding_diagnostic", h.eval_stride)):
        run = lambda c, s=stride: timed(lambda: tg.run_pass(c, tg.FixedScorer(fwd), s), dev)  # noqa: E731
        if tg.compile_enabled(h, dev):
            run(ctx1), run(ctx8)  # compile the scoring shapes
        proj[name] = eval_phase(ctx1, ctx8, run, sample.numel(), VAL_TOKENS, comm_ms(64, args) / 1000, stride, 0)
        if not budget.allows(res, "eval_projection_pass", need_pass_s):
            res["eval_projection_8ranks"] = proj
            return
    n_fw = math.ceil(VAL_TOKENS / h.ttt_chunk_tokens)
    per_chunk_comm = (h.ttt_epochs * comm_ms(4 * n_params, args) + 2 * comm_ms(8 * (h.vocab_size + 1), args)) / 1000

    def adaptive(c):  # a fresh artifact model each time: TTT trains it in place
        m = tg.load_artifact(model_path, h, dev)
        r, t = timed(lambda: tg.adaptive_pass(c, m, tg.make_compile_fn(h, dev)(m), time.perf_counter())[0], dev)
        return r, r.seconds  # the pass itself; the n-gram build is its own phase below

    if tg.compile_enabled(h, dev):
        adaptive(ctx1), adaptive(ctx8)  # compile TTT, the Polyak copy and the scoring shapes of both layouts
    proj["adaptive_pass"] = eval_phase(ctx1, ctx8, adaptive, n_chunks, n_fw, n_fw * per_chunk_comm, h.eval_stride,
                                       h.ttt_chunk_tokens)
    T = h.eval_seq_len  # TTT sequences per chunk: all of them on 1 rank, rank 0's slice of 8
    proj["adaptive_pass"]["ttt_seqs_per_chunk_1rank"] = h.ttt_chunk_tokens // T
    proj["adaptive_pass"]["ttt_seqs_per_chunk_rank0_of_8"] = (h.ttt_chunk_tokens // T) // WORLD
    t0 = time.perf_counter()
    tg.ngram_candidates(sample.numpy(), h.ngram_min_order, h.ngram_max_order, h.ngram_table_bits, h.ngram_top_k,
                        h.ngram_min_count)
    ng = (time.perf_counter() - t0) * VAL_TOKENS / sample.numel()
    proj["ngram_build"] = dict(naive_div8_s=ng, one_rank_share_s=ng, note="every rank builds the whole table")
    for k in ("naive_div8_s", "one_rank_share_s"):
        proj.setdefault("total", {})[k] = sum(v[k] for v in proj.values() if isinstance(v, dict) and k in v)
    proj["assumptions"] = dict(busbw_gbs=args.busbw_gbs, latency_ms=args.latency_ms, trainable_params=n_params,
                               ttt_grad_allreduce_ms=comm_ms(4 * n_params, args), sample_chunks=n_chunks,
                               fineweb_chunks=n_fw, note="collectives modelled, not measured; export/load add "
                               "their own time on rank 0 (export_s, artifact_load_s)")
    if budget.allows(res, "eval_projection_docs_lora", need_pass_s):
        proj["docs_lora_pass"] = docs_lora_phase(h, rt, rt8, model_path, luts, sample)
    res["eval_projection_8ranks"] = proj


def docs_lora_phase(h, rt, rt8, model_path: Path, luts, sample: torch.Tensor) -> dict:
    """The frontier's pass (EVAL_PLAN=docs, TTT_MODE=lora, no Hedge over the tables), its TTT_PHASES scaled from
    FineWeb val's documents to the sample's: 1 rank and rank 0 of 8 (a static assignment, so rank 0's batches are
    known without the other ranks; phase gradients are all-reduced there, not modelled), projected by tokens."""
    sample = sample.clone()
    sample[0] = tg.BOS_ID  # the val shards start with a document; the random BOS every ~1,200 tokens do the rest
    n_docs = len(tg.find_docs(sample))
    phases = sorted({max(1, round(b * n_docs / FINEWEB_VAL_DOCS)) for b in h.ttt_phase_list})
    hd = dataclasses.replace(h, eval_plan="docs", ttt_enabled=True, ttt_mode="lora", hedge_enabled=False,
                             ttt_chunk=min(h.ttt_chunk, h.eval_seq_len), lora_rank=min(h.lora_rank, h.model_dim),
                             ttt_phases=",".join(map(str, phases)))

    def run(r):
        m = tg.load_artifact(model_path, hd, r.device)
        return tg.adaptive_pass(tg.EvalContext(hd, r, sample, luts), m, m, time.perf_counter())[0].seconds

    t1, t8, scale = run(rt), run(rt8), VAL_TOKENS / sample.numel()
    return dict(sample_1rank_s=t1, sample_rank0_of_8_s=t8, naive_div8_s=t1 * scale / WORLD, one_rank_share_s=t8 * scale,
                sample_docs=n_docs, sample_phases=phases, lora_rank=hd.lora_rank,
                note="projected by tokens; collectives (phase gradients) not modelled; not part of total")


def candidates_section(h, rt, res: dict, chosen: str | None, budget: Budget, steps: int, need_s: float,
                       key: str = "attn_backend", cands=None) -> None:
    """Full-config ms/step for every other working attention kernel (or value of `key` in cands): one compile each,
    while the budget lasts."""
    out = res.setdefault("train_step_per_kernel" if key == "attn_backend" else f"train_step_per_{key}", {})
    cands = res["attention"]["fwd_bwd_ms"] if cands is None else cands
    for b, ms in cands.items():
        if b == chosen or not isinstance(ms, float) or not budget.allows(out, b, need_s):
            continue
        torch._dynamo.reset()
        torch.manual_seed(h.seed)
        hb = dataclasses.replace(h, **{key: b})
        model = tg.build_model(hb).to(rt.device)
        fwd = tg.make_compile_fn(hb, rt.device)(model)  # compiles lazily, inside the untimed first step
        t0 = time.perf_counter()
        out[b] = step_timing(hb, rt, fwd, model, steps, False)
        out[b]["first_step_and_compile_s"] = time.perf_counter() - t0 - out[b]["ms_per_step"] * steps / 1000


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the plumbing in seconds")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json, else a temp dir)")
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--busbw-gbs", type=float, default=200.0, help="assumed NCCL all-reduce bus bandwidth, GB/s")
    ap.add_argument("--latency-ms", type=float, default=0.05, help="assumed latency of one collective, ms")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: skipped (no CUDA device); --smoke checks the plumbing on CPU")
        return 0
    budget = Budget(args.budget_s)
    # One process compiles several models and shapes (train, eval at 1 and 8 ranks, TTT, kernels): past dynamo's
    # default 8 recompiles per function it would fall back to eager and the timings would mean nothing.
    torch._dynamo.config.cache_size_limit = 64
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or tempfile.mkdtemp()) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to a shared machine
    rt = tg.Runtime.local("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dev = rt.device
    tg.write_shard(work / tg.SHARD_NAME.format(split="train", index=0), synthetic_tokens(200_000 if args.smoke else 20_000_000, 0))
    h = dataclasses.replace(tg.Hyperparameters.from_env({}), data_path=str(work), out_dir=str(work),
                            **(SMOKE if args.smoke else {}))
    res = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (--smoke: plumbing only, "
               "unmeasured on GPU)", torch=torch.__version__, smoke=args.smoke, budget_s=args.budget_s)

    def save(section: str):
        res["elapsed_s"] = args.budget_s - budget.left()
        out.write_text(json.dumps(res, indent=1))
        print(f"gpu_check: {section} done at {res['elapsed_s']:.0f} s -> {out}", flush=True)

    luts = fake_luts(h.vocab_size, dev)
    val = torch.from_numpy(synthetic_tokens(8 * h.eval_seq_len + 1, 1).astype(np.int32))
    chosen = attention_section(h, rt, res)
    save("attention")
    fused = fused_section(h, rt, res)
    save("fused_kernels")
    h = dataclasses.replace(h, attn_backend=chosen, fused_kernels=fused)
    h1, model, fwd = training_section(h, rt, val, luts, res, work, 2 if args.smoke else 30)
    save("train_1gpu_preset")
    n = 1 if args.smoke else 5
    qat = h1.qat_enabled or h1.late_qat_threshold > 0
    res["train_step_loop"] = {"off": step_timing(h1, rt, fwd, model, n, h1.qat_enabled, looping=False),
                              "on": step_timing(h1, rt, fwd, model, n, h1.qat_enabled, looping=True)}
    if qat:
        res["train_step_qat"] = {"off": step_timing(h1, rt, fwd, model, n, False),
                                 "on": step_timing(h1, rt, fwd, model, n, True)}
    save("train_step_loop")
    path = work / "final_model.int6.ptz"
    (size, codec), res["export_s"] = timed(lambda: tg.export_artifact(h, rt, model, path), dev)
    res["artifact_bytes_barely_trained"], res["codec"] = size, codec
    _, res["artifact_load_s"] = timed(lambda: tg.load_artifact(path, h, dev), dev)
    del model, fwd
    torch._dynamo.reset()
    if budget.allows(res, "eval_projection_8ranks", 200 if not args.smoke else 1):
        eval_section(h, rt, path, luts, res, args, 2 if args.smoke else 6, budget, 1 if args.smoke else 120)
        save("eval_projection_8ranks")
    if dev.type == "cuda":  # every FUSED_KERNELS value (eager, mlp, ce, both), timed alike
        candidates_section(h, rt, res, None, budget, 5, 75, "fused_kernels", {c: 0.0 for c in tg.FUSED_CHOICES})
        save("train_step_per_fused_kernels")
    candidates_section(h, rt, res, chosen, budget, 1 if args.smoke else 5, 1 if args.smoke else 75)
    save("train_step_per_kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
