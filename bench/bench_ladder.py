#!/usr/bin/env python3
"""The evaluation's ablation ladder on one artifact (issue #20): each stage adds one piece to the docs-plan pass and
is scored from a fresh load of the artifact, with its time.

    PRESET=cpu-frontier python3 bench/bench_ladder.py ARTIFACT [--tokens 32768] [--threads 2]

Stages: no TTT -> per-document LoRA TTT -> + phased global SGD -> + tilt -> + online bias -> + n-gram boost -> Hedge.
The phase boundaries are the record's (833, 1666, 2500 of 50,000 documents) scaled to the documents scored here
(at least 1, 2, 3).
The validation slice is the first --tokens tokens cut at a BOS (0: all). Every number is CPU; a stage whose config
the script refuses is reported with the reason.
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

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

OFF = dict(EVAL_PLAN="docs", TTT_ENABLED="0", TTT_MODE="lora", TILT_ENABLED="0", BIAS_ENABLED="0", NGRAM_ENABLED="0",
           HEDGE_ENABLED="0", TTT_PHASES="")


def stages(n_docs: int) -> list[tuple[str, dict]]:
    phases = ",".join(str(max(i + 1, round(n_docs * f / 50000))) for i, f in enumerate((833, 1666, 2500)))
    steps = [("no TTT", {}), ("LoRA TTT", dict(TTT_ENABLED="1")), ("+ phases", dict(TTT_PHASES=phases)),
             ("+ tilt", dict(TILT_ENABLED="1")), ("+ bias", dict(BIAS_ENABLED="1")),
             ("+ boost", dict(NGRAM_ENABLED="1")), ("Hedge", dict(HEDGE_ENABLED="1"))]
    out, env = [], dict(OFF)
    for name, extra in steps:
        env = {**env, **extra}
        out.append((name, dict(env)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = {k: v for k, v in os.environ.items() if k not in OFF}
    h0 = tg.Hyperparameters.from_env({**base, **OFF})
    val = tg.load_val_tokens(h0.val_files, h0.eval_seq_len)
    if args.tokens:
        val = val[:int(torch.nonzero(val[:args.tokens + 1] == tg.BOS_ID).max()) + 1]  # ends on a BOS: whole documents
    n_docs = len(tg.find_docs(val))
    print(f"artifact:{args.artifact} preset:{h0.preset} val_tokens:{val.numel() - 1} documents:{n_docs} "
          f"threads:{args.threads} (CPU)")
    lines = []
    tg.log0 = lambda msg, console=True: lines.append(msg)  # the pass's own log: kept for its phase and guard lines
    rows = []
    for name, env in stages(n_docs):
        try:
            h = tg.Hyperparameters.from_env({**base, **env})
        except ValueError as e:
            rows.append((name, None, None, f"refused: {e}"))
            continue
        ctx = tg.EvalContext(h, tg.Runtime.local(), val, tg.load_byte_counter(h, val.numel()))
        model = tg.load_artifact(Path(args.artifact), h, "cpu")
        lines.clear()
        t0 = time.perf_counter()
        r, _, _ = tg.adaptive_pass(ctx, model, model, t0)
        note = " ".join(x for x in lines if x.startswith(("ttt_phase", "budget phase", "tilt ", "ngram ")))
        rows.append((name, r.val_bpb, time.perf_counter() - t0, f"track:{r.final} {note}".strip()))
        print(f"stage {name}: val_bpb:{r.val_bpb:.5f} time:{rows[-1][2]:.1f}s {rows[-1][3]}", flush=True)
    print("\n| stage | val_bpb | delta | time (s) |\n|---|---|---|---|")
    prev = None
    for name, bpb, sec, note in rows:
        if bpb is None:
            print(f"| {name} | - | - | - ({note}) |")
            continue
        print(f"| {name} | {bpb:.5f} | {'' if prev is None else f'{bpb - prev:+.5f}'} | {sec:.1f} |")
        prev = bpb


if __name__ == "__main__":
    main()
