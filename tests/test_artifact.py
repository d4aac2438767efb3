"""Quantization, artifact format and size accounting of train_gpt.py (section 6 and export/load/finish in section 9).

CPU only, no network; the whole file runs in well under 90 s on 2 cores.
"""
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, tiny
import train_gpt as tg

import pack  # tools/, put on sys.path by conftest

CPU = tg.Runtime.local()
SRC = ROOT / "train_gpt.py"


def is_passthrough(name: str) -> bool:
    return name not in tg.BANK_NAMES and name not in tg.TOKEN_PARAM_NAMES


@torch.no_grad()
def random_model(seed: int = 0, heavy_tails: bool = False, **kw) -> tg.GPT:
    """A tiny model whose every tensor is non-trivial (the zero-initialized output/down projections and bigram
    table included). fp16-passthrough tensors are rounded to fp16, because export stores them in fp16 and QAT does
    not simulate that. heavy_tails: Student-t bank entries, so percentile clipping actually clips something."""
    torch.manual_seed(seed)
    model = tg.build_model(tiny(**kw))
    for name, p in model.named_parameters():
        if name in tg.BANK_NAMES:
            noise = torch.distributions.StudentT(3.0).sample(p.shape) if heavy_tails else torch.randn_like(p)
            p.add_(noise * 0.05)
        elif name in tg.TOKEN_PARAM_NAMES:
            p.add_(torch.randn_like(p) * 0.02)
        else:
            p.add_(torch.randn_like(p) * 0.1)
            p.copy_(p.half().float())
    return model


def roundtrip_model(model: tg.GPT, h) -> tg.GPT:
    fresh = tg.build_model(h)
    fresh.load_state_dict(tg.dequantize(tg.deserialize(tg.serialize(tg.quantize_model(model)))))
    return fresh


def state_equal(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (bit-exactly, dtype included); [] if identical."""
    assert set(a) == set(b)
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def log_value(text: str, pattern: str):
    """The groups of the one log line that starts with `pattern` (the log file also holds the source code)."""
    m = re.findall("^" + pattern, text, flags=re.M)
    assert len(m) == 1, f"expected one match of {pattern!r} in the log, found {m}"
    return m[0]


# ----------------------------------------------------------------------------- 1. QAT forward == exported model


@pytest.mark.parametrize("seed", [0, 1])
def test_qat_forward_equals_exported_and_reloaded_model(seed):
    h = tiny()
    model = random_model(seed)
    assert all(getattr(model, n).abs().min(dim=-1).values.max() > 0 for n in tg.BANK_NAMES)
    ids = torch.randint(0, h.vocab_size, (3, h.train_seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        qat_logits = model(ids, qat=True)
        float_logits = model(ids)
        loaded = roundtrip_model(model, h)
        loaded_logits = loaded(ids, qat=False)
    assert (qat_logits - loaded_logits).abs().max().item() < 1e-5
    # The comparison is not vacuous: quantization does move the logits.
    assert (float_logits - loaded_logits).abs().max().item() > 1e-4


# ----------------------------------------------------------------------------- 2. error bounds per tensor class


def test_int6_banks_codes_and_error_bound():
    model = random_model(3, heavy_tails=True, model_dim=128)  # rows of 128-256: the search can clip outliers
    q = tg.quantize_model(model)
    deq = tg.dequantize(q)
    clipped_total = 0
    for name in tg.BANK_NAMES:
        kind, codes, scales = q[name]
        w = getattr(model, name).detach().float()
        assert kind == "int6" and codes.dtype == torch.int8 and scales.dtype == torch.float16
        assert codes.shape == w.shape and scales.shape == w.shape[:-1]
        assert int(codes.min()) >= -tg.INT6_MAX and int(codes.max()) <= tg.INT6_MAX
        s = scales.float().unsqueeze(-1)
        assert (s > 0).all()
        inside = (w / s).abs() <= tg.INT6_MAX + 0.5
        err = (deq[name] - w).abs()
        assert (err[inside] <= s.expand_as(w)[inside] * (0.5 + 1e-5)).all(), name
        clipped_total += int((~inside).sum())
        assert (~inside).float().mean() < 0.01, name  # percentile clipping only touches outliers
    assert clipped_total > 0  # heavy tails: some percentile below the row max was chosen somewhere


def test_int8_embeddings_codes_and_error_bound():
    model = random_model(4)
    q = tg.quantize_model(model)
    deq = tg.dequantize(q)
    names = [n for n, _ in model.named_parameters() if n in tg.TOKEN_PARAM_NAMES]
    assert sorted(names) == sorted(tg.TOKEN_PARAM_NAMES)
    for name in names:
        kind, codes, scales = q[name]
        w = model.state_dict()[name].float()
        assert kind == "int8" and codes.dtype == torch.int8 and scales.shape == w.shape[:-1]
        assert int(codes.min()) >= -tg.INT8_MAX and int(codes.max()) <= tg.INT8_MAX
        s = scales.float().unsqueeze(-1)
        inside = (w / s).abs() <= tg.INT8_MAX + 0.5
        assert inside.float().mean() > 0.99
        err = (deq[name] - w).abs()
        assert (err[inside] <= s.expand_as(w)[inside] * (0.5 + 1e-5)).all(), name


def test_fp16_passthrough_relative_error_and_dtype():
    torch.manual_seed(5)
    model = tg.build_model(tiny())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # NOT pre-rounded to fp16 here
    q = tg.quantize_model(model)
    deq = tg.dequantize(q)
    sd = model.state_dict()
    passthrough = [n for n in sd if is_passthrough(n)]
    assert "bigram.proj.weight" in passthrough and "smear" in passthrough
    for name in passthrough:
        kind, a, dtype = q[name]
        assert kind == "fp16" and a.dtype == torch.float16 and dtype == "float32"
        w, r = sd[name].float(), deq[name]
        assert r.dtype == sd[name].dtype and r.shape == sd[name].shape
        assert ((r - w).abs() <= 1e-3 * w.abs().clamp_min(2.0 ** -14)).all(), name
        assert (r - w).norm() <= 1e-3 * w.norm(), name


def _candidate_scales(w: torch.Tensor) -> dict[float, torch.Tensor]:
    """Per-row scales for every candidate percentile, computed independently with torch.quantile."""
    ps = torch.tensor(tg.INT6_CLIP_PERCENTILES, dtype=torch.float64)
    qs = torch.quantile(w.abs().double(), ps, dim=-1, interpolation="linear").float()  # (P, ..., R)
    return {p: (qs[i] / tg.INT6_MAX).clamp_min(tg.SCALE_FLOOR).half().float() for i, p in enumerate(tg.INT6_CLIP_PERCENTILES)}


def _matrix_mse(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (tg._quant(w, s, tg.INT6_MAX) * s.unsqueeze(-1) - w).square().mean(dim=(-2, -1))


def test_clip_percentile_search_never_worse_than_row_max():
    model = random_model(6, heavy_tails=True)
    strictly_better = 0
    for name in tg.BANK_NAMES:
        w = getattr(model, name).detach().float()
        s = tg.int6_scales(w)
        chosen = _matrix_mse(w, s)
        row_max = _matrix_mse(w, tg._grid_scale(w.abs().amax(dim=-1), tg.INT6_MAX))
        assert (chosen <= row_max).all(), name
        strictly_better += int((chosen < row_max * 0.999).sum())
        # Per matrix, one percentile for all rows, and it is the best candidate.
        cands = _candidate_scales(w)
        cand_mse = torch.stack([_matrix_mse(w, cs) for cs in cands.values()])  # (P, S)
        assert torch.allclose(chosen, cand_mse.min(dim=0).values, rtol=1e-5, atol=0), name
        for m in range(w.size(0)):
            assert any(torch.allclose(s[m], cs[m], rtol=2e-3, atol=0) for cs in cands.values()), (name, m)
    assert strictly_better > 0


def test_tiny_weights_survive_quantization():
    """A short run's zero-initialized projections are ~1e-4 after a few steps: they must not round to zero."""
    g = torch.Generator().manual_seed(7)
    for shape in [(4, 64, 512), (4, 32, 1536)]:
        w = torch.randn(shape, generator=g) * 1e-4
        s = tg.int6_scales(w)
        rel = ((tg._quant(w, s, tg.INT6_MAX) * s.unsqueeze(-1) - w).norm() / w.norm()).item()
        assert rel < 0.05, (shape, rel)
        # Through the real export path too (fp16 scales stored, dequantized).
        model = tg.build_model(tiny())
        with torch.no_grad():
            model.mlp_down_bank.copy_(torch.randn(model.mlp_down_bank.shape, generator=g) * 1e-4)
        wd = model.mlp_down_bank.detach()
        rd = tg.dequantize(tg.quantize_model(model))["mlp_down_bank"]
        assert ((rd - wd).norm() / wd.norm()).item() < 0.05
        # Contrast: the record's grid, scale = max(clip/31, 1/31), zeroes all of it (~100% error).
        rec_s = torch.maximum(tg.row_quantiles(w.abs(), (1.0,))[0] / 31, torch.tensor(1 / 31)).half().float()
        rec = tg._quant(w, rec_s, tg.INT6_MAX) * rec_s.unsqueeze(-1)
        assert (rec == 0).all()
        assert ((rec - w).norm() / w.norm()).item() > 0.99


@pytest.mark.parametrize("n", [1, 2, 7, 512, 1536])
def test_row_quantiles_matches_torch_quantile(n):
    g = torch.Generator().manual_seed(n)
    absw = torch.randn(3, 40, n, generator=g).abs()
    absw[0, 0] = torch.randint(0, 4, (n,), generator=g).float()  # ties
    ps = tg.INT6_CLIP_PERCENTILES + (tg.INT8_CLIP_PERCENTILE, 0.5)
    got = tg.row_quantiles(absw, ps)
    want = torch.quantile(absw.double(), torch.tensor(ps, dtype=torch.float64), dim=-1, interpolation="linear")
    for i, p in enumerate(ps):
        assert got[i].shape == absw.shape[:-1]
        assert torch.allclose(got[i].double(), want[i], rtol=1e-6, atol=1e-7), p


# ----------------------------------------------------------------------------- 3. roundtrip from file


def test_export_then_load_equals_in_memory_dequantized(tmp_path):
    h = tiny(compressor="auto")
    model = random_model(8)
    path = tmp_path / "final_model.int6.ptz"
    size, codec = tg.export_artifact(h, CPU, model, path)
    assert size == path.stat().st_size and codec.split("+")[0] in tg.CODECS
    loaded = tg.load_artifact(path, h, "cpu")
    expected = tg.dequantize(tg.quantize_model(model))
    assert state_equal(loaded.state_dict(), expected) == []
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("codec", tg.BYTE_CODECS)
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_compressor_roundtrips(tmp_path, monkeypatch, codec, shuffle):
    h = tiny(compressor=codec + ("+shuffle" if shuffle else ""))
    model = random_model(9)
    raw = tg.serialize(tg.quantize_model(model))
    path = tmp_path / "m.ptz"
    size, chosen = tg.export_artifact(h, CPU, model, path)
    assert chosen == codec + ("+shuffle" if shuffle else "")
    blob = path.read_bytes()
    assert blob[:4] == tg.ARTIFACT_MAGIC and blob[4] == tg.CODECS.index(codec) and blob[5] == int(shuffle)
    assert struct.unpack("<IQ", blob[6:18]) == (zlib.crc32(raw), len(raw))
    assert tg.decompress_artifact(blob, path) == raw
    loaded = tg.load_artifact(path, h, "cpu")
    assert state_equal(loaded.state_dict(), tg.dequantize(tg.quantize_model(model))) == []


def test_compress_payload_auto_picks_smallest_and_reports_all():
    raw = tg.serialize(tg.quantize_model(random_model(10)))
    blob, chosen, sizes = tg.compress_payload(raw, "auto")
    pergroup = {"pergroup"} if tg._codec("pergroup") else set()  # skipped without the zpaq module
    assert set(sizes) == {c + s for c in tg.BYTE_CODECS for s in ("", "+shuffle")} | pergroup
    assert sizes[chosen] == min(sizes.values()) == len(blob) - 18
    assert tg.decompress_artifact(blob) == raw
    # each reported size is what that codec really produces
    for name, n in sizes.items():
        c, _, s = name.partition("+")
        payload = tg._shuffle_payload(raw, inverse=False) if s else raw  # pergroup: its own planes inside
        assert len(tg._codec(c)[0](payload)) == n, name
    _, chosen_s, sizes_s = tg.compress_payload(raw, "auto+shuffle")
    assert set(sizes_s) == {c + "+shuffle" for c in tg.BYTE_CODECS} | pergroup
    assert chosen_s.endswith("+shuffle") or chosen_s == "pergroup"


def test_shuffle_is_a_byte_permutation_of_the_fp16_sections():
    raw = tg.serialize(tg.quantize_model(random_model(11)))
    sh = tg._shuffle_payload(raw, inverse=False)
    assert len(sh) == len(raw) and sh != raw and sorted(sh) == sorted(raw)
    assert tg._shuffle_payload(sh, inverse=True) == raw
    (hlen,) = struct.unpack("<I", raw[4:8])
    start = 8 + hlen + json.loads(raw[8:8 + hlen])["sizes"]["q"]
    assert sh[:start] == raw[:start]  # header and int8 codes untouched
    assert sh[start:start + (len(raw) - start) // 2] == raw[start::2]  # low bytes first


# ----------------------------------------------------------------------------- 4. failures


def _export(tmp_path, compressor="lzma", **kw):
    h = tiny(compressor=compressor, **kw)
    path = tmp_path / "final_model.int6.ptz"
    tg.export_artifact(h, CPU, random_model(12, **kw), path)
    return h, path


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_interrupted_write_leaves_no_artifact(tmp_path, monkeypatch, where):
    h = tiny()
    model = random_model(13)
    path = tmp_path / "final_model.int6.ptz"

    def boom(*a, **k):
        raise OSError("simulated crash")

    if where == "replace":
        monkeypatch.setattr(tg.os, "replace", boom)
    elif where == "fsync":
        monkeypatch.setattr(tg.os, "fsync", boom)
    else:  # the write itself dies half way through
        real_open = open

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[:len(data) // 2])
                raise OSError("disk full")

            def __getattr__(self, k):
                return getattr(self.f, k)

        monkeypatch.setattr(tg, "open", lambda p, mode="r", *a, **k: HalfWriter(real_open(p, mode, *a, **k)),
                            raising=False)
    with pytest.raises(OSError, match="simulated crash|disk full"):
        tg.export_artifact(h, CPU, model, path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind
    # An earlier artifact at the path survives a failed overwrite.
    monkeypatch.undo()
    tg.export_artifact(h, CPU, model, path)
    before = path.read_bytes()
    monkeypatch.setattr(tg.os, "replace", boom)
    with pytest.raises(OSError):
        tg.export_artifact(h, CPU, random_model(14), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("compressor", ["lzma", "zstd+shuffle", "brotli"])
def test_damaged_artifacts_raise_valueerror_naming_the_path(tmp_path, compressor):
    h, path = _export(tmp_path, compressor)
    blob = path.read_bytes()
    flipped = bytearray(blob)
    flipped[18 + (len(blob) - 18) // 2] ^= 0x10
    cases = {
        "corrupt": bytes(flipped),
        "truncated": blob[:-100],
        "wrong magic": b"XXXX" + blob[4:],
        "empty": b"",
        "header only": blob[:18],
        "bad codec id": blob[:4] + bytes([7]) + blob[5:],
        "bad length": blob[:10] + struct.pack("<Q", 12345) + blob[18:],
    }
    for label, data in cases.items():
        bad = tmp_path / f"bad {label}.ptz"
        bad.write_bytes(data)
        with pytest.raises(ValueError) as e:
            tg.load_artifact(bad, h, "cpu")
        assert str(bad) in str(e.value), (label, str(e.value))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tg.load_artifact(tmp_path / "missing.ptz", h, "cpu")


@pytest.mark.parametrize("codec", ["zstd", "brotli"])
@pytest.mark.parametrize("damage", ["non-utf8 header", "header without sizes", "shorter than 8 bytes"])
def test_garbage_from_unchecked_codec_is_a_clean_valueerror(tmp_path, codec, damage):
    """zstd (no frame checksum by default) and brotli have no integrity check of their own, so a damaged body can
    decode to garbage; the artifact CRC must still turn that into a ValueError that names the file. With +shuffle
    the inverse shuffle parses the garbage header before the CRC is checked."""
    h = tiny()
    raw = tg.serialize(tg.quantize_model(random_model(15)))
    (hlen,) = struct.unpack("<I", raw[4:8])
    if damage == "non-utf8 header":
        garbage = raw[:9] + b"\xff" + raw[10:]
    elif damage == "header without sizes":
        garbage = raw.replace(b'"sizes"', b'"sizez"', 1)
    else:
        garbage = raw[:6]
    blob = (tg.ARTIFACT_MAGIC + bytes([tg.CODECS.index(codec), 1]) + struct.pack("<IQ", zlib.crc32(raw), len(raw))
            + tg._codec(codec)[0](garbage))
    path = tmp_path / "garbled.ptz"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        tg.load_artifact(path, h, "cpu")


@pytest.mark.parametrize("other", [dict(num_layers=3), dict(bigram_vocab_size=0), dict(model_dim=64),
                                   dict(mlp_mult=3.0), dict(ve_layers="0,1")])
def test_config_mismatch_raises_valueerror(tmp_path, other):
    h, path = _export(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        tg.load_artifact(path, tiny(**other), "cpu")


def test_config_mismatch_names_missing_and_unexpected_tensors(tmp_path):
    """Tensors the model needs but the artifact lacks are "missing"; tensors the artifact has but the model lacks
    are "unexpected". The bigram path's tensors exist only with BIGRAM_VOCAB_SIZE > 0: test both directions."""
    bigram = sorted(set(tg.build_model(tiny()).state_dict()) - set(tg.build_model(tiny(bigram_vocab_size=0)).state_dict()))
    assert bigram
    for kw, load_kw, missing, unexpected in ((dict(bigram_vocab_size=0), {}, bigram, []),
                                             ({}, dict(bigram_vocab_size=0), [], bigram)):
        (tmp_path / str(len(missing))).mkdir()
        _, path = _export(tmp_path / str(len(missing)), **kw)
        with pytest.raises(ValueError) as err:
            tg.load_artifact(path, tiny(**load_kw), "cpu")
        assert f"missing {missing[:5]}, unexpected {unexpected[:5]}" in str(err.value)


# ----------------------------------------------------------------------------- 5. size accounting


# Size accounting does not need the sliding diagnostic or a fine stride: keep the end-to-end runs short.
FAST_EVAL = dict(sliding_diagnostic=False, eval_stride=32)


@pytest.fixture
def fresh_log(monkeypatch):
    """run() points the module-global log at its own file; keep that from leaking into other tests."""
    monkeypatch.setattr(tg, "_LOG", {"path": None, "main": True})


def test_run_size_accounting_uses_the_running_file(dataset, tmp_path, fresh_log):
    h = tiny(**dataset, out_dir=str(tmp_path), run_id="acct", ttt_enabled=False, ngram_enabled=False, **FAST_EVAL)
    assert tg.run(h, CPU) == 0
    log = (tmp_path / "logs" / "acct.txt").read_text()
    code = int(log_value(log, r"Code size: (\d+) bytes"))
    codec, total = log_value(log, r"Total submission size int6\+(\S+): (\d+) bytes")
    model_bytes = int(log_value(log, r"Serialized model int6\+\S+: (\d+) bytes"))
    artifact = tmp_path / "final_model.int6.ptz"
    assert code == tg.shipped_code_bytes(SRC) < len(SRC.read_bytes()) // 2  # the packed file that ships
    budget = int(log_value(log, r"budget model:(\d+) = limit"))
    assert budget == tg.ARTIFACT_LIMIT_BYTES - code - h.artifact_margin_bytes
    run_lines = log[re.search(r"^hparams ", log, re.M).start():]  # the log starts with the source, which holds these strings too
    assert run_lines.index("budget model:") < run_lines.index("Serialized model")  # logged before the export
    assert model_bytes == artifact.stat().st_size
    assert int(total) == code + model_bytes
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert (sub["bytes_code"], sub["bytes_model"], sub["bytes_total"]) == (code, model_bytes, code + model_bytes)
    assert sub["compressor"] == codec == "lzma" or sub["compressor"] == codec == "lzma+shuffle"
    assert sub["val_bpb"] == float(log_value(log, r"final_score val_loss:\S+ val_bpb:(\S+)"))
    assert sub["val_loss"] == float(log_value(log, r"final_score val_loss:(\S+) "))
    assert sub["steps"] == h.iterations


@pytest.fixture(scope="module")
def packed_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "train_gpt.py"
    path.write_text(pack.pack_source(SRC.read_text(encoding="utf-8")), encoding="ascii")
    return path


def test_packed_module_gives_identical_logits(packed_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_gpt_packed", packed_path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_gpt_packed", mod)  # dataclasses look their module up while defining
    spec.loader.exec_module(mod)
    assert mod.__file__ == str(packed_path) and mod.build_model is not tg.build_model
    h_orig, h_packed = tiny(), mod.Hyperparameters(**TINY)
    assert tg.asdict(h_orig) == mod.asdict(h_packed)
    torch.manual_seed(21)
    a = tg.build_model(h_orig)
    torch.manual_seed(21)
    b = mod.build_model(h_packed)
    assert state_equal(a.state_dict(), b.state_dict()) == []
    ids = torch.randint(0, h_orig.vocab_size, (2, h_orig.train_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for qat in (False, True):
            assert torch.equal(a(ids, qat=qat), b(ids, qat=qat))
    assert mod.serialize(mod.quantize_model(b)) == tg.serialize(tg.quantize_model(a))


def tiny_env(dataset, out_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PRESET", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    for k, v in TINY.items():
        env[k.upper()] = ("1" if v else "0") if isinstance(v, bool) else str(v)
    env.update(DATA_PATH=dataset["data_path"], TOKENIZER_PATH=dataset["tokenizer_path"], OUT_DIR=str(out_dir),
               RUN_ID="packed", TTT_ENABLED="0", NGRAM_ENABLED="0", TORCH_COMPILE_DISABLE="1",
               **{k.upper(): str(int(v)) for k, v in FAST_EVAL.items()})
    return env


def test_packed_script_counts_its_own_bytes(dataset, packed_path, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(packed_path)], env=tiny_env(dataset, out), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    log = (out / "logs" / "packed.txt").read_text()
    packed_len = len(packed_path.read_bytes())
    assert packed_len < len(SRC.read_bytes()) // 2
    assert int(log_value(r.stdout, r"Code size: (\d+) bytes")) == packed_len
    assert int(log_value(log, r"Code size: (\d+) bytes")) == packed_len
    model_bytes = (out / "final_model.int6.ptz").stat().st_size
    assert int(log_value(log, r"Total submission size \S+: (\d+) bytes")) == packed_len + model_bytes
    sub = json.loads((out / "submission.json").read_text())
    assert (sub["bytes_code"], sub["bytes_total"]) == (packed_len, packed_len + model_bytes)


def test_shipped_code_bytes_is_what_the_pack_tool_writes(tmp_path, packed_path):
    out = tmp_path / "train_gpt.py"
    assert pack.main([str(SRC), str(out)]) == 0
    assert tg.shipped_code_bytes(SRC) == len(out.read_bytes())
    assert tg.shipped_code_bytes(packed_path) == len(packed_path.read_bytes())  # already packed: its own length
    assert tg.model_budget_bytes(tiny(artifact_margin_bytes=7), 1000) == tg.ARTIFACT_LIMIT_BYTES - 1007


def _fake_result(bpb=1.25):
    return tg.EvalResult(losses={"neural": 0.9}, bpbs={"neural": bpb}, final="neural", tokens=10, bytes=20,
                         seconds=0.1)


@pytest.mark.parametrize("limit, model_bytes, rc", [
    ("real", "just over", 1),
    ("real", "exactly at", 0),
    ("real", "well under", 0),
    ("small", 5000, 1),
])
def test_finish_over_limit_returns_1_after_writing_submission(tmp_path, monkeypatch, capsys, fresh_log,
                                                              limit, model_bytes, rc):
    code = tg.shipped_code_bytes(SRC)
    if limit == "small":
        monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", 10_000)
    lim = tg.ARTIFACT_LIMIT_BYTES
    model_bytes = {"just over": lim - code + 1, "exactly at": lim - code, "well under": 1000}.get(model_bytes, model_bytes)
    events = []
    real_write, real_log = tg.write_atomic, tg.log0
    monkeypatch.setattr(tg, "write_atomic", lambda p, d: (events.append(("write", Path(p).name)), real_write(p, d)))
    monkeypatch.setattr(tg, "log0", lambda m, console=True: (events.append(("log", m)), real_log(m, console)))
    h = tiny(out_dir=str(tmp_path), run_id="rid")
    assert tg.finish(h, CPU, _fake_result(), 7, 1234.0, 5.0, model_bytes, "lzma") == rc
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert sub["bytes_total"] == code + model_bytes and sub["bytes_model"] == model_bytes
    assert sub["val_bpb"] == 1.25 and sub["steps"] == 7
    errors = [i for i, e in enumerate(events) if e[0] == "log" and e[1].startswith("ERROR")]
    if rc:
        assert len(errors) == 1 and f"bytes_total {code + model_bytes}" in events[errors[0]][1]
        assert str(lim) in events[errors[0]][1]
        assert events.index(("write", "submission.json")) < errors[0]
        assert "ERROR" in capsys.readouterr().out
    else:
        assert errors == []


# ----------------------------------------------------------------------------- 6. QAT active on the banks


@pytest.mark.parametrize("mode", ["from_step_0", "late"])
def test_train_turns_qat_on_over_banks_and_tables(dataset, capsys, fresh_log, mode):
    kw = dict(qat_enabled=True) if mode == "from_step_0" else dict(qat_enabled=False, late_qat_threshold=0.6)
    h = tiny(**dataset, iterations=4, warmdown_iters=2, **kw)
    torch.manual_seed(0)
    model = tg.build_model(h)
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    tg.train(tg.EvalContext(h, CPU, val, tg.load_byte_counter(h)), model)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("qat:on")]
    assert len(lines) == 1, lines
    named = dict(model.named_parameters())
    banks = sum(named[n].numel() for n in tg.BANK_NAMES)
    tables = sum(named[n].numel() for n in tg.TOKEN_PARAM_NAMES)
    fields = dict(kv.split(":") for kv in lines[0].split()[1:])
    assert int(fields["fake_quant_elements"]) == banks + tables
    assert int(fields["bank_elements"]) == banks
    # iterations 4, warmdown 2: lr_mult is 1, 1, 1, 0.5 -> late QAT (threshold 0.6) starts at step 3
    assert int(fields["step"]) == (0 if mode == "from_step_0" else 3)


@pytest.mark.parametrize("name, qmax", [("mlp_up_bank", tg.INT6_MAX), ("qo_bank", tg.INT6_MAX),
                                        ("tok_emb.weight", tg.INT8_MAX), ("bigram.embed.weight", tg.INT8_MAX)])
def test_fake_quant_straight_through_gradient(name, qmax):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(3, 16, 64, generator=gen) * 0.05).requires_grad_(True)
    g = torch.randn(w.shape, generator=gen)
    out = tg.fake_quant(w, name)  # the seed's grid: int6 banks, int8 tables
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)
    # the forward is really the grid value, not the identity
    s = (tg.int6_scales(w) if qmax == tg.INT6_MAX else tg.int8_scales(w)).unsqueeze(-1)
    assert torch.equal(out.detach(), tg._quant(w.detach(), s.squeeze(-1), qmax) * s)
    assert not torch.equal(out.detach(), w.detach())
    assert ((out.detach() / s).round() - out.detach() / s).abs().max() < 1e-3


# ----------------------------------------------------------------------------- 7. fit to budget


FIT_KW = dict(model_dim=64, mlp_mult=3.0, compressor="lzma")  # int6 banks are most of this artifact


@torch.no_grad()
def dense_model(seed=0, **kw) -> tg.GPT:
    """Dense Gaussian banks (no zero-initialized projections): the pessimistic case for the size."""
    torch.manual_seed(seed)
    model = tg.build_model(tiny(**{**FIT_KW, **kw}))
    for n in tg.BANK_NAMES:
        p = getattr(model, n)
        p.copy_(torch.randn(p.shape) / p.size(-1) ** 0.5)
    return model


def natural_blob(model, compressor="lzma") -> bytes:
    return tg.compress_payload(tg.serialize(tg.quantize_model(model)), compressor)[0]


def export_with_budget(tmp_path, monkeypatch, model, budget, name="m.ptz", **kw):
    """export_artifact with the 16 MB limit scaled down so that the model budget is `budget`."""
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", tg.shipped_code_bytes(SRC) + budget)
    path = tmp_path / name
    return tg.export_artifact(tiny(**{**FIT_KW, **kw}), CPU, model, path), path


FIT_RE = (r"fit budget:(\d+) before:(\d+) after:(\d+) pruned:(\d+) of:(\d+) rel_error:([\d.]+)->([\d.]+) "
          r"time:[\d.]+s codec:\S+ probes:(\d+)")


def test_fit_prunes_an_over_budget_model_under_its_budget(tmp_path, monkeypatch, capsys, fresh_log):
    model = dense_model()
    natural = len(natural_blob(model))
    budget = natural - natural // 300  # 0.33% over: a few KB of int6 values must go
    calls = []
    real_compress = tg.compress_payload
    monkeypatch.setattr(tg, "compress_payload", lambda raw, c: (calls.append(c), real_compress(raw, c))[1])
    (size, codec), path = export_with_budget(tmp_path, monkeypatch, model, budget)
    assert size == path.stat().st_size <= budget < natural
    fit = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fit ")]
    assert len(fit) == 1
    b, before, after, k, of, e0, e1, probes = re.fullmatch(FIT_RE, fit[0]).groups()
    assert (int(b), int(before), int(after)) == (budget, natural, size)
    q = tg.quantize_model(model)
    assert int(of) == sum(q[n][1].numel() for n in tg.BANK_NAMES)
    assert 0 < int(k) <= tiny(**FIT_KW).fit_max_prune_fraction * int(of)
    assert float(e1) > float(e0) > 0
    assert len(calls) == 1 + int(probes) <= 1 + tg.FIT_PROBES and set(calls[1:]) <= {codec}  # the shipping codec
    # the artifact holds exactly the k cheapest |q| = 1 values zeroed, nothing else changed
    loaded = tg.deserialize(tg.decompress_artifact(path.read_bytes()))
    order = tg.prune_order(q, int(k))
    assert tg.serialize(loaded) == tg.serialize(tg.pruned(q, order, int(k)))
    changed = sum(int((loaded[n][1] != q[n][1]).sum()) for n in tg.BANK_NAMES)
    assert changed == int(k)
    for n in tg.BANK_NAMES:
        gone = (loaded[n][1] == 0) & (q[n][1] != 0)
        assert bool((q[n][1][gone].abs() == 1).all())


def test_prune_order_is_cheapest_first_and_follows_the_hessian():
    q = tg.quantize_model(dense_model(1))
    names = tg._int6_names(q)
    tid, idx = tg.prune_order(q, 2000)
    cost = torch.stack([q[names[t]][2].float().reshape(-1)[i // q[names[t]][1].size(-1)].square()
                        for t, i in zip(tid.tolist(), idx.tolist())])
    assert bool((cost[1:] >= cost[:-1]).all())  # never a costlier value before a cheaper one
    assert all(int(q[names[t]][1].reshape(-1)[i].abs()) == 1 for t, i in zip(tid.tolist(), idx.tolist()))
    # a huge Hessian diagonal on input column 0 of every matrix: those values go last
    hd = {n: torch.ones(q[n][1].shape[:-2] + q[n][1].shape[-1:]) for n in names}
    for v in hd.values():
        v[..., 0] = 1e9
    def cols(order):
        return [i % q[names[t]][1].size(-1) for t, i in zip(order[0].tolist(), order[1].tolist())]

    assert 0 not in cols(tg.prune_order(q, 2000, hd)) and 0 in cols((tid, idx))
    with pytest.raises(ValueError, match="hessian_diag\\['qo_bank'\\] has shape"):
        tg.prune_order(q, 10, {"qo_bank": torch.ones(3)})


@pytest.mark.parametrize("where", ["well under", "exactly at"])
def test_fit_leaves_a_fitting_artifact_byte_identical(tmp_path, monkeypatch, capsys, fresh_log, where):
    model = dense_model(2)
    blob = natural_blob(model)
    budget = len(blob) + (100_000 if where == "well under" else 0)
    (size, _), path = export_with_budget(tmp_path, monkeypatch, model, budget)
    assert path.read_bytes() == blob and size == len(blob)
    fit = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fit ")]
    assert re.fullmatch(FIT_RE, fit[0]).group(4, 8) == ("0", "0")


def test_fit_is_deterministic(tmp_path, monkeypatch, fresh_log):
    natural = len(natural_blob(dense_model(3)))
    (_, _), a = export_with_budget(tmp_path, monkeypatch, dense_model(3), natural - 400, "a.ptz")
    (_, _), b = export_with_budget(tmp_path, monkeypatch, dense_model(3), natural - 400, "b.ptz")
    assert a.read_bytes() == b.read_bytes() and len(a.read_bytes()) < natural


def test_fit_beyond_the_prune_cap_is_an_error_that_writes_nothing(tmp_path, monkeypatch, capsys, fresh_log):
    model = dense_model(4)
    natural = len(natural_blob(model))
    budget = natural * 9 // 10  # 10% off: far beyond what 5% of the int6 values can give
    with pytest.raises(RuntimeError, match=f"FIT_MAX_PRUNE_FRACTION=0.05 .* > the model budget {budget} .*"
                                           f"unpruned {natural} bytes.*nothing was written"):
        export_with_budget(tmp_path, monkeypatch, model, budget)
    assert list(tmp_path.iterdir()) == []
    assert "ERROR: fit:" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="FIT_MAX_PRUNE_FRACTION=0.0 .*\\(0\\)"):  # a cap of 0: no pruning at all
        export_with_budget(tmp_path, monkeypatch, model, natural - 1, fit_max_prune_fraction=0.0)
    assert list(tmp_path.iterdir()) == []
