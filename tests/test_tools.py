"""Tests for tools/pack.py, tools/plot_log.py and tools/make_submission.py (CPU only, no network, < 60 s)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_submission as ms  # noqa: E402
import pack  # noqa: E402
import plot_log  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_py(path, *args, env_extra=None, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60)


def import_from_path(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def public_names(mod):
    return {k for k in vars(mod) if not k.startswith("__")}


# ----------------------------------------------------------------------------- pack

SCRIPT = '''"""A tiny script: docstring, comments, unicode (naïve café, Ω, 日本語, emoji \U0001F600)."""
from __future__ import annotations

import sys

GREETING = "héllo wörld"  # a non-ASCII comment: ∑ λ


def add(a: int, b: int) -> int:
    return a + b


class Point:
    x: int = 1


def boom():
    raise ValueError("boom")


if __name__ == "__main__":
    print("MAIN", add(2, 3), GREETING, __file__.endswith("packed.py"))
    if len(sys.argv) > 1 and sys.argv[1] == "boom":
        boom()
'''

SOURCES = {
    "script": SCRIPT,
    "empty": "",
    "crlf_no_trailing_newline": "x = 1\r\ny = 'tab\\there'\r\nprint(x + 1)",
    "quotes_and_backslashes": 'S = "\\"\'\\\\ )]} b85decode(\\"x\\") __file__"\n',
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_pack_roundtrip_exact(name):
    src = SOURCES[name]
    packed = pack.pack_source(src)
    packed.encode("ascii")  # the wrapper is pure ASCII
    assert packed.count("\n") <= 2
    assert pack.is_packed(packed)
    assert pack.unpack(packed) == src
    assert pack.unpack_bytes(packed) == src.encode("utf-8")


def test_pack_roundtrip_bytes_non_utf8():
    data = b"# -*- coding: latin-1 -*-\nS = '\xe9t\xe9'\n"
    assert pack.unpack_bytes(pack.pack_source(data)) == data


def test_pack_is_deterministic_and_search_not_worse():
    src = Path(dataclasses.__file__).read_text()
    a, b = pack.pack_source(src), pack.pack_source(src)
    assert a == b
    assert len(a) <= len(pack.pack_source(src, search=False))


def test_packed_smaller_than_raw_for_realistic_source():
    raw = Path(dataclasses.__file__).read_bytes()  # ~58 KB of real Python
    assert 40_000 < len(raw) < 100_000
    packed = pack.pack_source(raw).encode("ascii")
    assert len(packed) < 0.45 * len(raw), (len(raw), len(packed))
    assert pack.unpack_bytes(packed) == raw


def test_unpack_rejects_other_files():
    with pytest.raises(ValueError):
        pack.unpack("print('hello')\n")
    assert not pack.is_packed("print('hello')\n")


def test_pack_cli_and_packed_runs_as_script(tmp_path):
    src = tmp_path / "src.py"
    src.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / "packed.py"
    r = run_py(ROOT / "tools" / "pack.py", src, out)
    assert r.returncode == 0, r.stderr
    assert f"raw: {len(SCRIPT.encode())} bytes" in r.stdout
    assert f"packed: {out.stat().st_size} bytes" in r.stdout
    assert out.read_bytes().isascii()

    r = run_py(out, env_extra={"PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "MAIN 5 héllo wörld True\n"

    # tracebacks name the packed file and the original line numbers
    r = run_py(out, "boom")
    assert r.returncode == 1
    line = SCRIPT.splitlines().index('    raise ValueError("boom")') + 1
    assert f'File "{out}", line {line}, in boom' in r.stderr
    assert "ValueError: boom" in r.stderr

    # --unpack recovers the source byte for byte
    back = tmp_path / "back.py"
    assert run_py(ROOT / "tools" / "pack.py", "--unpack", out, back).returncode == 0
    assert back.read_bytes() == src.read_bytes()


def test_packed_imports_as_module_with_same_names(tmp_path):
    src = tmp_path / "orig.py"
    src.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / "packed.py"
    out.write_text(pack.pack_source(SCRIPT))
    orig = import_from_path(src, "tools_test_orig")
    packed = import_from_path(out, "train_gpt_packed")
    assert public_names(packed) == public_names(orig)
    assert packed.add(2, 3) == 5 and packed.GREETING == orig.GREETING
    assert packed.__name__ == "train_gpt_packed" and packed.add.__module__ == "train_gpt_packed"
    assert packed.add.__code__.co_filename == str(out)


def test_unpack_command_prints_source(tmp_path):
    out = tmp_path / "train_gpt.py"
    out.write_text(pack.pack_source(SCRIPT))
    r = subprocess.run(pack.unpack_command("train_gpt.py"), shell=True, cwd=tmp_path, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == SCRIPT.encode("utf-8")


NUMBA_SCRIPT = '''from numba import njit


@njit(cache=True)
def sum_squares(n):
    s = 0
    for i in range(n):
        s += i * i
    return s


if __name__ == "__main__":
    print(sum_squares(10), sum(sum_squares.stats.cache_hits.values()), sum(sum_squares.stats.cache_misses.values()))
'''


def test_packed_numba_cache(tmp_path):
    pytest.importorskip("numba")
    out = tmp_path / "packed.py"
    out.write_text(pack.pack_source(NUMBA_SCRIPT))
    cache = tmp_path / "numba_cache"
    env = {"NUMBA_CACHE_DIR": str(cache), "NUMBA_DISABLE_JIT": "0"}

    r1 = run_py(out, env_extra=env)
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout.split() == ["285", "0", "1"]  # compiled, not from cache
    files = [p.name for p in cache.rglob("*")]
    assert any(f.endswith(".nbi") for f in files) and any(f.endswith(".nbc") for f in files), files

    r2 = run_py(out, env_extra=env)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.split() == ["285", "1", "0"]  # loaded from the cache written by the first process


def test_numba_cache_fails_under_plain_exec_of_string(tmp_path):
    """Control for the test above: without compile(..., __file__) Numba has no file to key its cache on."""
    pytest.importorskip("numba")
    bad = tmp_path / "bad.py"
    bad.write_text(f"exec({NUMBA_SCRIPT!r})\n")
    r = run_py(bad, env_extra={"NUMBA_CACHE_DIR": str(tmp_path / "c"), "NUMBA_DISABLE_JIT": "0"})
    assert r.returncode != 0
    assert "cannot cache function" in r.stderr


# ----------------------------------------------------------------------------- plot_log

FINAL_BPB, FINAL_LOSS = 1.12345678, 1.89654321


def synthetic_log(final_bpb=FINAL_BPB, final_loss=FINAL_LOSS, n_final=1, code_bytes=None, model_bytes=None):
    lines = [
        'import os  # the logged source comes first',
        '    log0(f"step:{step}/{h.iterations} train_loss:{loss:.4f} train_time:{t_ms:.0f}ms step_avg:{a:.2f}ms")',
        "hparams: {'iterations': 20}",
        "step:0/20 val_loss:6.9312 val_bpb:4.1050 train_time:0ms step_avg:0.02ms",
    ]
    for s in range(1, 21):
        lines.append(f"step:{s}/20 train_loss:{7 - 0.2 * s:.4f} train_time:{100 * s:.0f}ms step_avg:{100.0:.2f}ms")
        if s % 10 == 0:
            lines.append(f"step:{s}/20 val_loss:{5 - 0.1 * s:.4f} val_bpb:{3 - 0.05 * s:.4f} "
                         f"train_time:{100 * s:.0f}ms step_avg:{100.0:.2f}ms")
    lines.append("stopping_early: wallclock_cap train_time:2000ms step:20/20")
    lines.append("peak memory allocated: 100 MiB reserved: 120 MiB")
    if model_bytes is not None:
        lines.append(f"Serialized model int6+brotli: {model_bytes} bytes")
    if code_bytes is not None:
        lines.append(f"Code size: {code_bytes} bytes")
        lines.append(f"Total submission size int6+brotli: {model_bytes + code_bytes} bytes")
    lines.append("pre_quant val_loss:1.90000000 val_bpb:1.13000000 eval_time:1234ms")
    lines.append("int6_roundtrip val_loss:1.91000000 val_bpb:1.13500000 eval_time:1300ms")
    lines += [f"final_score val_loss:{final_loss:.8f} val_bpb:{final_bpb:.8f} eval_time:5000ms"] * n_final
    lines.append("final_int8_zlib_roundtrip val_loss:1.9100 val_bpb:1.1350 eval_time:1300ms")
    lines.append("final_int8_zlib_roundtrip_exact val_loss:1.91000000 val_bpb:1.13500000")
    return "\n".join(lines) + "\n"


def test_parse_log():
    d = plot_log.parse_log(synthetic_log(code_bytes=20_000, model_bytes=15_000_000))
    assert [p["step"] for p in d["train"]] == list(range(1, 21))
    assert d["train"][0] == dict(step=1, iterations=20, train_loss=6.8, train_time_ms=100.0, step_avg_ms=100.0)
    assert [p["step"] for p in d["val"]] == [0, 10, 20]
    assert d["val"][-1]["val_bpb"] == pytest.approx(2.0)
    assert d["final_score"] == dict(val_loss=FINAL_LOSS, val_bpb=FINAL_BPB, eval_time_ms=5000.0)
    assert d["final_score_count"] == 1
    assert d["roundtrip"] == dict(val_loss=1.91, val_bpb=1.135, eval_time_ms=1300.0)
    assert d["roundtrip_exact"] == dict(val_loss=1.91, val_bpb=1.135)
    assert set(d["stages"]) == {"pre_quant", "int6_roundtrip", "final_score"}
    assert d["stopping_early"] == dict(train_time_ms=2000.0, step=20, iterations=20)
    assert (d["model_bytes"], d["code_bytes"], d["total_bytes"]) == (15_000_000, 20_000, 15_020_000)


def test_parse_log_counts_final_score_and_handles_crlf():
    d = plot_log.parse_log(synthetic_log(n_final=2).replace("\n", "\r\n"))
    assert d["final_score_count"] == 2
    assert len(d["train"]) == 20


@pytest.mark.parametrize("regex,line", [
    ("TRAIN_RE", "step:5/20000 train_loss:3.1234 train_time:1234ms step_avg:246.80ms"),
    ("TRAIN_RE", "step:5/20000 train_loss:nan train_time:1234ms step_avg:246.80ms"),
    ("VAL_RE", "step:0/20000 val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.01ms"),
    ("ROUNDTRIP_RE", "final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2276 eval_time:1406ms"),
    ("ROUNDTRIP_EXACT_RE", "final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:1.22756313"),
    ("FINAL_SCORE_RE", "final_score val_loss:2.07269931 val_bpb:1.22756313 eval_time:598123ms"),
    ("STAGE_RE", "int6_sliding val_loss:2.07269931 val_bpb:1.22756313 eval_time:98123ms"),
    ("STOPPING_EARLY_RE", "stopping_early: wallclock_cap train_time:600012ms step:13780/20000"),
    ("MODEL_BYTES_RE", "Serialized model int6+brotli: 15873100 bytes"),
    ("CODE_BYTES_RE", "Code size: 47686 bytes"),
    ("TOTAL_BYTES_RE", "Total submission size int6+brotli: 15920786 bytes"),
])
def test_regexes_match_canonical_lines(regex, line):
    assert getattr(plot_log, regex).fullmatch(line)


@pytest.mark.parametrize("regex,line", [
    ("TRAIN_RE", "step:5/20000 train_loss:3.123 train_time:1234ms step_avg:246.80ms"),      # .3f, not .4f
    ("TRAIN_RE", "step:5/20000  train_loss:3.1234 train_time:1234ms step_avg:246.80ms"),    # double space
    ("TRAIN_RE", "step:5/20000 train_loss: 3.1234 train_time:1234ms step_avg:246.80ms"),    # space after colon
    ("VAL_RE", "step:0/20000 val_loss:6.9357 val_bpb:4.1077 train_time:0.0ms step_avg:0.01ms"),
    ("ROUNDTRIP_EXACT_RE", "final_int8_zlib_roundtrip_exact val_loss:2.0727 val_bpb:1.2276"),
    ("FINAL_SCORE_RE", "final_score val_loss:2.07269931 val_bpb:1.22756313"),               # eval_time missing
    ("FINAL_SCORE_RE", "final_score val_loss:2.07269931 val_bpb:1.22756313 eval_time:598123ms trailing"),
])
def test_regexes_reject_drifted_lines(regex, line):
    assert not getattr(plot_log, regex).search(line)


def test_plot_writes_png(tmp_path):
    log = tmp_path / "run.txt"
    log.write_text(synthetic_log())
    out = tmp_path / "plot.png"
    plot_log.main([str(log), "--out", str(out)])
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_plot_empty_log_still_writes_png(tmp_path):
    out = plot_log.plot_log(plot_log.parse_log(""), tmp_path / "empty.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


# ----------------------------------------------------------------------------- make_submission


@pytest.fixture
def inputs(tmp_path):
    """A fake run: readable script, its packed size as bytes_code, a log and a matching submission.json."""
    script = tmp_path / "train_gpt.py"
    script.write_text(SCRIPT, encoding="utf-8")
    code_bytes = len(pack.pack_source(SCRIPT))
    model_bytes = 15_000_000
    log = tmp_path / "run.txt"
    log.write_text(synthetic_log(code_bytes=code_bytes, model_bytes=model_bytes))
    sub = dict(author="A. Golfer", github_id="agolfer", name="Tiny test record", blurb="A blurb.", date="2026-05-01",
               val_bpb=FINAL_BPB, val_loss=FINAL_LOSS, bytes_total=model_bytes + code_bytes, bytes_model=model_bytes,
               bytes_code=code_bytes, steps=20, train_seconds=599.1, eval_seconds=512.3, hardware="8xH100 SXM",
               seed=1337, compressor="brotli")
    sj = tmp_path / "submission.json"
    sj.write_text(json.dumps(sub, indent=2))

    def call(out="rec", **overrides):
        if overrides:
            sj.write_text(json.dumps({**sub, **overrides}, indent=2))
        return ms.make_submission(log, script, sj, tmp_path / out)

    return dict(tmp=tmp_path, script=script, log=log, sj=sj, sub=sub, call=call)


def test_make_submission_builds_folder(inputs):
    out = inputs["call"]()
    assert sorted(p.name for p in out.iterdir()) == sorted(ms.OUTPUT_FILES)
    shipped = (out / "train_gpt.py").read_bytes()
    assert pack.is_packed(shipped) and pack.unpack_bytes(shipped) == inputs["script"].read_bytes()
    assert len(shipped) == inputs["sub"]["bytes_code"]
    assert (out / "train.log").read_bytes() == inputs["log"].read_bytes()
    assert (out / "submission.json").read_bytes() == inputs["sj"].read_bytes()
    assert (out / "plot.png").read_bytes()[:8] == PNG_SIGNATURE
    readme = (out / "README.md").read_text()
    for s in ("Tiny test record", "--nproc_per_node=8 train_gpt.py", "1.12345678", "1.89654321", "15,000,000", "8xH100 SXM", "1337", "| `steps` | 20 |",
              f"{inputs['sub']['bytes_code']:,}", "agolfer"):
        assert s in readme, s
    # the packed script still runs from the record folder
    r = run_py(out / "train_gpt.py", env_extra={"PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0 and r.stdout.startswith("MAIN 5"), r.stderr


def test_make_submission_cli(inputs):
    out = inputs["tmp"] / "cli_rec"
    r = run_py(ROOT / "tools" / "make_submission.py", "--log", inputs["log"], "--script", inputs["script"],
               "--submission-json", inputs["sj"], "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "README.md").exists()
    r = run_py(ROOT / "tools" / "make_submission.py", "--log", inputs["log"], "--script", inputs["script"],
               "--submission-json", inputs["sj"], "--out", out)
    assert r.returncode == 2 and "not empty" in r.stderr


def test_make_submission_val_bpb_mismatch(inputs):
    with pytest.raises(ms.SubmissionError, match=r"val_bpb=1\.12345679 .*final_score val_bpb=1\.12345678"):
        inputs["call"](val_bpb=FINAL_BPB + 1e-8)
    assert not (inputs["tmp"] / "rec").exists()  # nothing written on failure


def test_make_submission_val_bpb_equal_to_8_decimals_passes(inputs):
    inputs["call"](val_bpb=FINAL_BPB + 1e-10)


def test_make_submission_bytes_total_over_limit(inputs):
    code = inputs["sub"]["bytes_code"]
    with pytest.raises(ms.SubmissionError, match=r"bytes_total=16,000,001 exceeds the limit 16,000,000"):
        inputs["call"](bytes_total=16_000_001, bytes_model=16_000_001 - code)


def test_make_submission_bytes_inconsistent(inputs):
    with pytest.raises(ms.SubmissionError, match="bytes_total=.* != bytes_model"):
        inputs["call"](bytes_total=inputs["sub"]["bytes_total"] - 1)
    with pytest.raises(ms.SubmissionError, match="bytes_code=.* smaller than the shipped"):
        code = inputs["sub"]["bytes_code"] - 1
        inputs["call"](bytes_code=code, bytes_total=inputs["sub"]["bytes_model"] + code)


def test_make_submission_missing_field_and_bad_log(inputs):
    sub = {k: v for k, v in inputs["sub"].items() if k != "seed"}
    inputs["sj"].write_text(json.dumps(sub))
    with pytest.raises(ms.SubmissionError, match="missing field.*seed"):
        ms.make_submission(inputs["log"], inputs["script"], inputs["sj"], inputs["tmp"] / "rec")
    inputs["sj"].write_text(json.dumps(inputs["sub"]))
    inputs["log"].write_text(synthetic_log(n_final=2))
    with pytest.raises(ms.SubmissionError, match="exactly one final_score line, found 2"):
        ms.make_submission(inputs["log"], inputs["script"], inputs["sj"], inputs["tmp"] / "rec")


def test_make_submission_refuses_non_empty_dir(inputs):
    out = inputs["tmp"] / "rec"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ms.SubmissionError, match="not empty"):
        inputs["call"]()
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    ms.make_submission(inputs["log"], inputs["script"], inputs["sj"], out, force=True)
    assert (out / "train_gpt.py").exists() and (out / "keep.txt").exists()


def test_make_submission_ships_already_packed_script_as_is(inputs):
    packed = inputs["tmp"] / "dist_train_gpt.py"
    packed.write_text(pack.pack_source(SCRIPT))
    out = ms.make_submission(inputs["log"], packed, inputs["sj"], inputs["tmp"] / "rec")
    assert (out / "train_gpt.py").read_bytes() == packed.read_bytes()
