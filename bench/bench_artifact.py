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
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pack  # noqa: E402
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
    for c in tg.CODECS:
        if not tg._codec_available(c):
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--states", default="init,trained,gauss,student")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-shuffle", action="store_true", help="skip the +shuffle variants (half the time)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    states = [s for s in a.states.split(",") if s]
    h = tg.Hyperparameters.from_env({})
    src = (ROOT / "train_gpt.py").read_bytes()
    code_raw = len(src)
    code_packed = len(pack.pack_source(src).encode("ascii"))
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
