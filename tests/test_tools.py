"""Tests for tools/pack.py, plot_log.py, make_submission.py and significance.py (CPU only, no network, < 60 s)."""

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
import make_submission as ms  # noqa: E402
import pack  # noqa: E402
import plot_log  # noqa: E402
import significance as sg  # noqa: E402
import train_gpt as tg  # noqa: E402

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


HPARAMS = dict(preset="", out_dir="runs/a", run_id="run-1337", seed=1337, iterations=20, matrix_lr=0.025,
               author="A. Golfer", github_id="agolfer", ve_layers="9,10")


def hparams_line(**kw):
    return "hparams " + " ".join(f"{k}:{v}" for k, v in {**HPARAMS, **kw}.items())


def synthetic_log(final_bpb=FINAL_BPB, final_loss=FINAL_LOSS, n_final=1, code_bytes=None, model_bytes=None,
                  hparams=None, source="import os  # the logged source comes first", artifact=None):
    lines = [
        source,
        '    log0(f"step:{step}/{h.iterations} train_loss:{loss:.4f} train_time:{t_ms:.0f}ms step_avg:{a:.2f}ms")',
        "=" * 100,
        "hparams: {'iterations': 20}",  # not the grammar's hparams line (no space after the word): ignored
        hparams_line(**(hparams or {})),
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
    if artifact is not None:
        lines.append(f"artifact sha256:{artifact[0]} bytes:{artifact[1]} path:./final_model.int6.ptz")
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
    """A fake run: readable script, its packed size as bytes_code, an artifact, a log and a matching
    submission.json."""
    script = tmp_path / "train_gpt.py"
    script.write_text(SCRIPT, encoding="utf-8")
    code_bytes = len(pack.pack_source(SCRIPT))
    model_bytes = 15_000_000
    artifact = tmp_path / ms.ARTIFACT_NAME
    artifact.write_bytes(bytes(range(256)) * (model_bytes // 256) + b"\x07" * (model_bytes % 256))
    sha = hashlib.sha256(artifact.read_bytes()).hexdigest()
    log = tmp_path / "run.txt"

    def write_log(**kw):
        log.write_text(synthetic_log(**{"code_bytes": code_bytes, "model_bytes": model_bytes,
                                        "artifact": (sha, model_bytes), **kw}))

    write_log()
    sub = dict(author="A. Golfer", github_id="agolfer", name="Tiny test record", blurb="A blurb.", date="2026-05-01",
               val_bpb=FINAL_BPB, val_loss=FINAL_LOSS, bytes_total=model_bytes + code_bytes, bytes_model=model_bytes,
               bytes_code=code_bytes, steps=20, train_seconds=599.1, eval_seconds=512.3, hardware="8xH100 SXM",
               seed=1337, compressor="brotli", run_id="run-1337", artifact_sha256=sha)
    sj = tmp_path / "submission.json"
    sj.write_text(json.dumps(sub, indent=2))

    def call(out="rec", **overrides):
        if overrides:
            sj.write_text(json.dumps({**sub, **overrides}, indent=2))
        return ms.make_submission(log, script, sj, tmp_path / out)

    return dict(tmp=tmp_path, script=script, log=log, sj=sj, sub=sub, call=call, artifact=artifact, sha=sha,
                write_log=write_log)


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


def test_make_submission_cli(inputs, capsys):
    out = inputs["tmp"] / "cli_rec"
    r = run_py(ROOT / "tools" / "make_submission.py", "--log", inputs["log"], "--script", inputs["script"],
               "--submission-json", inputs["sj"], "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "README.md").exists()
    argv = ["--log", inputs["log"], "--script", inputs["script"], "--submission-json", inputs["sj"], "--out", out]
    assert ms.main(list(map(str, argv))) == 2 and "not empty" in capsys.readouterr().err  # in process: no 2nd torch


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


# ----------------------------------------------------------------------------- make_submission: issue 10


def test_make_submission_rejects_nan_in_json(inputs):
    inputs["sj"].write_text(json.dumps(inputs["sub"]).replace(f"{FINAL_BPB}", "NaN"))  # json.loads would read it
    with pytest.raises(ms.SubmissionError, match=r"NaN is not strict JSON"):
        ms.make_submission(inputs["log"], inputs["script"], inputs["sj"], inputs["tmp"] / "rec")


def test_make_submission_rejects_infinite_json_number(inputs):
    with pytest.raises(ms.SubmissionError, match=r"Infinity is not strict JSON"):
        inputs["call"](val_loss=math.inf)  # json.dumps writes Infinity, which json.loads reads back
    inputs["sj"].write_text(json.dumps(inputs["sub"]).replace(f"{FINAL_LOSS}", "1e400"))  # strict JSON, reads as inf
    with pytest.raises(ms.SubmissionError, match=r"submission.json val_loss=inf is not finite"):
        ms.make_submission(inputs["log"], inputs["script"], inputs["sj"], inputs["tmp"] / "rec")


def test_make_submission_rejects_repeated_json_key(inputs):
    text = json.dumps(inputs["sub"]).replace('"val_bpb":', '"val_bpb": 0.5, "val_bpb":')  # last one wins in Python
    inputs["sj"].write_text(text)
    assert json.loads(text)["val_bpb"] == FINAL_BPB
    with pytest.raises(ms.SubmissionError, match=r"repeats the key\(s\) val_bpb"):
        ms.make_submission(inputs["log"], inputs["script"], inputs["sj"], inputs["tmp"] / "rec")


def test_make_submission_rejects_non_finite_log_score(inputs):
    inputs["write_log"](final_loss=math.inf, final_bpb=math.inf)  # prints "inf", as a diverged run would
    inputs["sj"].write_text(json.dumps(inputs["sub"]).replace(f"{FINAL_LOSS}", "1e400").replace(f"{FINAL_BPB}",
                                                                                                 "1e400"))
    with pytest.raises(ms.SubmissionError, match=r"the log's final_score val_bpb=inf is not finite"):
        ms.make_submission(inputs["log"], inputs["script"], inputs["sj"], inputs["tmp"] / "rec")


def test_make_submission_requires_run_id_and_artifact_sha256(inputs):
    sub = {k: v for k, v in inputs["sub"].items() if k not in ("run_id", "artifact_sha256")}
    inputs["sj"].write_text(json.dumps(sub))
    with pytest.raises(ms.SubmissionError, match=r"missing field\(s\): run_id, artifact_sha256"):
        ms.make_submission(inputs["log"], inputs["script"], inputs["sj"], inputs["tmp"] / "rec")


def test_make_submission_run_id_must_match_log(inputs):
    with pytest.raises(ms.SubmissionError, match=r"run_id=other does not match the log's hparams run_id:run-1337"):
        inputs["call"](run_id="other")


def test_make_submission_seed_must_match_log(inputs):
    with pytest.raises(ms.SubmissionError, match=r"seed=42 does not match the log's hparams seed:1337"):
        inputs["call"](seed=42)


def test_make_submission_artifact_sha256_must_match(inputs):
    data = bytearray(inputs["artifact"].read_bytes())
    data[123] ^= 1  # same size, other bytes
    inputs["artifact"].write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(ms.SubmissionError, match=rf"has sha256 {digest} but submission.json "
                                                 rf"artifact_sha256={inputs['sha']}"):
        inputs["call"]()


def test_make_submission_artifact_size_must_match(inputs):
    with open(inputs["artifact"], "ab") as f:
        f.write(b"x")
    with pytest.raises(ms.SubmissionError, match=r"is 15000001 bytes but submission.json bytes_model=15000000"):
        inputs["call"]()


def test_make_submission_artifact_missing_and_explicit_path(inputs):
    moved = inputs["tmp"] / "elsewhere.ptz"
    inputs["artifact"].rename(moved)
    with pytest.raises(ms.SubmissionError, match=r"artifact .*final_model.int6.ptz not found"):
        inputs["call"]()
    assert ms.main(list(map(str, ["--log", inputs["log"], "--script", inputs["script"], "--submission-json",
                                  inputs["sj"], "--out", inputs["tmp"] / "rec2", "--artifact", moved]))) == 0


def test_make_submission_log_artifact_line_must_match(inputs):
    inputs["write_log"](artifact=("0" * 64, 15_000_000))
    with pytest.raises(ms.SubmissionError, match=rf"log's artifact line sha256:0{{64}} bytes:15000000 does not "
                                                 rf"match artifact .* sha256:{inputs['sha']} bytes:15000000"):
        inputs["call"]()


def test_make_submission_refuses_validation_subset(inputs):
    with pytest.raises(ms.SubmissionError, match=r"not a submission: the score uses a validation subset"):
        inputs["call"](val_subset=True)
    assert not (inputs["tmp"] / "rec").exists()


def test_make_submission_accepts_eval_only(inputs):
    """Guard for the refusal above: a run that only scored a saved artifact is a submission."""
    inputs["log"].write_text(inputs["log"].read_text() + "eval_only artifact:./final_model.int6.ptz\n")
    assert plot_log.parse_log(inputs["log"].read_text())["eval_only"] == "./final_model.int6.ptz"
    out = inputs["call"](eval_only=True, val_subset=False)
    assert json.loads((out / "submission.json").read_text())["eval_only"] is True


# ----------------------------------------------------------------------------- plot_log: issue 10


def test_plot_log_cli_fails_on_unrecognised_log(tmp_path):
    log = tmp_path / "notes.txt"
    log.write_text("hello\nthis is not a training log\n")
    r = run_py(ROOT / "tools" / "plot_log.py", log, "--out", tmp_path / "x.png")
    assert r.returncode == 2
    assert f"{log}: no line of a train_gpt.py log" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_hparams_line_of_the_script_parses_back(tmp_path):
    """The grammar and the script agree: train_gpt.log_header's hparams line gives every field's str(value),
    a path with a space included, and its logged source hashes to the script's bytes."""
    h = dataclasses.replace(tg.Hyperparameters(), data_path="/data/with space/x", run_id="r-1")
    path = tmp_path / "log.txt"
    tg.init_logging(path, True)
    try:
        tg.log_header(h, tg.Runtime.local())
    finally:
        tg.init_logging(None, True)
    text = path.read_text(encoding="utf-8")
    d = plot_log.parse_log(text)
    assert d["hparams_count"] == 1
    assert d["hparams"] == {k: str(v) for k, v in dataclasses.asdict(h).items()}
    assert sg.logged_source_sha256(text) == hashlib.sha256(Path(tg.__file__).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- significance


def seed_log(tmp, seed, val_loss, val_bpb=1.2, **hparams):
    path = tmp / f"seed{seed}_{len(list(tmp.glob('seed*')))}.txt"
    hp = dict(seed=seed, run_id=f"run-{seed}", out_dir=f"runs/s{seed}", **hparams)
    path.write_text(synthetic_log(final_loss=val_loss, final_bpb=val_bpb, hparams=hp))
    return path


def test_significance_known_answer_record_test(tmp_path):
    logs = [seed_log(tmp_path, s, v, b, author=a) for s, v, b, a in
            ((1, 1.0, 1.5, "x"), (2, 1.1, 1.6, "y"), (3, 1.2, 1.8, ""))]  # seed, run_id, out_dir, author differ
    record = 1.2
    res = sg.analyse(logs, record_loss=record)
    assert [s["seed"] for s in res["seeds"]] == [1, 2, 3]
    assert [s["run_id"] for s in res["seeds"]] == ["run-1", "run-2", "run-3"]
    assert [s["val_loss"] for s in res["seeds"]] == [1.0, 1.1, 1.2]
    assert res["val_loss_mean"] == pytest.approx(1.1, abs=1e-12)
    assert res["val_loss_std"] == pytest.approx(0.1, abs=1e-12)
    assert res["val_bpb_mean"] == pytest.approx(statistics.mean([1.5, 1.6, 1.8]), abs=1e-12)
    assert res["val_bpb_std"] == pytest.approx(statistics.stdev([1.5, 1.6, 1.8]), abs=1e-12)
    t = (1.1 - (record - 0.005)) / (0.1 / math.sqrt(3))  # one-sample t with the 0.005-nat margin
    rt = res["significance"]["record"]
    assert rt["threshold"] == pytest.approx(1.195)
    assert rt["t"] == pytest.approx(t, rel=1e-9)
    assert rt["df"] == 2
    assert rt["p"] == pytest.approx(stats.t.sf(-t, 2), rel=1e-9)  # P(T <= t), one-sided "less"
    assert rt["passes"] is (rt["p"] < 0.01)
    assert res["significance"]["ignored_fields"] == ["seed", "run_id", "author", "github_id", "out_dir"]


def test_significance_record_test_passes_on_a_clear_win(tmp_path):
    logs = [seed_log(tmp_path, s, v) for s, v in ((1, 1.000), (2, 1.001), (3, 1.002))]
    assert sg.analyse(logs, record_loss=1.1)["significance"]["record"]["passes"] is True
    assert sg.analyse(logs, record_loss=1.0055)["significance"]["record"]["passes"] is False  # < 0.005 better


def welch_by_formula(a, b, margin):
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(a) + margin - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    return t, df, stats.t.sf(-t, df)


@pytest.mark.parametrize("cand,base,known_df", [
    ((1.0, 1.1, 1.2), (1.2, 1.3, 1.4), 4.0),  # equal n, equal variance: df = 2 (n - 1)
    ((1.0, 1.1, 1.2), (1.25, 1.3, 1.5, 1.45), None),
])
def test_significance_welch_known_answer(tmp_path, cand, base, known_df):
    logs = [seed_log(tmp_path, i, v) for i, v in enumerate(cand)]
    blogs = [seed_log(tmp_path, 100 + i, v, matrix_lr=0.03) for i, v in enumerate(base)]  # another config: fine
    w = sg.analyse(logs, baseline=blogs)["significance"]["baseline"]
    t, df, p = welch_by_formula(cand, base, 0.005)
    if known_df is not None:
        assert df == pytest.approx(known_df)
    assert (w["t"], w["df"], w["p"]) == pytest.approx((t, df, p), rel=1e-9)
    assert w["baseline_val_loss_mean"] == pytest.approx(statistics.mean(base))
    assert [s["seed"] for s in w["seeds"]] == [100 + i for i in range(len(base))]
    assert f"p = {p:.3g} ({'passes' if p < 0.01 else 'fails'} p < 0.01)" in sg.readme_section(
        sg.analyse(logs, baseline=blogs))


def test_significance_refuses_config_mismatch(tmp_path):
    logs = [seed_log(tmp_path, 1, 1.0), seed_log(tmp_path, 2, 1.1, matrix_lr=0.03), seed_log(tmp_path, 3, 1.2)]
    with pytest.raises(sg.SignificanceError, match=r"differ in matrix_lr:\n  matrix_lr: .*seed1_0.txt='0.025'  "
                                                   r".*seed2_1.txt='0.03'  .*seed3_2.txt='0.025'"):
        sg.analyse(logs, record_loss=1.2)


def test_significance_refuses_different_source(tmp_path):
    logs = [seed_log(tmp_path, 1, 1.0), seed_log(tmp_path, 2, 1.1)]
    logs[1].write_text(logs[1].read_text().replace("import os", "import sys", 1))
    with pytest.raises(sg.SignificanceError, match=r"differ in source_sha256"):
        sg.analyse(logs, record_loss=1.2)


def test_significance_refuses_repeated_seed(tmp_path):
    logs = [seed_log(tmp_path, 1, 1.0), seed_log(tmp_path, 1, 1.1)]
    with pytest.raises(sg.SignificanceError, match=r"repeat seed\(s\) \[1\]"):
        sg.analyse(logs, record_loss=1.2)


def test_significance_single_log_needs_two_for_a_t_test(tmp_path):
    logs = [seed_log(tmp_path, 1, 1.0)]
    res = sg.analyse(logs)  # a summary alone is fine
    assert res["val_loss_mean"] == 1.0 and res["val_loss_std"] is None
    with pytest.raises(sg.SignificanceError, match=r"a t-test needs at least 2 seed logs \(a sample std\), got 1"):
        sg.analyse(logs, record_loss=1.2)
    two = [seed_log(tmp_path, 2, 1.0), seed_log(tmp_path, 3, 1.1)]
    with pytest.raises(sg.SignificanceError, match=r"at least 2 baseline logs .* got 1"):
        sg.analyse(two, baseline=logs)


def test_significance_refuses_identical_losses_and_bad_logs(tmp_path):
    with pytest.raises(sg.SignificanceError, match=r"all 2 seeds have val_loss 1.0: no spread"):
        sg.analyse([seed_log(tmp_path, 1, 1.0), seed_log(tmp_path, 2, 1.0)], record_loss=1.2)
    nan = seed_log(tmp_path, 3, math.nan)
    with pytest.raises(sg.SignificanceError, match=r"seed3.*final_score val_loss:nan .* is not finite"):
        sg.analyse([nan, seed_log(tmp_path, 4, 1.0)])
    with pytest.raises(sg.SignificanceError, match=r"missing\.txt"):
        sg.analyse([tmp_path / "missing.txt"])
    with pytest.raises(sg.SignificanceError, match=r"--alpha 0.0 must lie in \(0, 1\)"):
        sg.analyse([nan], alpha=0.0)


def test_significance_writes_into_record_folder(inputs):
    tmp = inputs["tmp"]
    out = inputs["call"]()
    others = [seed_log(tmp, s, v, v - 0.7) for s, v in ((42, FINAL_LOSS + 0.002), (7, FINAL_LOSS - 0.001))]
    logs = [inputs["log"], *others]
    r = run_py(ROOT / "tools" / "significance.py", "--logs", *logs, "--record-loss", "1.95", "--out", out)
    assert r.returncode == 0, r.stderr  # the one run as a script; the others call main() in process
    assert "## Seeds and significance" in r.stdout
    sub = ms.load_submission_json(out / "submission.json")[1]  # still strict JSON
    assert sub["val_bpb"] == FINAL_BPB and sub["run_id"] == "run-1337"  # the headline run is kept
    assert [s["seed"] for s in sub["seeds"]] == [1337, 42, 7]
    assert [s["log"] for s in sub["seeds"]] == ["train_seed1337.log", "train_seed42.log", "train_seed7.log"]
    for s, p in zip(sub["seeds"], logs):
        assert (out / s["log"]).read_bytes() == p.read_bytes()
    losses = [FINAL_LOSS, FINAL_LOSS + 0.002, FINAL_LOSS - 0.001]
    assert sub["val_loss_mean"] == pytest.approx(statistics.mean(losses), abs=1e-12)
    assert sub["val_loss_std"] == pytest.approx(statistics.stdev(losses), abs=1e-12)
    assert sub["significance"]["record"]["df"] == 2 and 0 < sub["significance"]["record"]["p"] < 1
    readme = (out / "README.md").read_text()
    assert readme.count("## Seeds and significance") == 1 and "| 42 | `run-42` |" in readme
    assert "= 1.94500000" in readme
    assert sg.main(["--logs", *map(str, logs), "--record-loss", "1.96", "--out", str(out)]) == 0  # rerun replaces
    readme2 = (out / "README.md").read_text()
    assert readme2.count("## Seeds and significance") == 1 and "= 1.94500000" not in readme2
    assert readme2.index("## Files") < readme2.index("= 1.95500000")


def test_significance_refuses_folder_whose_log_is_not_a_seed(inputs, capsys):
    out = inputs["call"]()
    logs = [seed_log(inputs["tmp"], s, v) for s, v in ((1, 1.0), (2, 1.1))]
    assert sg.main(["--logs", *map(str, logs), "--out", str(out)]) == 2
    assert "train.log is none of the --logs" in capsys.readouterr().err
    assert "seeds" not in json.loads((out / "submission.json").read_text())


# ----------------------------------------------------------------------------- plot_log: issue 11 (the picture)

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PASS_LINES = [f"pass chunk:{c}/3 elapsed:{1.5 * c:.1f}s eta:{1.5 * (3 - c):.1f}s rank0_bpb neural:{2.3 - 0.01 * c:.4f} "
              f"neural+bias:{2.28 - 0.01 * c:.4f} neural+bias+ngram:{2.2 - 0.01 * c:.4f} mixture:{2.1 - 0.01 * c:.4f}"
              for c in (1, 2, 3)]
ABLATION_LINES = [f"ablation track:{k} val_loss:{3 + v:.8f} val_bpb:{2 + v:.8f}"
                  for k, v in (("neural", 0.3), ("neural+bias", 0.28), ("neural+bias+ngram", 0.2), ("mixture", 0.1))]


def eval_log():
    lines = [f"step:{s}/30 train_loss:{6 - 0.1 * s:.4f} train_time:{100 * s}ms step_avg:100.00ms" for s in range(10, 31, 10)]
    lines.insert(1, "warmdown:start step:16 lr_mult:0.9333")
    lines.insert(3, "qat:on step:28 lr_mult:0.1333 fake_quant_elements:10 bank_elements:8")
    lines += ["final_int8_zlib_roundtrip val_loss:3.4000 val_bpb:2.3100 eval_time:1000ms",
              "final_int8_zlib_roundtrip_exact val_loss:3.40000000 val_bpb:2.31000000"]
    return "\n".join(lines + PASS_LINES + ABLATION_LINES + ["final_score val_loss:3.10000000 val_bpb:2.10000000 eval_time:4500ms"])


def test_parse_pass_progress_ablation_and_schedule_marks():
    d = plot_log.parse_log(eval_log())
    assert (d["warmdown_step"], d["qat_step"]) == (16, 28)
    pts = d["passes"]["pass"]
    assert [p["chunk"] for p in pts] == [1, 2, 3] and pts[-1]["n_chunks"] == 3 and pts[1]["elapsed_s"] == 3.0
    assert pts[2]["bpb"] == {"neural": 2.27, "neural+bias": 2.25, "neural+bias+ngram": 2.17, "mixture": 2.07}
    assert list(d["ablation"]) == ["neural", "neural+bias", "neural+bias+ngram", "mixture"]
    assert d["ablation"]["mixture"] == dict(val_loss=3.1, val_bpb=2.1)
    assert [name for name, _ in plot_log.plan_panels(d)] == ["train", "pass:pass", "bars"]  # no val panel
    bars = [name for name, _, _ in plot_log._bars(d)]
    assert bars == ["neural", "neural+bias", "neural+bias+ngram", "mixture", "final_int8_zlib_roundtrip"]


def test_plot_with_val_and_pass_panels_writes_png(tmp_path):
    d = plot_log.parse_log(synthetic_log() + eval_log())
    assert [name for name, _ in plot_log.plan_panels(d)] == ["train", "val", "pass:pass", "bars"]
    out = plot_log.plot_log(d, tmp_path / "p.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("regex,line", [
    ("PASS_RE", "pass chunk:3/31 elapsed:12.3s eta:100.2s rank0_bpb neural:2.301 mixture:2.1000"),  # .3f
    ("PASS_RE", "pass chunk:3/31 elapsed:12.3s eta:100.2s rank0_bpb:2.1362"),  # the old one-number line
    ("WARMDOWN_RE", "warmdown:start step:16"),
    ("ABLATION_RE", "ablation track:neural val_loss:3.4475 val_bpb:2.2412"),
])
def test_new_regexes_reject_drifted_lines(regex, line):
    assert not getattr(plot_log, regex).fullmatch(line)


def test_progress_line_of_the_script_parses_back(capsys):
    tracks = ["neural", "neural+bias", "neural+bias+ngram", "mixture"]
    tally = tg.Tally.zeros(len(tracks), "cpu")
    tally.nll += torch.tensor([4.0, 3.5, 3.0, 2.5], dtype=torch.float64)
    tally.bytes += 3.0
    span = tg.ChunkSpan(4, 31, np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64))
    capsys.readouterr()
    tg._log_progress("pass", span, time.perf_counter(), tracks, tally)
    line = capsys.readouterr().out.strip()
    m = plot_log.PASS_RE.fullmatch(line)
    assert m, line
    pts = plot_log.parse_log(line)["passes"]["pass"]
    assert pts[0]["chunk"] == 5 and list(pts[0]["bpb"]) == tracks
    assert pts[0]["bpb"]["mixture"] == pytest.approx(2.5 / math.log(2) / 3, abs=1e-4)
