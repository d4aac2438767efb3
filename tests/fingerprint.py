"""The pr549 fingerprint: a tiny pr549 config trained for a few steps (warmdown, late QAT and EMA all reached), its
exact per-step losses and the sha256 of its int6 payload. `python3 tests/fingerprint.py SCRIPT OUT.json` writes one
for any version of train_gpt.py; tests/test_presets.py checks today's script against the seed's, both on one machine."""
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
import torch  # noqa: E402

# The tiny pr549 config: every pr549 mechanism on (bigram, VE, fixed smear, XSA, late QAT, EMA, warmdown).
TINY_PR549 = dict(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
                  bigram_vocab_size=48, bigram_dim=8, xsa_last_n=2, ve_dim=8, ve_layers="1,2", rope_dims=4,
                  train_seq_len=32, train_batch_tokens=512, iterations=8, warmup_steps=0, warmdown_iters=4,
                  max_wallclock_seconds=0.0, val_loss_every=0, train_log_every=1000, torch_compile="0",
                  ema_decay=0.9, ema_min_steps=4, late_qat_threshold=0.6, muon_momentum_warmup_steps=4,
                  eval_seq_len=32, eval_stride=16, compressor="lzma", run_id="fingerprint")


def synthetic_shards(root: Path, tg) -> None:
    """Deterministic documents of [BOS] + ids over a 64-token vocabulary (no tokenizer needed)."""
    rng = np.random.default_rng(1234)
    docs = [np.concatenate(([tg.BOS_ID], rng.integers(2, 64, rng.integers(20, 90)))) for _ in range(120)]
    tg.write_shard(root / tg.SHARD_NAME.format(split="train", index=0), np.concatenate(docs[10:]))
    tg.write_shard(root / tg.SHARD_NAME.format(split="val", index=0), np.concatenate(docs[:10]))


def fingerprint(tg, root: Path, preset: dict | None = None) -> dict:
    """Train TINY_PR549 (over `preset`, e.g. tg.PRESETS["pr549"]) and return {losses (float hex), payload sha256}."""
    root.mkdir(parents=True, exist_ok=True)
    synthetic_shards(root, tg)
    base = {k: v for k, v in (preset or {}).items() if k not in ("data_path", "tokenizer_path", "preset")}
    h = tg.Hyperparameters(**{**base, **TINY_PR549, "data_path": str(root), "out_dir": str(root)})
    rt, losses = tg.Runtime.local(), []
    step = tg.train_step

    def recording(*args, **kw):
        loss = step(*args, **kw)
        losses.append(float(loss))
        return loss

    tg.train_step, n = recording, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(h.seed)
        model = tg.build_model(h)
        val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
        ctx = tg.EvalContext(h, rt, val, None)
        tg.train(ctx, model)
    finally:
        tg.train_step = step
        torch.set_num_threads(n)
    payload = tg.serialize(tg.quantize_model(model))
    return dict(losses=[x.hex() for x in losses], payload_sha256=hashlib.sha256(payload).hexdigest(),
                payload_bytes=len(payload))


def load_script(path: str):
    spec = importlib.util.spec_from_file_location("fingerprinted", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    import tempfile
    tg = load_script(sys.argv[1])
    with tempfile.TemporaryDirectory() as d:
        fp = fingerprint(tg, Path(d), getattr(tg, "PRESETS", {}).get("pr549"))
    Path(sys.argv[2]).write_text(json.dumps(fp, indent=1) + "\n")
    print(json.dumps(fp))
