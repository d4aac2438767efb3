#!/usr/bin/env python3
"""Choose the CPU preset's training levers on held-out TRAINING documents (never val); CPU only.

    python3 bench/tune_cpu_preset.py --steps 200 --trial "base=" --trial "gates=SMEAR_GATE=gated,ATTN_GATE=1" \
        [--base cpu] [--threads 1] [--log bench/results/tune_cpu_preset_cpu.jsonl]

Each --trial "NAME=K=V,K=V" trains PRESET=--base with those env overrides (read exactly as train_gpt.py reads its
environment) for --steps steps, the schedule scaled to the steps as the CPU presets do (warmdown over the last third,
Muon momentum warmup over the first quarter), then scores the float model with plain sliding windows (no
adaptation, no export) on the last --heldout-docs documents of the stand-in's train stream, which the steps never
reach (checked by bench_frontier_cpu.run_row). Rows are appended to --log as JSON lines, so trials from several
invocations stay in one file. tokens/s is this machine's (shared, noisy): compare rows of one invocation only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

import bench_frontier_cpu as side  # noqa: E402
import tune_eval  # noqa: E402  (its "K=V,K=V" parser: a value may hold commas)
import train_gpt as tg  # noqa: E402

VARIANT_OF = {folder: variant for variant, (folder, _, _) in side.VARIANTS.items()}  # dataset folder -> variant


def trial_config(base: str, env: dict[str, str], steps: int) -> tuple[str, dict]:
    """(data variant, Hyperparameters overrides) of one trial: the preset, the schedule scaled to the steps, env."""
    sched = dict(ITERATIONS=str(steps), WARMDOWN_ITERS=str(max(steps // 3, 1)),
                 MUON_MOMENTUM_WARMUP_STEPS=str(max(steps // 4, 1)))
    h = tg.Hyperparameters.from_env({"PRESET": base, **sched, **env})
    variant = VARIANT_OF[Path(h.data_path).name]
    overrides = {f: getattr(h, f) for f in h.__dataclass_fields__}
    return variant, dict(overrides, torch_compile="0", gptq_enabled=False, ttt_enabled=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--trial", action="append", required=True, help='"NAME=K=V,K=V" ("NAME=" for the base alone)')
    ap.add_argument("--heldout-docs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--log", default=str(ROOT / "bench" / "results" / "tune_cpu_preset_cpu.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    trials = []
    for t in args.trial:
        name, _, spec = t.partition("=")
        trials.append((name, *trial_config(args.base, tune_eval.parse_config(spec), args.steps), spec))
    data = {}
    for name, variant, overrides, spec in trials:
        if variant not in data:
            data[variant] = side.heldout(variant, args.heldout_docs)
        t0 = time.perf_counter()
        res = side.run_row(name, variant, overrides, data[variant], args.seed)
        res.update(base=args.base, env=spec, threads=args.threads, wall_s=round(time.perf_counter() - t0, 1),
                   torch=torch.__version__)
        print(json.dumps(res), flush=True)
        with open(args.log, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
