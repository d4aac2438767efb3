"""GPTQ-lite vs full-Hessian GPTQ on short CPU-trained models (CPU numbers only).

    python3 bench/bench_quant.py                          # cases a, b, c
    python3 bench/bench_quant.py --cases a --steps 40     # one case, shorter
    python3 bench/bench_quant.py --full-timing-only       # the full 26.9M config: collection + GPTQ time only

Each case trains once through train_gpt.train() with GPTQ_ENABLED=1 (so the Hessians come from the real collection:
GPTQ_CALIB_BATCHES fresh training batches after the last step), then quantizes the SAME final weights both ways and
reads each artifact back through the real export format (serialize -> compress -> load_artifact). Training is a
FIXED number of steps (no wallclock cap, warmdown over the last third), so that a loaded shared machine changes the
times but not the models:
  (a) the PRESET=cpu model (4 x 128, late QAT at lr_mult < 0.15), --steps steps of --batch-tokens tokens
  (b) the same with QAT off (LATE_QAT_THRESHOLD=0): the quantizers alone
  (c) a wider CPU model, 6 layers x 256, --wide-steps steps
Columns: penalty = int6 artifact bpb - float bpb on the first --val-tokens stand-in val tokens (a subset, for
speed: non-overlapping 256-token windows); model bytes (smallest codec, as the export); rel_w = ||W - Q|| / ||W||
over the banks; rel_out = the same weighted by the collected H (||(W - Q) X^T|| / ||W X^T||, what GPTQ minimizes);
quant_ms = quantize_model time; calib_ms = the collection's time inside training. The training runs are SHORT and
the machine is shared with other jobs: these are short-run CPU figures, not record-run ones.
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
WIDE = dict(num_layers=6, model_dim=256, num_heads=4, num_kv_heads=2, ve_layers="4,5", xsa_last_n=2)


def case_config(case: str, args) -> tg.Hyperparameters:
    base = dict(tg.PRESETS["cpu"], data_path=str(STANDIN / "datasets" / "fineweb10B_sp1024"),
                tokenizer_path=str(STANDIN / "tokenizers" / "fineweb_1024_bpe.model"), gptq_enabled=True,
                max_wallclock_seconds=0.0, iterations=args.steps, warmdown_iters=max(args.steps // 3, 1),
                muon_momentum_warmup_steps=max(args.steps // 3, 1), train_batch_tokens=args.batch_tokens,
                train_log_every=10, seed=args.seed)
    if case == "b":
        base.update(late_qat_threshold=0.0)
    if case == "c":
        base.update(WIDE, iterations=args.wide_steps, warmdown_iters=max(args.wide_steps // 3, 1),
                    muon_momentum_warmup_steps=max(args.wide_steps // 3, 1))
    return tg.Hyperparameters(**base)


def bank_errors(model: tg.GPT, q: dict, hessians: dict) -> tuple[float, float]:
    """Relative weight error and relative H-weighted (output) error over all four banks."""
    deq = tg.dequantize(q)
    num = den = onum = oden = 0.0
    for name in tg.BANK_NAMES:
        w = getattr(model, name).detach().float()
        d, H = deq[name] - w, hessians[name]
        num, den = num + d.square().sum().item(), den + w.square().sum().item()
        onum += torch.einsum("src,scd,srd->", d, H, d).item()
        oden += torch.einsum("src,scd,srd->", w, H, w).item()
    return (num / den) ** 0.5, (onum / max(oden, 1e-30)) ** 0.5


def artifact_bpb(ctx: tg.EvalContext, q: dict, path: Path) -> tuple[float, int, str]:
    blob, codec, _ = tg.compress_payload(tg.serialize(q), ctx.h.compressor)
    tg.write_atomic(path, blob)
    model = tg.load_artifact(path, ctx.h, ctx.rt.device)
    with torch.no_grad():
        return tg.run_pass(ctx, tg.FixedScorer(model), stride=ctx.h.eval_seq_len).val_bpb, len(blob), codec


def run_case(case: str, args, tmp: Path) -> list[dict]:
    h = case_config(case, args)
    rt = tg.Runtime.local()
    tg.init_logging(tmp / f"{case}.txt", True)
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    n = min(args.val_tokens // h.eval_seq_len * h.eval_seq_len, val.numel() - 1)
    ctx = tg.EvalContext(h, rt, val[:n + 1], tg.load_byte_counter(h))
    torch.manual_seed(h.seed)
    model = tg.build_model(h)
    t0 = time.perf_counter()
    steps, train_ms, _ = tg.train(ctx, model)
    wall = time.perf_counter() - t0
    calib = [l for l in (tmp / f"{case}.txt").read_text().splitlines() if l.startswith("gptq_calibration ")]
    calib_ms = float(calib[-1].rsplit("time:", 1)[1].rstrip("ms"))
    with torch.no_grad():
        float_bpb = tg.run_pass(ctx, tg.FixedScorer(model), stride=h.eval_seq_len).val_bpb
    rows = []
    for method, hess in (("gptq-lite", None), ("gptq", model.hessians)):
        t1 = time.perf_counter()
        q = tg.quantize_model(model, hess, h.gptq_damp, h.gptq_block_size)
        quant_ms = 1000 * (time.perf_counter() - t1)
        rel_w, rel_out = bank_errors(model, q, model.hessians)
        bpb, nbytes, codec = artifact_bpb(ctx, q, tmp / f"{case}-{method}.ptz")
        rows.append(dict(case=case, method=method, layers=h.num_layers, dim=h.model_dim, steps=steps,
                         train_s=round(train_ms / 1000, 1), float_bpb=float_bpb, int6_bpb=bpb,
                         penalty=bpb - float_bpb, model_bytes=nbytes, codec=codec, rel_w=rel_w, rel_out=rel_out,
                         quant_ms=quant_ms, calib_ms=calib_ms if method == "gptq" else 0.0,
                         val_tokens=n, qat=h.late_qat_threshold > 0 or h.qat_enabled, wall_s=round(wall, 1)))
    return rows


def full_timing(args) -> dict:
    """The default 26.9M config at init weights (timing does not depend on the values): one collection batch of
    --full-seqs x 2048 tokens, then GPTQ of all four banks with those Hessians. CPU only."""
    h = tg.Hyperparameters(data_path=str(STANDIN / "datasets" / "fineweb10B_sp1024"),
                           train_batch_tokens=8 * 2048 * args.full_seqs)
    rt = tg.Runtime.local()
    torch.manual_seed(0)
    model = tg.build_model(h)
    loader = tg.DistributedTokenLoader(h.train_files, rt)
    t0 = time.perf_counter()
    hess = tg.collect_hessians(h, rt, model, loader, 1)
    collect_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tg.quantize_model(model, hess, h.gptq_damp, h.gptq_block_size)
    gptq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tg.quantize_model(model)
    lite_s = time.perf_counter() - t0
    return dict(params=sum(p.numel() for p in model.parameters()), collect_tokens=args.full_seqs * 2048,
                collect_s=collect_s, gptq_quantize_s=gptq_s, gptq_lite_quantize_s=lite_s)


def print_tables(rows: list[dict]) -> None:
    cols = ("case", "layers", "dim", "steps", "qat", "float_bpb", "int6_bpb", "penalty", "model_bytes", "rel_w",
            "rel_out", "quant_ms", "calib_ms")
    fmt = dict(float_bpb="{:.4f}", int6_bpb="{:.4f}", penalty="{:+.4f}", rel_w="{:.4f}", rel_out="{:.4f}",
               quant_ms="{:.0f}", calib_ms="{:.0f}")
    for method in ("gptq-lite", "gptq"):
        print(f"\n{method} (CPU, shared 2-core machine, short training)")
        print(" | ".join(cols))
        for r in (r for r in rows if r["method"] == method):
            print(" | ".join(fmt.get(c, "{}").format(r[c]) for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--steps", type=int, default=80, help="training steps of cases a and b")
    ap.add_argument("--wide-steps", type=int, default=40, help="training steps of case c")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step (a multiple of 8 x 256)")
    ap.add_argument("--val-tokens", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--full-seqs", type=int, default=2, help="sequences of 2048 in the full-config timing batch")
    ap.add_argument("--full-timing-only", action="store_true")
    ap.add_argument("--no-full-timing", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not (STANDIN / "datasets").is_dir():
        sys.exit(f"no stand-in corpus at {STANDIN}: build it (data/build_offline_corpus.py) or symlink it there")
    rows, full = [], None
    with tempfile.TemporaryDirectory() as d:
        if not args.full_timing_only:
            for case in args.cases.split(","):
                rows += run_case(case, args, Path(d))
        tg.init_logging(None, True)
    if rows:
        print_tables(rows)
        for a, b in zip(rows[::2], rows[1::2]):
            print(f"case {a['case']}: gptq - gptq-lite penalty {b['penalty'] - a['penalty']:+.4f} bpb, "
                  f"bytes {b['model_bytes'] - a['model_bytes']:+d}")
    if not args.no_full_timing:
        full = full_timing(args)
        print(f"\nfull config (CPU): params:{full['params']} collection of {full['collect_tokens']} tokens "
              f"{full['collect_s']:.1f}s, GPTQ quantize {full['gptq_quantize_s']:.1f}s, "
              f"GPTQ-lite quantize {full['gptq_lite_quantize_s']:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, full=full), indent=2) + "\n")


if __name__ == "__main__":
    main()
