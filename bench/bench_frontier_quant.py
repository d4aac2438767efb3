"""The frontier artifact on CPU: quantization penalty by method, and bytes and times by codec (CPU numbers only).

    python3 bench/bench_frontier_quant.py --part penalty     # one small frontier-config model, trained here
    python3 bench/bench_frontier_quant.py --part codecs      # Gaussian weights at the full frontier config shapes
    python3 bench/bench_frontier_quant.py --part codecs --trained-steps N   # the full config trained N steps first
    python3 bench/bench_frontier_quant.py                    # both; --json PATH writes the rows

penalty: one model with the frontier's quantization defaults (vocab 1024 stand-in corpus, 4 x 128, MLP x4) trained
--steps fixed steps through train_gpt.train() with GPTQ on (so its Hessians come from the real collection), then the
SAME weights quantized each way and scored on the first --val-tokens stand-in val tokens (non-overlapping windows):
  rtn-absmax        int6 banks / int7 embedding, scale max|row| / R, rounded
  gptq-lite         the seed's: int6 banks at the best of 5 clip percentiles, int8 embedding (no Hessian)
  sdclip-rtn        the SDClip grid (k std / R by group), rounded
  sdclip-gptq       the SDClip grid with GPTQ on every matrix (the embedding from the head input); MLP sort on
  sdclip-gptq+lqer  + LQER rank 4 on the 3 worst matrices (the frontier default)
then, per --qat-thresholds value, one more model trained the same way with late QAT (fake quantization on the
export's SDClip grid once the LR multiplier drops below it) and its SDClip rows, each against its own float score.
bytes: brotli+shuffle and pergroup (ZPAQ) of each payload. The machine is shared: times are rough.
codecs: the frontier's full shapes (11 x 512, MLP 2048, vocab 8192) with Gaussian weights, or with --trained-steps the
default config trained that many steps on the sp8192-caseops stand-in at --batch-tokens / --seq-len (GPTQ off), both
SDClip-rounded (GPTQ does not change the sizes' order); each codec's bytes, compress and decompress seconds;
pergroup with the sorts (embedding rows stored, MLP hidden order absorbed) and without.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

STANDIN = ROOT / "data" / "standin"
TOKENIZER_8192 = Path(tg.Hyperparameters.tokenizer_path).name  # the stand-in builds it under the same name
SMALL = dict(vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, xsa_last_n=4, num_loops=0,
             parallel_start_layer=0, train_seq_len=256, eval_seq_len=256, eval_stride=128, train_batch_tokens=8192,
             warmup_steps=0, max_wallclock_seconds=0.0, warmdown_frac=0.0, val_loss_every=0, train_log_every=25,
             torch_compile="0", muon_momentum_warmup_steps=50, ema_min_steps=10 ** 9, compressor="pergroup")


def absmax_rtn(q: dict, sd: dict) -> dict:
    """q with the banks and the embedding re-rounded at scale max|row| / R (same bits as SDClip)."""
    out = dict(q)
    for n in (*tg.BANK_NAMES, "tok_emb.weight"):
        qmax = 2 ** (tg.QUANT_GROUPS[tg.quant_group(n)][0] - 1) - 1
        s = tg._grid_scale(sd[n].float().abs().amax(-1), qmax)
        out[n] = (q[n][0], tg._quant(sd[n].float(), s, qmax).to(torch.int8), s.half())
    return out


def codec_row(raw: bytes, codec: str) -> dict:
    t0 = time.perf_counter()
    blob = tg.compress_payload(raw, codec)[0]
    t1 = time.perf_counter()
    assert tg.decompress_artifact(blob, codec) == raw
    return dict(bytes=len(blob), compress_s=round(t1 - t0, 2), decompress_s=round(time.perf_counter() - t1, 2))


def penalty(args, tmp: Path) -> list[dict]:
    rows = []
    for qat in [0.0] + [float(x) for x in filter(None, args.qat_thresholds.split(","))]:
        h = tg.Hyperparameters(**SMALL, data_path=str(Path(args.standin) / "datasets" / "fineweb10B_sp1024"),
                               tokenizer_path=str(Path(args.standin) / "tokenizers" / "fineweb_1024_bpe.model"),
                               iterations=args.steps, warmdown_iters=max(args.steps // 3, 1), seed=args.seed,
                               late_qat_threshold=qat)
        rows += penalty_rows(args, h, tmp / f"penalty_qat{qat}.txt", f"late QAT {qat} + " if qat else "")
    return rows


def penalty_rows(args, h: tg.Hyperparameters, log: Path, label: str) -> list[dict]:
    """Train one model on h, then its rows: the same weights quantized each way (QAT runs: the SDClip ones)."""
    rt = tg.Runtime.local()
    tg.init_logging(log, True)
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    n = min(args.val_tokens // h.eval_seq_len * h.eval_seq_len, val.numel() - 1)
    ctx = tg.EvalContext(h, rt, val[:n + 1], tg.load_byte_counter(h, n + 1))
    torch.manual_seed(h.seed)
    model = tg.build_model(h)
    steps, train_ms, _ = tg.train(ctx, model)
    score = lambda m: tg.run_pass(ctx, tg.FixedScorer(m.eval()), stride=h.eval_seq_len).val_bpb  # noqa: E731
    with torch.no_grad():
        float_bpb = score(model)
    sd, H = tg.sort_mlp_hidden(model.state_dict(), model.hessians)
    variants = {"rtn-absmax": lambda: absmax_rtn(tg.quantize_model(sd, None, scheme="sdclip"), sd),
                "gptq-lite": lambda: tg.quantize_model(sd),
                "sdclip-rtn": lambda: tg.quantize_model(sd, None, scheme="sdclip"),
                "sdclip-gptq": lambda: tg.quantize_model(sd, H, scheme="sdclip"),
                "sdclip-gptq+lqer": lambda: tg.lqer_correct(tg.quantize_model(sd, H, scheme="sdclip"), sd, 3)}
    rows = []
    for name, make in variants.items():
        if label and not name.startswith("sdclip"):
            continue
        t0 = time.perf_counter()
        q = make()
        quant_s = time.perf_counter() - t0
        m = tg.build_model(h)
        m.load_state_dict(tg.dequantize(q))
        with torch.no_grad():
            bpb = score(m)
        raw = tg.serialize(q)
        rows.append(dict(method=label + name, steps=steps, train_s=round(train_ms / 1000, 1), float_bpb=float_bpb,
                         quant_bpb=bpb, penalty=bpb - float_bpb, quant_s=round(quant_s, 2),
                         brotli_shuffle=codec_row(raw, "brotli+shuffle")["bytes"],
                         pergroup=codec_row(raw, "pergroup")["bytes"]))
        if label:
            rows[-1].update(late_qat_threshold=h.late_qat_threshold, qat_on_from_step=qat_step(log))
        print(json.dumps(rows[-1]), flush=True)
    if not label:
        unsorted = tg.quantize_model(model.state_dict(), model.hessians, scheme="sdclip")
        rows.append(dict(method="sdclip-gptq, MLP unsorted",
                         pergroup=codec_row(tg.serialize(unsorted), "pergroup")["bytes"]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def qat_step(log: Path) -> int | None:
    """The step the run's fake quantization switched on (its log's qat:on line), None if it never did."""
    on = [ln for ln in log.read_text().splitlines() if ln.startswith("qat:on")]
    return int(on[0].split()[1].split(":")[1]) if on else None


def trained_full(args, tmp: Path) -> tuple[tg.GPT, dict]:
    """The default (full) config trained --trained-steps steps on the sp8192-caseops stand-in, small batches."""
    data = Path(args.standin) / "datasets" / "fineweb10B_sp8192_caseops"
    if not data.is_dir():
        sys.exit(f"no {data}: python3 data/build_offline_corpus.py --variants sp8192-caseops")
    h = tg.Hyperparameters(data_path=str(data), tokenizer_path=str(Path(args.standin) / "tokenizers" / TOKENIZER_8192),
                           iterations=args.trained_steps, train_batch_tokens=args.batch_tokens,
                           train_seq_len=args.seq_len, warmup_steps=0, max_wallclock_seconds=0.0, val_loss_every=0,
                           train_log_every=25, torch_compile="0", gptq_enabled=False, seed=args.seed)
    rt = tg.Runtime.local()
    tg.init_logging(tmp / "trained.txt", True)
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    ctx = tg.EvalContext(h, rt, val, tg.load_byte_counter(h))
    torch.manual_seed(h.seed)
    model = tg.build_model(h)
    steps, train_ms, _ = tg.train(ctx, model)
    losses = [ln for ln in (tmp / "trained.txt").read_text().splitlines() if "train_loss" in ln]
    info = dict(trained_steps=steps, train_s=round(train_ms / 1000, 1), batch_tokens=h.train_batch_tokens,
                seq_len=h.train_seq_len, last_log=losses[-1] if losses else "")
    print(json.dumps(info), flush=True)
    return model, info


def codecs(args, tmp: Path) -> list[dict]:
    rows, sorted_ = [], tg.PERGROUP_SORTED
    if args.trained_steps > 0:
        model, info = trained_full(args, tmp)
        rows.append(info)
    else:
        torch.manual_seed(0)
        model = tg.build_model(tg.Hyperparameters())
        with torch.no_grad():
            for n in (*tg.BANK_NAMES, "tok_emb.weight"):
                model.state_dict()[n].normal_(0, 0.02)
    h = tg.Hyperparameters()
    t0 = time.perf_counter()
    sd, _ = tg.sort_mlp_hidden(model.state_dict(), {})
    sort_s = time.perf_counter() - t0
    raw_sorted, raw = (tg.serialize(tg.quantize_model(s, None, scheme="sdclip")) for s in (sd, model.state_dict()))
    print(f"payload {len(raw)} bytes; MLP sort {sort_s:.1f}s", flush=True)
    for codec in filter(None, args.codecs.split(",")):
        runs = [("", raw)] if codec != "pergroup" else [(" (no sort)", raw), (" (sorted)", raw_sorted)]
        for label, payload in runs:
            tg.PERGROUP_SORTED = sorted_ if label == " (sorted)" else ()
            rows.append(dict(codec=codec + label, raw=len(payload), **codec_row(payload, codec)))
            print(json.dumps(rows[-1]), flush=True)
    tg.PERGROUP_SORTED = sorted_
    L, hidden, V = h.num_layers, int(h.mlp_mult * h.model_dim), h.vocab_size
    rows.append(dict(permutations="#2135 raw uint16, all 67 matrices' rows", bytes=106_496))
    rows.append(dict(permutations="raw uint16, embedding + MLP rows", bytes=2 * (V + L * hidden)))
    rows.append(dict(permutations="ours: embedding bit-packed, MLP absorbed",
                     bytes=(V * (V - 1).bit_length() + 7) // 8))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="penalty,codecs")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--val-tokens", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--standin", default=str(STANDIN), help="the stand-in corpus root (data/build_offline_corpus.py)")
    ap.add_argument("--qat-thresholds", default="0.15",
                    help="penalty: one more model per LATE_QAT_THRESHOLD here (fake quantization on the SDClip grid)")
    ap.add_argument("--codecs", default="brotli+shuffle,lzma,pergroup")
    ap.add_argument("--trained-steps", type=int, default=0,
                    help="codecs: train the full config this many steps first (0: Gaussian weights)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="--trained-steps: TRAIN_BATCH_TOKENS")
    ap.add_argument("--seq-len", type=int, default=512, help="--trained-steps: TRAIN_SEQ_LEN")
    ap.add_argument("--json", default="")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        if "penalty" in args.part:
            if not (Path(args.standin) / "datasets").is_dir():
                sys.exit(f"no stand-in corpus at {args.standin}: python3 data/build_offline_corpus.py --sources wiki")
            out["penalty"] = penalty(args, Path(d))
        tg.init_logging(None, True)
        if "codecs" in args.part:
            out["codecs"] = codecs(args, Path(d))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
