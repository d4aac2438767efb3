"""Artifact-size benchmark for the FULL default config (26,928,220 params), on the CPU.

    python3 bench/bench_artifact.py                       # all states, every codec x shuffle
    python3 bench/bench_artifact.py --states init,trained --steps 30 --json out.json

For each weight state: quantize_model + serialize (timed), then every codec x {plain, +shuffle} separately (timed,
single-threaded like the codecs themselves), each blob wrapped in the 18-byte artifact header and read back through
train_gpt.decompress_artifact (must equal the payload). bytes_total = code bytes + model bytes, with the code counted
both as the readable train_gpt.py and as the tools/pack.py LZMA+base85 wrapper. Per tensor class (int6 banks, int8
embedding tables, fp16 passthrough): MSE and relative error ||dequant - w|| / ||w|| after the full roundtrip.

Weight states:
  init     build_model at seed 1337 (half the bank entries, the output/down projections, start at zero)
  trained  init + a SHORT real CPU training run: --steps steps of Muon+AdamW (train_gpt.Optimizers) on --batch-seqs x
           --seq-len tokens of the stand-in shards (random tokens if absent), one micro-batch per step. This is NOT the
           statistics of a 9000-step record run; it is the short-run regime.
  gauss    SYNTHETIC: every bank entry (projections included) and every table entry i.i.d. Gaussian, std of the init
           rows. Dense, light-tailed: a pessimistic stand-in for trained weights.
  student  SYNTHETIC: as gauss but Student-t (nu=4) entries: dense and heavy-tailed, closer to trained weights, whose
           int6 histogram is peaked (the record reached ~4.7 bits per weight with lzma).
Target: bytes_total <= 15,950,000 (16,000,000 cap minus a 50,000-byte margin).

    python3 bench/bench_artifact.py --fit-check [--nu 0] [--compressor auto] [--max-prune 0.3]

Fit check: a full-config model with SYNTHETIC dense Gaussian (or Student-t, --nu) bank and table entries, whose
artifact starts over 16 MB (Gaussian: ~18.4 MB), goes through train_gpt.fit_to_budget with the run's model budget (16,000,000 - shipped code bytes -
ARTIFACT_MARGIN_BYTES) and prints the run's `fit ...` line; then real bytes (the shipping codec), the entropy
proxy and the int6 rel_error against the pruned fraction.

    python3 bench/bench_artifact.py --cpu-force 0.8 [--cpu-steps 300 | --artifact PATH] [--val-tokens 262144]

Forced fit: trains the PRESET=cpu model for --cpu-steps steps (train_gpt.train on the stand-in shards), then fits
its artifact into --cpu-force x its natural size (FIT_MAX_PRUNE_FRACTION=1) and reports the plain-window bpb
(stride = window) of both artifacts on the first --val-tokens validation tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

TARGET = 15_950_000
STANDIN = ROOT / "data" / "standin" / "datasets" / "fineweb10B_sp1024"


def class_of(name: str) -> str:
    if name in tg.BANK_NAMES:
        return "int6 banks"
    if name in tg.TOKEN_PARAM_NAMES:
        return "int8 tables"
    return "fp16 passthrough"


@torch.no_grad()
def synthetic(model: tg.GPT, dist: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t4 = torch.distributions.StudentT(4.0)
    for name, p in model.named_parameters():
        if class_of(name) == "fp16 passthrough":
            continue
        std = 1.0 / p.size(-1) ** 0.5 if name in tg.BANK_NAMES else 0.02
        if dist == "gauss":
            x = torch.randn(p.shape, generator=g)
        else:
            torch.manual_seed(seed + p.numel())
            x = t4.sample(p.shape) / 2 ** 0.5  # unit variance
        p.copy_(x * std)


def short_training(h: tg.Hyperparameters, model: tg.GPT, steps: int, batch_seqs: int, seq_len: int) -> str:
    """Real optimizer steps (Muon on banks, AdamW elsewhere, the record's LRs), one micro-batch per step."""
    rt = tg.Runtime.local()
    opt = tg.Optimizers(h, model, rt)
    n = batch_seqs * seq_len + 1
    pattern = STANDIN / tg.SHARD_GLOB.format(split="train")
    if any(STANDIN.glob(pattern.name)):
        stream, source = tg.TokenStream(str(pattern)), "stand-in shards"
    else:
        stream, source = None, "random tokens (stand-in shards not found)"
    g = torch.Generator().manual_seed(0)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        toks = (torch.from_numpy(stream.take(n).astype(np.int64)) if stream is not None
                else torch.randint(0, h.vocab_size, (n,), generator=g))
        x, y = toks[:-1].view(batch_seqs, seq_len), toks[1:].view(batch_seqs, seq_len)
        opt.set_schedule(step, 1.0)
        loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"  train step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return f"{steps} steps x {batch_seqs}x{seq_len} tokens of {source}, loss {losses[0]:.2f} -> {losses[-1]:.2f}"


def errors(model: tg.GPT, deq: dict) -> dict:
    acc = {}
    for name, w in model.state_dict().items():
        w = w.detach().float()
        d = deq[name].float() - w
        a = acc.setdefault(class_of(name), dict(sq=0.0, wsq=0.0, n=0, maxabs=0.0))
        a["sq"] += d.double().square().sum().item()
        a["wsq"] += w.double().square().sum().item()
        a["n"] += w.numel()
        a["maxabs"] = max(a["maxabs"], d.abs().max().item())
    return {k: dict(n=v["n"], mse=v["sq"] / v["n"], rel=(v["sq"] / v["wsq"]) ** 0.5 if v["wsq"] else 0.0,
                    maxabs=v["maxabs"]) for k, v in acc.items()}


def bench_state(model: tg.GPT, shuffles) -> dict:
    t0 = time.perf_counter()
    q = tg.quantize_model(model)
    t_quant = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw = tg.serialize(q)
    t_ser = time.perf_counter() - t0
    shuffled = tg._shuffle_payload(raw, inverse=False)
    rows = []
    for c in tg.BYTE_CODECS:
        if tg._codec(c) is None:
            rows.append(dict(codec=c, missing=True))
            continue
        comp, _ = tg._codec(c)
        for s in shuffles:
            t0 = time.perf_counter()
            body = comp(shuffled if s else raw)
            t_c = time.perf_counter() - t0
            blob = tg.ARTIFACT_MAGIC + bytes([tg.CODECS.index(c), int(s)]) + struct.pack("<IQ", zlib.crc32(raw), len(raw)) + body
            t0 = time.perf_counter()
            ok = tg.decompress_artifact(blob, "bench") == raw
            t_d = time.perf_counter() - t0
            rows.append(dict(codec=c + ("+shuffle" if s else ""), model_bytes=len(blob), compress_s=t_c,
                             decompress_s=t_d, roundtrip_ok=ok))
            print(f"  {rows[-1]['codec']:15s} {len(blob):>11,d} B  {t_c:6.1f}s", flush=True)
    deq = tg.dequantize(tg.deserialize(raw))
    return dict(raw=len(raw), quant_s=t_quant, serialize_s=t_ser, rows=rows, errors=errors(model, deq))


def student_dense(model: tg.GPT, nu: float, seed: int) -> None:
    """SYNTHETIC: unit-variance Student-t(nu) bank and table entries at the init rows' std (see `synthetic`)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if class_of(name) == "fp16 passthrough":
                continue
            torch.manual_seed(seed + p.numel())
            x = torch.distributions.StudentT(nu).sample(p.shape) * ((nu - 2) / nu) ** 0.5
            p.copy_(x * (1.0 / p.size(-1) ** 0.5 if name in tg.BANK_NAMES else 0.02))


def fit_check(a) -> int:
    h = tg.Hyperparameters.from_env({})
    torch.manual_seed(h.seed)
    model = tg.build_model(h)
    if a.nu > 0:
        student_dense(model, a.nu, h.seed)
    else:
        synthetic(model, "gauss", h.seed)
    code = tg.shipped_code_bytes(ROOT / "train_gpt.py")
    budget = tg.model_budget_bytes(h, code)
    weights_desc = f"Student-t nu={a.nu}" if a.nu > 0 else "Gaussian (the 'gauss' state)"
    print(f"fit check on CPU ({os.cpu_count()} cores, shared machine): full config, SYNTHETIC dense {weights_desc} "
          f"weights; shipped code {code:,} B -> model budget {budget:,} B; compressor {a.compressor}; "
          f"FIT_MAX_PRUNE_FRACTION {a.max_prune}", flush=True)
    t0 = time.perf_counter()
    q = tg.quantize_model(model)
    weights = {n: t for n, t in model.state_dict().items() if n in tg.BANK_NAMES}
    print(f"quantize {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        _, codec, sizes, st = tg.fit_to_budget(q, weights, a.compressor, budget, a.max_prune)
        print(tg.fit_line(st), flush=True)
        print("unpruned sizes: " + " ".join(f"{k}:{v}" for k, v in sizes.items()), flush=True)
    except RuntimeError as e:
        print(f"fit failed: {e}", flush=True)
        codec = tg.compress_payload(tg.serialize(q), a.compressor)[1]
    n_values = sum(q[n][1].numel() for n in tg.BANK_NAMES)
    fracs = [float(f) for f in a.fractions.split(",")]
    order = tg.prune_order(q, int(max(fracs) * n_values))
    proxy = tg._SizeProxy(q, order)
    print(f"\n{'pruned fraction':>15s} {'pruned':>10s} {'model bytes (' + codec + ')':>28s} {'bytes_total':>12s} "
          f"{'proxy bytes':>12s} {'int6 rel_error':>15s} {'comp s':>7s}")
    for f in fracs:
        k = min(int(f * n_values), len(order[0]))
        qk = tg.pruned(q, order, k)
        t0 = time.perf_counter()
        n = len(tg.compress_payload(tg.serialize(qk), codec)[0])
        print(f"{f:>15.3f} {k:>10,d} {n:>28,d} {n + code:>12,d} {proxy(k):>12,.0f} "
              f"{tg.int6_rel_error(qk, weights):>15.6f} {time.perf_counter() - t0:>7.1f}", flush=True)
    return 0


def cpu_force(a) -> int:
    """Train the cpu preset briefly, then compare the natural artifact with one forced into a fraction of it."""
    env = dict(PRESET="cpu", ITERATIONS=str(a.cpu_steps), MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0",
               WARMDOWN_ITERS=str(max(a.cpu_steps // 3, 1)), TORCH_COMPILE="0")
    h = tg.resolve_startup(tg.Hyperparameters.from_env(env), tg.Runtime.local())
    rt = tg.Runtime.local()
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)[:a.val_tokens + 1]
    ctx = tg.EvalContext(h, rt, val, tg.load_byte_counter(h))
    if a.artifact:  # an existing PRESET=cpu artifact: its dequantized weights are the reference for rel_error
        q = tg.deserialize(tg.decompress_artifact(Path(a.artifact).read_bytes(), a.artifact))
        weights = tg.dequantize(q)
        print(f"PRESET=cpu artifact {a.artifact}", flush=True)
    else:
        torch.manual_seed(h.seed)
        model = tg.build_model(h)
        t0 = time.perf_counter()
        steps, _, _ = tg.train(ctx, model)
        print(f"trained PRESET=cpu {steps} steps in {time.perf_counter() - t0:.0f}s (CPU, shared machine)", flush=True)
        q = tg.quantize_model(model)
        weights = {n: t for n, t in model.state_dict().items() if n in tg.BANK_NAMES}
    blob, codec, _, st0 = tg.fit_to_budget(q, weights, h.compressor, 10 ** 12, 1.0)
    natural = len(blob)
    _, _, _, st = tg.fit_to_budget(q, weights, codec, int(a.cpu_force * natural), 1.0)
    print(tg.fit_line(st), flush=True)
    order = tg.prune_order(q, st["pruned"])
    rows = []
    for label, qk in (("natural", q), (f"forced {a.cpu_force:.0%}", tg.pruned(q, order, st["pruned"]))):
        m = tg.build_model(h)
        m.load_state_dict(tg.dequantize(qk))
        r = tg.run_pass(ctx, tg.FixedScorer(m.eval()), stride=h.eval_seq_len)
        rows.append((label, r.val_bpb))
        print(f"{label:>12s} bpb {r.val_bpb:.4f} on {r.tokens:,} val tokens", flush=True)
    print(f"natural {natural:,} B ({codec}) -> forced {st['after']:,} B: pruned {st['pruned']:,} of {st['of']:,} "
          f"int6 values ({st['pruned'] / st['of']:.1%}), rel_error {st['e0']:.4f}->{st['e1']:.4f}, "
          f"bpb cost {rows[1][1] - rows[0][1]:+.4f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-check", action="store_true", help="the fit-to-budget check (see above)")
    ap.add_argument("--nu", type=float, default=0.0, help="fit check: Student-t dof of the weights (0: Gaussian)")
    ap.add_argument("--compressor", default="auto", help="fit check: COMPRESSOR (auto = what a run does)")
    ap.add_argument("--max-prune", type=float, default=0.3,
                    help="fit check: FIT_MAX_PRUNE_FRACTION (a run's default, 0.05, refuses the Gaussian model)")
    ap.add_argument("--fractions", default="0.05,0.1,0.2", help="fit check: pruned fractions to tabulate")
    ap.add_argument("--cpu-force", type=float, default=0.0, help="forced fit of a briefly trained cpu-preset model")
    ap.add_argument("--cpu-steps", type=int, default=300)
    ap.add_argument("--artifact", default="", help="forced fit: use this PRESET=cpu artifact instead of training")
    ap.add_argument("--val-tokens", type=int, default=262144)
    ap.add_argument("--states", default="init,trained,gauss,student")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-shuffle", action="store_true", help="skip the +shuffle variants (half the time)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    if a.fit_check:
        return fit_check(a)
    if a.cpu_force:
        return cpu_force(a)
    states = [s for s in a.states.split(",") if s]
    h = tg.Hyperparameters.from_env({})
    src = (ROOT / "train_gpt.py").read_bytes()
    code_raw = len(src)
    code_packed = tg.shipped_code_bytes(ROOT / "train_gpt.py")
    shuffles = (False,) if a.no_shuffle else (False, True)
    cpu = platform.processor() or platform.machine()
    print(f"bench_artifact on CPU ({cpu}, {os.cpu_count()} cores, torch {torch.__version__} threads "
          f"{torch.get_num_threads()}); code: train_gpt.py {code_raw:,} B raw, {code_packed:,} B packed", flush=True)
    results, notes = {}, {}
    for state in states:
        torch.manual_seed(h.seed)
        model = tg.build_model(h)
        n_params = sum(p.numel() for p in model.parameters())
        if state == "trained":
            print(f"[{state}] short CPU training ...", flush=True)
            notes[state] = short_training(h, model, a.steps, a.batch_seqs, a.seq_len)
        elif state in ("gauss", "student"):
            synthetic(model, state, h.seed)
            notes[state] = "SYNTHETIC weights (not a trained model)"
        elif state != "init":
            raise SystemExit(f"unknown state {state!r}")
        else:
            notes[state] = "random init, seed 1337"
        print(f"[{state}] {n_params:,} params; quantize + serialize + {len(shuffles) * 3} compressions ...", flush=True)
        results[state] = bench_state(model, shuffles)
        results[state]["params"] = n_params

    print()
    print(f"=== Artifact benchmark, CPU ({cpu}, {os.cpu_count()} cores), full default config "
          f"({results[states[0]]['params']:,} params); target bytes_total <= {TARGET:,} ===")
    print(f"code bytes: train_gpt.py raw {code_raw:,} | packed (tools/pack.py) {code_packed:,}")
    hdr = (f"{'state':8s} {'codec':15s} {'raw payload':>12s} {'model bytes':>12s} {'bits/param':>10s} "
           f"{'comp s':>7s} {'decomp s':>8s} {'total(raw code)':>16s} {'total(packed)':>14s} {'packed vs target':>17s} rt")
    print(hdr)
    print("-" * len(hdr))
    for state in states:
        r = results[state]
        ok_rows = [x for x in r["rows"] if not x.get("missing")]
        best = min(ok_rows, key=lambda x: x["model_bytes"])
        for x in r["rows"]:
            if x.get("missing"):
                print(f"{state:8s} {x['codec']:15s} (module not installed)")
                continue
            tr, tp = code_raw + x["model_bytes"], code_packed + x["model_bytes"]
            mark = "*" if x is best else " "
            print(f"{state:8s} {x['codec']:15s} {r['raw']:>12,d} {x['model_bytes']:>12,d} "
                  f"{8 * x['model_bytes'] / r['params']:>10.3f} {x['compress_s']:>7.1f} {x['decompress_s']:>8.2f} "
                  f"{tr:>16,d} {tp:>14,d} {TARGET - tp:>+17,d} {'ok' if x['roundtrip_ok'] else 'FAIL'}{mark}")
        errs = "  ".join(f"{k}: n={v['n']:,} mse={v['mse']:.3e} rel={v['rel']:.4f} maxabs={v['maxabs']:.2e}"
                         for k, v in r["errors"].items())
        print(f"{state:8s} {'(errors)':15s} quantize {r['quant_s']:.1f}s serialize {r['serialize_s']:.2f}s | {errs}")
        print(f"{state:8s} {'(note)':15s} {notes[state]}")
        print("-" * len(hdr))
    print("* = smallest model bytes for that state (what COMPRESSOR=auto writes). 'packed vs target' = "
          f"{TARGET:,} - (packed code + model bytes); negative means over the target. Times: this CPU, one thread per codec.")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(code_raw=code_raw, code_packed=code_packed, target=TARGET,
                                                notes=notes, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
