#!/usr/bin/env python3
"""The PR #549 stack and the frontier stack side by side on CPU, at matched small dims and steps (CPU only).

    python3 data/build_offline_corpus.py --variants sp1024,sp8192,sp8192-caseops     # once: the three variants
    python3 bench/bench_frontier_cpu.py [--steps 150] [--heldout-docs 300] [--rows NAME,...] [--log OUT.log]

Every row trains from the same seed for --steps steps of 8,192 tokens (4 layers, d 128, 4 heads / 2 KV, sequences
of 256) through train_gpt's own train(), then scores the float model (no export: this compares training, not the
artifact) on held-out TRAINING documents: the last --heldout-docs documents of the stand-in's train stream, which
--steps x 8,192 tokens never reach (checked). The three data variants hold the same documents in the same order, so
every row scores the same texts (checked by decoding them) over the same byte count: the plain variants' LUT bytes,
the CaseOps variant's original bytes from data/caseops.py (reported side by side; they must agree).

Rows: the #549 architecture (its CPU preset's training config) and the frontier architecture on sp1024; the frontier
on sp8192 and on sp8192-CaseOps; then the frontier on sp1024 with one lever switched off per row (depth recurrence,
the two lanes, the gates, MLP 4x -> 3x, the Muon changes, document masking). The frontier rows keep the record's
optimizer values; the small model scales the layer indices (loop layers 1-2, lanes from layer 3) and the momentum
warmup (to a quarter of the steps, like the CPU preset's 100 of 450). tokens/s is training throughput on this machine
(noisy: compare rows of one run only).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import caseops  # noqa: E402
import train_gpt as tg  # noqa: E402

STANDIN = ROOT / "data" / "standin"
VARIANTS = {  # dataset folder, tokenizer file, CaseOps
    "sp1024": ("fineweb10B_sp1024", STANDIN / "tokenizers" / "fineweb_1024_bpe.model", False),
    "sp8192": ("fineweb10B_sp8192", ROOT / "data" / "tokenizers" / "fineweb_8192_bpe.model", False),
    "sp8192-caseops": ("fineweb10B_sp8192_caseops",
                       ROOT / "data" / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
                       True),
}
SMALL = dict(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, train_seq_len=256, eval_seq_len=256,
             eval_stride=128, eval_batch_seqs=64, train_batch_tokens=8192, max_wallclock_seconds=0.0,
             warmup_steps=0, val_loss_every=0, torch_compile="0", gptq_enabled=False, ttt_enabled=False)
FRONTIER_SMALL = dict(loop_start=1, loop_end=2, parallel_start_layer=3, xsa_last_n=4)
CPU_PRESET_TRAINING = ("bigram_vocab_size", "bigram_dim", "xsa_last_n", "ve_dim", "ve_layers", "matrix_lr",
                       "scalar_lr", "tied_embed_lr")
LEVERS = {  # one lever of the frontier switched off
    "loop off": dict(num_loops=0),
    "lanes off": dict(parallel_start_layer=0),
    "gates off": dict(smear_gate="off", attn_gate=False, skip_gates=False),
    "MLP 3x": dict(mlp_mult=3.0),
    "Muon changes off": dict(muon_ns="quintic", muon_eq_r=False),
    "doc mask off": dict(doc_mask=False),
}


def rows(steps: int) -> dict[str, tuple[str, dict]]:
    """{row name: (variant, Hyperparameters overrides)}."""
    warm = dict(muon_momentum_warmup_steps=max(steps // 4, 1), iterations=steps)
    pr549 = dict(tg.PR549, **{k: tg.PRESETS["cpu"][k] for k in CPU_PRESET_TRAINING}, **SMALL, **warm,
                 warmdown_iters=max(steps // 3, 1))
    frontier = dict(SMALL, **FRONTIER_SMALL, **warm)
    out = {"#549 (cpu preset's training)": ("sp1024", pr549), "frontier": ("sp1024", frontier),
           "frontier sp8192": ("sp8192", frontier), "frontier sp8192-CaseOps": ("sp8192-caseops", frontier)}
    out.update({f"frontier: {k}": ("sp1024", dict(frontier, **v)) for k, v in LEVERS.items()})
    return out


def heldout(variant: str, n_docs: int) -> dict:
    """The last n_docs documents of the variant's train stream: tokens (BOS first, the next BOS last, so every
    document's last target is scored), their texts, and the byte counter of that stream."""
    import sentencepiece as spm
    ds, tok, is_caseops = VARIANTS[variant]
    files = tg.shard_files(str(STANDIN / "datasets" / ds / tg.SHARD_GLOB.format(split="train")))
    stream = np.concatenate([tg.load_shard(f) for f in files])
    bos = np.flatnonzero(stream == tg.BOS_ID)
    start = int(bos[-n_docs - 1])
    ids = np.concatenate((stream[start:bos[-1]], [tg.BOS_ID])).astype(np.int32)  # the stream's last doc is left out
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    docs = np.split(ids[:-1], np.flatnonzero(ids[:-1] == tg.BOS_ID)[1:])
    texts = [sp.decode(d[1:].tolist()) for d in docs]
    if is_caseops:
        texts = [caseops.decode(t) for t in texts]
        surfaces = caseops.piece_surfaces(sp)
        side = np.zeros(len(ids), np.int32)
        pos = 0
        for d in docs:
            side[pos + 1:pos + len(d)] = caseops.original_byte_counts([surfaces[i] for i in d[1:]])
            pos += len(d)
        counter = tg.ByteCounter(sidecar=torch.from_numpy(side))
    else:
        counter = tg.ByteCounter(luts=tg.build_bpb_luts(sp, sp.vocab_size()))
    return dict(ids=torch.from_numpy(ids), texts=texts, counter=counter, start=start, train_tokens=len(stream),
                vocab=sp.vocab_size(), data_path=str(STANDIN / "datasets" / ds), tokenizer=str(tok))


def run_row(name: str, variant: str, overrides: dict, data: dict, seed: int) -> dict:
    h = tg.Hyperparameters(**{**overrides, "data_path": data["data_path"], "tokenizer_path": data["tokenizer"],
                              "vocab_size": data["vocab"], "seed": seed, "train_log_every": 10 ** 9,
                              "run_id": f"bench {name}"})
    read = h.iterations * h.train_batch_tokens + 1
    if read > data["start"]:
        raise ValueError(f"{name}: {h.iterations} steps read {read} train tokens, past the held-out documents "
                         f"(from token {data['start']})")
    torch.manual_seed(h.seed)
    model = tg.build_model(h)
    n_params = sum(p.numel() for p in model.parameters())
    ctx = tg.EvalContext(h, tg.Runtime.local(), data["ids"], data["counter"])
    steps, train_ms, fwd = tg.train(ctx, model)
    t0 = time.perf_counter()
    r = tg.run_pass(ctx, tg.FixedScorer(fwd), h.eval_stride)
    return dict(row=name, variant=variant, params=n_params, steps=steps, train_s=train_ms / 1000,
                tokens_per_s=steps * h.train_batch_tokens / (train_ms / 1000), heldout_loss=r.val_loss,
                heldout_bpb=r.val_bpb, heldout_tokens=r.tokens, heldout_bytes=r.bytes,
                score_s=time.perf_counter() - t0)


def check_same_documents(data: dict) -> None:
    """Every variant's held-out documents are the same texts (the builder writes one order for all variants)."""
    ref_name, ref = next(iter(data.items()))
    for name, d in data.items():
        if d["texts"] != ref["texts"]:
            bad = next(i for i, (a, b) in enumerate(zip(d["texts"], ref["texts"])) if a != b)
            raise ValueError(f"held-out document {bad} differs between {ref_name} and {name}: rebuild the stand-in "
                             "with all variants in one run (data/build_offline_corpus.py --variants ...)")


def table(results: list[dict]) -> str:
    base = next((r["heldout_bpb"] for r in results if r["row"] == "frontier"), None)
    lines = ["| row | data | params | held-out bpb | vs frontier (sp1024) | tokens/s |", "|---|---|---|---|---|---|"]
    for r in results:
        delta = f"{r['heldout_bpb'] - base:+.4f}" if base is not None and r["row"] != "frontier" else ""
        lines.append(f"| {r['row']} | {r['variant']} | {r['params']:,} | {r['heldout_bpb']:.4f} | {delta} "
                     f"| {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--heldout-docs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--log", help="also write the table and per-row JSON lines here")
    args = ap.parse_args(argv)
    plan = rows(args.steps)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()] or list(plan)
    unknown = [r for r in wanted if r not in plan]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {list(plan)}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = {v: heldout(v, args.heldout_docs) for v in sorted({plan[r][0] for r in wanted})}
    check_same_documents(data)
    byte_note = " ".join(f"{v}:{int(d['counter'](torch.arange(len(d['ids']) - 1), d['ids'][:-1].long(), d['ids'][1:].long()).sum())}"
                         for v, d in data.items())
    print(f"held-out: {args.heldout_docs} documents, bytes by variant {byte_note}", flush=True)
    results, out = [], []
    for name in wanted:
        variant, overrides = plan[name]
        res = run_row(name, variant, overrides, data[variant], args.seed)
        results.append(res)
        line = json.dumps(res)
        out.append(line)
        print(line, flush=True)
    text = table(results)
    print(text)
    if args.log:
        head = [f"bench_frontier_cpu steps:{args.steps} heldout_docs:{args.heldout_docs} seed:{args.seed} "
                f"torch:{torch.__version__} threads:{torch.get_num_threads()}", f"held-out bytes {byte_note}"]
        Path(args.log).write_text("\n".join(head + out + [text]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
