#!/usr/bin/env python3
"""CPU throughput of train_gpt.py's training step, on synthetic random tokens (no data files needed).

    python3 bench/bench_cpu.py [--steps 20] [--warmup 3] [--full-steps 3] [--threads 1,2] [--skip-full]
    python3 bench/bench_cpu.py --overlap cpu [--steps 20]      # (c) only

(a) PRESET=cpu config, one optimizer step exactly as train_step does it on 1 process: 8 micro-batches of
    TRAIN_BATCH_TOKENS/8 tokens (forward + backward each), then Optimizers.step. Also once with QAT on.
(b) The FULL default config (26.9M parameters, seq 2048): each step is ONE micro-batch of 1 x 2048 tokens
    (forward + backward) plus one Optimizers.step (Muon on the full banks + AdamW). The real run accumulates
    8 micro-batches of 48 x 2048 tokens per optimizer step, so (b)'s tokens/s understates what the optimizer
    cost amortizes to; the forward+backward column is the per-token number to compare.
(c) --overlap cpu|full: Optimizers.step on 2 gloo ranks (1 thread each), overlapped Parallel Muon vs the
    synchronous step (every collective waited at launch), alternating, on fixed random gradients; `--steps` each.
All numbers are CPU, fp32 (autocast is off on CPU), eager (no torch.compile).

    python3 bench/bench_cpu.py --bf16 [--bf16-steps 30]

(c) bf16 autocast on CPU against fp32, at equal steps: the PRESET=cpu model trained --bf16-steps steps on the real
    train shards (same seed, same batches, the same LR schedule compressed to those steps), once in fp32 and once
    under torch.autocast("cpu", bfloat16); tokens/s, the mean train loss of the last 5 steps, and the fp32 loss of
    both final models on the first 64 x 256 validation tokens. train_gpt uses bf16 autocast on CUDA only.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402


def bench(h: tg.Hyperparameters, micro_seqs: int, accum: int, steps: int, warmup: int, qat: bool = False) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones. Returns ms per step and its split."""
    torch.manual_seed(h.seed)
    model = tg.build_model(h)
    rt = tg.Runtime.local()
    opt = tg.Optimizers(h, model, rt)
    g = torch.Generator().manual_seed(0)
    T = h.train_seq_len
    fb_ms, opt_ms, losses = [], [], []
    for i in range(warmup + steps):
        opt.set_schedule(i, 1.0)
        t0 = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, h.vocab_size, (micro_seqs, T + 1), generator=g)
            loss = model(ids[:, :-1], ids[:, 1:], qat)
            (loss / accum).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        losses.append(loss.item())
        if i >= warmup:
            fb_ms.append(1000 * (t1 - t0))
            opt_ms.append(1000 * (t2 - t1))
    n_params = sum(p.numel() for p in model.parameters())
    tokens = micro_seqs * T * accum
    step_ms = [a + b for a, b in zip(fb_ms, opt_ms)]
    med = statistics.median  # the median resists the spikes that other processes on a shared box cause
    return dict(params=n_params, tokens=tokens, step_ms=med(step_ms), min_ms=min(step_ms), fb_ms=med(fb_ms),
                opt_ms=med(opt_ms), tok_s=tokens / (med(step_ms) / 1000), fb_tok_s=tokens / (med(fb_ms) / 1000),
                last_loss=losses[-1])


def overlap_worker(rank: int, world: int, store: str, preset: str, steps: int) -> None:
    """One gloo rank: time Optimizers.step overlapped and synchronous, alternating, on fixed random gradients."""
    import json
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    h = tg.Hyperparameters.from_env({"PRESET": preset} if preset else {})
    times = {True: [], False: []}
    opts = {}
    for overlap in (True, False):
        torch.manual_seed(h.seed)
        model = tg.build_model(h)
        opts[overlap] = (model, tg.Optimizers(h, model, tg.Runtime(rank, rank, world, torch.device("cpu")), overlap))
    g = torch.Generator().manual_seed(rank)
    grads = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in opts[True][0].named_parameters()}
    for i in range(2 * (steps + 1)):
        overlap = i % 2 == 0
        model, opt = opts[overlap]
        opt.set_schedule(i // 2, 1.0)
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        dist.barrier()
        if i >= 2:  # the first pair is warmup
            times[overlap].append(1000 * (time.perf_counter() - t0))
    same = all(torch.equal(a, b) for a, b in zip(opts[True][0].parameters(), opts[False][0].parameters()))
    dist.destroy_process_group()
    if rank == 0:
        Path(store + ".json").write_text(json.dumps(dict(overlap=times[True], sync=times[False], identical=same)))


def bench_overlap(preset: str, steps: int) -> None:
    """2 gloo ranks on this CPU: the overlapped Parallel Muon step vs the synchronous one (same arithmetic)."""
    import json
    import subprocess
    import tempfile
    store = str(Path(tempfile.mkdtemp()) / "store")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, __file__, "--overlap-worker", str(r), store, preset or "full", str(steps)],
                              env=env) for r in range(2)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("overlap bench: a worker failed")
    r = json.loads(Path(store + ".json").read_text())
    med = statistics.median
    print(f"Optimizers.step, 2 gloo ranks x 1 thread on this CPU, config {preset or 'FULL default'}, {steps} steps each "
          f"(load avg {os.getloadavg()[0]:.2f}: other processes share these cores)")
    print(f"  overlapped  : median {med(r['overlap']):9.1f} ms  min {min(r['overlap']):9.1f} ms")
    print(f"  synchronous : median {med(r['sync']):9.1f} ms  min {min(r['sync']):9.1f} ms")
    print(f"  parameters after the steps identical bit for bit: {r['identical']}")
def train_bf16_vs_fp32(h: tg.Hyperparameters, steps: int, bf16: bool) -> dict:
    """(c): `steps` optimizer steps of the real training step on the train shards, fp32 or under CPU bf16
    autocast; returns tokens/s (median step), the last 5 steps' mean loss and the fp32 held loss of the result."""
    h = replace(h, iterations=steps, warmdown_iters=max(steps // 3, 1), max_wallclock_seconds=0.0)
    torch.manual_seed(h.seed)
    model = tg.build_model(h)
    rt = tg.Runtime.local()
    opt = tg.Optimizers(h, model, rt)
    loader = tg.DistributedTokenLoader(h.train_files, rt)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else tg.nullcontext
    step_ms, losses = [], []
    for step in range(steps):
        opt.set_schedule(step, tg.lr_multiplier(h, step, 0.0))
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(rt.grad_accum_steps):
            x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len)
            with ctx():
                loss = model(x, y)
            (loss / rt.grad_accum_steps).backward()
            loss_sum += loss.item()
        opt.step()
        step_ms.append(1000 * (time.perf_counter() - t0))
        losses.append(loss_sum / rt.grad_accum_steps)
    val = tg.load_val_tokens(h.val_files, h.train_seq_len)[:64 * h.train_seq_len + 1].long()
    with torch.no_grad():
        held = model(val[:-1].view(64, -1), val[1:].view(64, -1)).item()
    med = statistics.median(step_ms[1:] if steps > 1 else step_ms)
    return dict(step_ms=med, tok_s=h.train_batch_tokens / (med / 1000), last5=statistics.mean(losses[-5:]),
                held=held, cpu_s=time.process_time())


def main_bf16(steps: int) -> None:
    h = tg.Hyperparameters.from_env({"PRESET": "cpu"})
    print(f"(c) bf16 autocast vs fp32 on CPU, PRESET=cpu, {steps} steps, threads {torch.get_num_threads()}, "
          f"load avg {os.getloadavg()[0]:.2f} (shared cores: compare the two rows, not absolute numbers)")
    rows = []
    for bf16 in (False, True):
        c0 = time.process_time()
        r = train_bf16_vs_fp32(h, steps, bf16)
        r["cpu_s"] -= c0
        rows.append(("bf16 autocast" if bf16 else "fp32", r))
    print(f"{'precision':14s} {'ms/step':>9s} {'tok/s':>8s} {'cpu s':>8s} {'last5 train loss':>16s} {'held loss (fp32)':>16s}")
    for name, r in rows:
        print(f"{name:14s} {r['step_ms']:9.1f} {r['tok_s']:8.0f} {r['cpu_s']:8.1f} {r['last5']:16.4f} {r['held']:16.4f}")
    f, b = rows[0][1], rows[1][1]
    print(f"bf16/fp32: speed x{b['tok_s'] / f['tok_s']:.2f} (median step), cpu time x{b['cpu_s'] / f['cpu_s']:.2f}, "
          f"held loss {b['held'] - f['held']:+.4f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--overlap-worker":
        rank, store, preset, steps = int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
        return overlap_worker(rank, 2, store, "" if preset == "full" else preset, steps)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--full-steps", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts to try for (a)")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--overlap", choices=("cpu", "full"), help="only: overlapped vs synchronous Muon, 2 gloo ranks")
    ap.add_argument("--bf16", action="store_true", help="only: bf16 autocast vs fp32 training on CPU")
    ap.add_argument("--bf16-steps", type=int, default=30)
    args = ap.parse_args()
    if args.overlap:
        return bench_overlap("" if args.overlap == "full" else args.overlap, args.steps)
    if args.bf16:
        return main_bf16(args.bf16_steps)

    default_threads = torch.get_num_threads()
    print(f"CPU benchmark: {platform.processor() or platform.machine()}, os.cpu_count={os.cpu_count()}, "
          f"torch {torch.__version__}, default intra-op threads {default_threads}, "
          f"load avg {os.getloadavg()[0]:.2f} (other processes share these cores)")
    rows = []
    cpu = tg.Hyperparameters.from_env({"PRESET": "cpu"})
    cpu = replace(cpu, data_path="(synthetic)", tokenizer_path="(synthetic)")
    micro = cpu.train_batch_tokens // (8 * cpu.train_seq_len)
    for nt in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(nt)
        r = bench(cpu, micro, 8, args.steps, args.warmup)
        rows.append((f"(a) PRESET=cpu, 8 x {micro}x{cpu.train_seq_len} tok/step", nt, r))
    torch.set_num_threads(min(int(x) for x in args.threads.split(",")))
    r = bench(cpu, micro, 8, max(args.steps // 4, 3), 1, qat=True)
    rows.append((f"(a) PRESET=cpu + QAT, 8 x {micro}x{cpu.train_seq_len}", torch.get_num_threads(), r))
    if not args.skip_full:
        torch.set_num_threads(default_threads)
        full = tg.Hyperparameters.from_env({})
        r = bench(full, 1, 1, args.full_steps, 1)
        rows.append((f"(b) FULL default, 1 x 1x{full.train_seq_len} tok/step", default_threads, r))

    print()
    hdr = (f"{'config (CPU, fp32, eager)':46s} {'thr':>3s} {'params':>10s} {'tok/step':>8s} {'ms/step':>9s} "
           f"{'min ms':>9s} {'fwd+bwd ms':>10s} {'opt ms':>8s} {'tok/s':>8s} {'fwd+bwd tok/s':>13s}")
    # ms/step, fwd+bwd ms and opt ms are medians over the timed steps; min ms is the fastest step
    print(hdr)
    print("-" * len(hdr))
    for name, nt, r in rows:
        print(f"{name:46s} {nt:3d} {r['params']:10,d} {r['tokens']:8d} {r['step_ms']:9.1f} {r['min_ms']:9.1f} "
              f"{r['fb_ms']:10.1f} {r['opt_ms']:8.1f} {r['tok_s']:8.0f} {r['fb_tok_s']:13.0f}")
    print("\nms columns are medians over the timed steps (min ms: the fastest one). tok/s = tokens per optimizer step /\n"
          "median step time (forward+backward of every micro-batch + Optimizers.step); warmup steps excluded.\n"
          "(b) runs 1 micro-batch of 1x2048 per optimizer step, not the record's 8 x 48x2048.")


if __name__ == "__main__":
    main()
