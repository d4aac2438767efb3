"""Issue 10: bad input and faults. A run never reports a false result, fails before training when the cause is
knowable then, keeps what was earned (EVAL_ONLY), and leaves a log and OUT_DIR that tell the truth."""
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, tiny, tg

import make_submission as ms  # noqa: E402
import plot_log  # noqa: E402

RT = tg.Runtime.local()
FAST = dict(iterations=2, ttt_epochs=0, sliding_diagnostic=False, eval_stride=32, ttt_chunk_tokens=512)


@pytest.fixture
def fresh_log(monkeypatch):
    """run() points the module-global log at its own file; keep that from leaking into other tests."""
    monkeypatch.setattr(tg, "_LOG", {"path": None, "main": True})


def tiny_env(**kw) -> dict:
    """The tiny config as the env vars a user would set (bools 0/1)."""
    cfg = {**TINY, **FAST, **kw}
    return {k.upper(): (str(int(v)) if isinstance(v, bool) else str(v)) for k, v in cfg.items()}


def copy_dataset(dataset, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(dataset["data_path"], root)
    return root


def shard(root: Path, split: str, index: int) -> Path:
    return root / tg.SHARD_NAME.format(split=split, index=index)


@pytest.fixture(scope="module")
def small(dataset, tmp_path_factory):
    """The dataset with its val split cut to 32 sequences of 32: the runs below are about files, not scores."""
    root = copy_dataset(dataset, tmp_path_factory.mktemp("small"))
    tg.write_shard(shard(root, "val", 0), tg.load_shard(shard(root, "val", 0))[:1025])
    return dict(data_path=str(root), tokenizer_path=dataset["tokenizer_path"])


def log_lines(out: Path, run_id: str) -> list[str]:
    return (out / "logs" / f"{run_id}.txt").read_text(encoding="utf-8").splitlines()


# ============================================================================= 8. env checks


@pytest.mark.parametrize("name,value,meant", [
    ("MAX_WALLCLOCK", "60", "MAX_WALLCLOCK_SECONDS"), ("MAX_STEPS", "100", "ITERATIONS"),
    ("WARMDOWN", "50", "WARMDOWN_ITERS"), ("SEQ_LEN", "512", "TRAIN_SEQ_LEN"), ("VOCAB", "2048", "VOCAB_SIZE"),
    ("DATA_DIR", "/data", "DATA_PATH"), ("OUT_PATH", "/out", "OUT_DIR"), ("NUM_ITERATIONS", "5", "ITERATIONS"),
    ("MODEL_DIR", "/m", "MODEL_DIM"), ("BATCH_SIZE", "8", None)])
def test_lookalike_env_vars_stop_the_run(name, value, meant):
    """Each of these trained the defaults silently: the shared prefixes MAX_/DATA_/OUT_/MODEL_ were exempt and
    a name without "_" had no prefix at all."""
    with pytest.raises(ValueError, match=rf"unknown env var {name}\b") as e:
        tg.Hyperparameters.from_env({name: value})
    if meant:
        assert f"did you mean {meant}?" in str(e.value)


def test_a_torchrun_environment_passes():
    """The variables of a real machine and launcher are not look-alikes (this process's own environment plus
    what torchrun, CUDA, NCCL and common tools export)."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}}
    env.update({k: "1" for k in (
        "PATH", "HOME", "USER", "SHELL", "TERM", "LANG", "PWD", "TMPDIR", "HOSTNAME", "CUDA_VISIBLE_DEVICES",
        "CUDA_HOME", "CUDA_LAUNCH_BLOCKING", "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "OMP_NUM_THREADS",
        "MKL_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
        "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
        "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_COMPILE_DISABLE", "TORCH_LOGS",
        "TORCH_HOME", "TORCH_CUDA_ARCH_LIST", "TORCH_DISTRIBUTED_DEBUG", "TORCH_EXTENSIONS_DIR",
        "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "NCCL_IB_DISABLE",
        "NCCL_SOCKET_IFNAME", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "CONDA_PREFIX",
        "HF_HOME", "TOKENIZERS_PARALLELISM", "MAX_JOBS", "SLURM_JOB_ID", "GITHUB_SHA", "WANDB_PROJECT")})
    assert tg.Hyperparameters.from_env(env) == tg.Hyperparameters()


@pytest.mark.parametrize("name,value", [
    ("NUM_KV_HEADS", "0"), ("NUM_HEADS", "0"), ("TRAIN_SEQ_LEN", "0"), ("BIGRAM_VOCAB_SIZE", "1"),
    ("EVAL_BATCH_SEQS", "0"), ("TTT_BATCH_SEQS", "0"), ("NGRAM_TOP_K", "0"), ("NGRAM_TABLE_BITS", "40"),
    ("COMPRESSOR", "lzma+foo"), ("NGRAM_BETAS", "0.5,nan"), ("MATRIX_LR", "nan"), ("VOCAB_SIZE", "70000")])
def test_bad_knobs_fail_at_startup_naming_the_variable(name, value):
    """These failed after training or export (ZeroDivisionError, `range() arg 3 must not be zero`, a bare
    AssertionError), or were taken as something else (lzma+foo as +shuffle)."""
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        tg.Hyperparameters.from_env({name: value})


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(tg.Hyperparameters) if f.type == "float"])
def test_every_float_knob_must_be_finite(field):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"^{field.upper()}="):
            tiny(**{field: bad})


# ============================================================================= 3. shards, fail before training


def test_every_train_shard_is_validated_at_startup(dataset, tmp_path):
    """Shard k was validated only when the loader reached it (k x ~127 steps into a FineWeb run)."""
    root = copy_dataset(dataset, tmp_path)
    bad = shard(root, "train", 1)
    bad.write_bytes(bad.read_bytes()[:-2])
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        tg.TokenStream(str(root / tg.SHARD_GLOB.format(split="train")))
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        tg.check_shards(str(root / tg.SHARD_GLOB.format(split="train")))


def test_empty_shard_is_an_error_naming_the_file(dataset, tmp_path):
    """num_tokens 0 made TokenStream loop forever, past the wallclock cap."""
    root = copy_dataset(dataset, tmp_path)
    empty = shard(root, "train", 2)
    tg.write_shard(empty, np.zeros(0, np.uint16))
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*no tokens"):
        tg.TokenStream(str(root / tg.SHARD_GLOB.format(split="train")))


def test_out_of_range_token_names_the_file_and_the_id(dataset, tmp_path):
    """A token >= VOCAB_SIZE gave a bare IndexError (a device assert on CUDA): val after training, train at step 1."""
    root = copy_dataset(dataset, tmp_path)
    for split, index in (("val", 0), ("train", 1)):
        p = shard(root, split, index)
        tokens = tg.load_shard(p).copy()
        tokens[len(tokens) // 2] = 1030
        tg.write_shard(p, tokens)
    with pytest.raises(ValueError, match=re.escape(str(shard(root, "val", 0))) + r".*token id 1030 >= VOCAB_SIZE=1024"):
        tg.load_val_tokens(str(root / tg.SHARD_GLOB.format(split="val")), 32, vocab_size=1024)
    stream = tg.TokenStream(str(root / tg.SHARD_GLOB.format(split="train")), 1024)
    first = len(tg.load_shard(shard(root, "train", 0)))
    stream.take(first)  # shard 0 is clean
    with pytest.raises(ValueError, match=re.escape(str(shard(root, "train", 1))) + r".*token id 1030"):
        stream.take(1)


def test_a_bad_val_token_fails_the_run_before_training_and_the_log_says_why(dataset, tmp_path, monkeypatch, fresh_log):
    """Defect 5: the run log ended at the last progress line. main() now ends it with the traceback's tail and
    one FAILED line; the bad token stops the run at start-up (no train step logged)."""
    root = copy_dataset(dataset, tmp_path)
    p = shard(root, "val", 0)
    tokens = tg.load_shard(p).copy()
    tokens[5] = 4000
    tg.write_shard(p, tokens)
    env = tiny_env(data_path=str(root), tokenizer_path=dataset["tokenizer_path"], out_dir=str(tmp_path), run_id="bad")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="token id 4000"):
        tg.main()
    lines = log_lines(tmp_path, "bad")
    assert lines[-1] == f"FAILED: rank:0 ValueError: shard {p}: token id 4000 >= VOCAB_SIZE=1024 (first bad id 4000 at index 5)"
    assert any(l.startswith("Traceback") or "load_val_tokens" in l for l in lines[-13:-1])
    assert not any(l.startswith("step:") for l in lines)


def test_tokenizer_directory_is_named_as_a_directory(dataset, tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"TOKENIZER_PATH={re.escape(str(tmp_path))} is a directory"):
        tg.load_byte_counter(tiny(tokenizer_path=str(tmp_path)))


# ============================================================================= 3. disk


def test_free_space_is_checked_before_training(tmp_path):
    path = tmp_path / "final_model.int6.ptz"
    tg.require_free_space(path, 1000)
    with pytest.raises(OSError, match=re.escape(str(tmp_path))):
        tg.require_free_space(path, shutil.disk_usage(tmp_path).free)


def test_write_error_names_the_path(tmp_path, monkeypatch):
    """ENOSPC carries no file name: the export failed with `[Errno 28] No space left on device` and no path."""
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tg.os, "fsync", full_disk)
    path = tmp_path / "final_model.int6.ptz"
    with pytest.raises(OSError, match=re.escape(str(path)) + ".*No space left") as e:
        tg.write_atomic(path, b"x" * 100)
    assert e.value.errno == 28
    assert list(tmp_path.iterdir()) == []


# ============================================================================= 7. stale temp files


def test_stale_temp_of_a_killed_write_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "final_model.int6.ptz"
    stale = tmp_path / f".final_model.int6.ptz.tmp{dead.pid}"
    live = tmp_path / f".final_model.int6.ptz.tmp{os.getppid()}"  # a running process's write is left alone
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    tg.write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and not stale.exists() and live.exists()


def test_temp_files_are_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git checkout")
    for name in (".final_model.int6.ptz.tmp12345", "data/.fineweb_train_000000.bin.tmp7"):
        r = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
        assert r.returncode == 0, f"{name} is not ignored"


# ============================================================================= 6. RUN_ID reuse


def test_reused_run_id_refuses_to_append_and_names_the_log(dataset, tmp_path, fresh_log):
    old = tmp_path / "logs" / "dup.txt"
    old.parent.mkdir()
    old.write_text("hparams run_id:dup\nfinal_score val_loss:1.00000000 val_bpb:1.00000000 eval_time:1ms\n")
    before = old.read_bytes()
    with pytest.raises(FileExistsError, match=re.escape(str(old))):
        tg.run(tiny(**dataset, out_dir=str(tmp_path), run_id="dup"), RT)
    assert old.read_bytes() == before


# ============================================================================= 9. compile warmup


def test_compile_on_cpu_warms_up_outside_the_timed_window(dataset, sp, monkeypatch, capsys, fresh_log):
    """TORCH_COMPILE=1 with WARMUP_STEPS=0 (the cpu preset) compiled inside step 1 and logged compile_time:0ms.
    A fake torch.compile whose first call of each graph takes 0.4 s stands in for the compiler."""
    compiled = []

    def fake_compile(model, **kw):
        seen = set()

        def fwd(*args):
            if args[-1] not in seen:  # one graph per QAT flag, as dynamic=False guards on it
                seen.add(args[-1])
                time.sleep(0.4)
                print(f"fake_compile qat:{args[-1]}")
            return model(*args)
        compiled.append(kw)
        return fwd

    monkeypatch.setattr(torch, "compile", fake_compile)
    h = tiny(**dataset, torch_compile="1", warmup_steps=0, iterations=2, late_qat_threshold=0.6, warmdown_iters=2)
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    tg.train(tg.EvalContext(h, RT, val, tg.ByteCounter(tg.build_bpb_luts(sp, h.vocab_size))), tg.build_model(h))
    out = capsys.readouterr().out
    assert compiled and "compile_warmup steps:2 qat_variants:2" in out
    assert int(re.search(r"compile_time:(\d+)ms", out)[1]) >= 800  # both graphs, honestly timed
    lines = out.splitlines()
    compiles = [i for i, l in enumerate(lines) if l.startswith("fake_compile")]
    timed = [i for i, l in enumerate(lines) if re.match(r"step:\d+/2 train_loss:", l)]
    assert len(compiles) == 2 and len(timed) == 2  # QAT is on for the second step: both graphs are needed
    assert max(compiles) < lines.index(next(l for l in lines if l.startswith("compile_time:"))) < min(timed)


# ============================================================================= 1. never a false result


def test_weights_made_non_finite_by_the_last_step_are_an_error(dataset, sp):
    """The per-step check sees the loss before the update; a NaN gradient at the last step left NaN weights that
    exported and scored as NaN."""
    h = tiny(**dataset, iterations=2)
    model = tg.build_model(h)
    calls = []
    model.qo_bank.register_hook(lambda g: (calls.append(1), g * (math.nan if len(calls) > 8 else 1.0))[1])
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    with pytest.raises(FloatingPointError, match=r"non-finite weights after step 2: .*qo_bank"):
        tg.train(tg.EvalContext(h, RT, val, tg.ByteCounter(tg.build_bpb_luts(sp, h.vocab_size))), model)


def _ctx(dataset, sp, **kw):
    h = tiny(**dataset, **kw)
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)[:8 * h.eval_seq_len + 1]  # 8 windows are enough here
    return tg.EvalContext(h, RT, val, tg.ByteCounter(tg.build_bpb_luts(sp, h.vocab_size)))


def test_non_finite_scores_are_errors(dataset, sp):
    ctx = _ctx(dataset, sp, eval_stride=16)
    torch.manual_seed(0)
    model = tg.build_model(ctx.h).eval()
    nan_fwd = lambda ids: model(ids) * math.nan  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"final_float: .*non-finite score \(track neural=nan"):
        tg.diagnostic(ctx, "final_float", nan_fwd, ctx.h.eval_seq_len)
    with pytest.raises(FloatingPointError, match=r"pass: non-finite"):
        tg.run_pass(ctx, tg.FixedScorer(nan_fwd), ctx.h.eval_stride, label="pass")


def test_a_non_finite_expert_is_an_error(dataset, sp):
    """An n-gram expert beyond the first beta is no scored track of its own (only Hedge weighs it), so its NaN
    never showed in any score. Its summed loss is checked too."""
    ctx = _ctx(dataset, sp, ngram_betas="0.5,1.0", bias_enabled=False, hedge_enabled=False, eval_stride=16)
    torch.manual_seed(0)
    model = tg.build_model(ctx.h).eval()
    n = ctx.val.numel()
    cands = (np.full((n, 1), 7, np.int32), np.ones((n, 1), np.float32))
    r = tg.run_pass(ctx, tg.FixedScorer(model), ctx.h.eval_stride, tg.Experts(ctx.h, None, cands, None), label="pass")
    assert all(math.isfinite(v) for v in r.losses.values())
    # the second expert: inf * 0 = nan off the boosted token (NGRAM_BETAS itself must be finite)
    experts = tg.Experts(SimpleNamespace(ngram_beta_list=(0.5, math.inf)), None, cands, None)
    with pytest.raises(FloatingPointError, match=r"pass: non-finite score \(expert ngram beta:inf nll_sum=nan\)"):
        tg.run_pass(ctx, tg.FixedScorer(model), ctx.h.eval_stride, experts, label="pass")


def test_diverged_run_fails_and_writes_no_submission(small, tmp_path, fresh_log):
    """The issue's reproduction: huge LRs, 2 steps; it exited 0 with final_score nan and "val_bpb": NaN."""
    h = tiny(**small, out_dir=str(tmp_path), run_id="div", **FAST, matrix_lr=1e6, scalar_lr=1e6, tied_embed_lr=1e6)
    with pytest.raises(FloatingPointError):
        tg.run(h, RT)
    assert not (tmp_path / "submission.json").exists()
    assert not any(l.startswith("final_score") for l in log_lines(tmp_path, "div"))


def test_finish_never_writes_a_non_finite_number(tmp_path, fresh_log):
    r = tg.EvalResult({"mixture": math.nan}, {"mixture": math.nan}, "mixture", 100, 300, 1.0)
    with pytest.raises(FloatingPointError, match="val_bpb"):
        tg.finish(tiny(out_dir=str(tmp_path), run_id="x"), RT, r, 3, 10.0, 1.0, 1000, "lzma")
    assert not (tmp_path / "submission.json").exists()


# ============================================================================= 2. artifact, log, submission.json


@pytest.fixture(scope="module")
def full_run(small, tmp_path_factory):
    """One finished tiny run in a folder that held another run's submission.json."""
    out = tmp_path_factory.mktemp("full")
    (out / "submission.json").write_text(json.dumps({"run_id": "older", "val_bpb": 2.14070909}))
    saved = dict(tg._LOG)
    try:
        h = tiny(**small, out_dir=str(out), run_id="full", **FAST)
        assert tg.run(h, RT) == 0
    finally:
        tg._LOG.update(saved)
    return h, out


def test_submission_json_names_its_run_and_artifact(full_run):
    h, out = full_run
    sub = json.loads((out / "submission.json").read_text())
    artifact = out / "final_model.int6.ptz"
    blob = artifact.read_bytes()
    assert sub["run_id"] == "full"
    assert sub["artifact_sha256"] == hashlib.sha256(blob).hexdigest() and sub["bytes_model"] == len(blob)
    text = (out / "logs" / "full.txt").read_text(encoding="utf-8")
    parsed = plot_log.parse_log(text)
    assert parsed["artifact"] == dict(sha256=sub["artifact_sha256"], bytes=len(blob), path=str(artifact))
    ms.check_submission(sub, parsed, tg.shipped_code_bytes(Path(tg.__file__)), artifact)  # the tool agrees
    assert json.loads((out / "submission.json.stale").read_text())["run_id"] == "older"  # moved aside, not lost
    assert f"moved the previous {out / 'submission.json'} to {out / 'submission.json.stale'}" in text


def test_eval_only_rescores_the_artifact_exactly_as_the_full_run(full_run, fresh_log):
    """EVAL_ONLY=<artifact>: no training; the same evaluation as the full run, so the same score."""
    h, out = full_run
    artifact = out / "final_model.int6.ptz"
    assert tg.Hyperparameters.from_env({"EVAL_ONLY": str(artifact)}).eval_only == str(artifact)
    rescored = out / "rescore"
    assert tg.run(dataclasses.replace(h, out_dir=str(rescored), run_id="rescore", eval_only=str(artifact)), RT) == 0
    full, again = log_lines(out, "full"), log_lines(rescored, "rescore")
    assert f"eval_only artifact:{artifact}" in again
    assert not any(l.startswith(("step:", "compile_time", "final_float")) for l in again)
    untimed = lambda lines, p: [re.sub(r" eval_time:\d+ms$", "", l) for l in lines if l.startswith(p)]  # noqa: E731
    for prefix in ("final_score ", "final_int8_zlib_roundtrip_exact ", "artifact sha256:", "ablation track:"):
        assert untimed(again, prefix) == untimed(full, prefix), prefix
    sub = json.loads((rescored / "submission.json").read_text())
    assert sub["eval_only"] is True and sub["artifact"] == str(artifact) and sub["run_id"] == "rescore"
    assert sub["steps"] == 0 and sub["artifact_sha256"] == json.loads((out / "submission.json").read_text())["artifact_sha256"]
    ms.check_submission(sub, plot_log.parse_log("\n".join(again)), tg.shipped_code_bytes(Path(tg.__file__)), artifact)


def test_eval_only_checks_the_artifact_against_the_config(full_run, fresh_log, tmp_path):
    h, out = full_run
    with pytest.raises(ValueError, match="do not match the model config"):
        tg.run(dataclasses.replace(h, out_dir=str(tmp_path), run_id="other", num_layers=3, ve_layers="1",
                                   eval_only=str(out / "final_model.int6.ptz")), RT)
    with pytest.raises(FileNotFoundError, match="EVAL_ONLY=.*nothing.ptz"):
        tg.run(dataclasses.replace(h, out_dir=str(tmp_path), run_id="none", eval_only=str(tmp_path / "nothing.ptz")), RT)


def test_sigkill_during_evaluation_leaves_no_submission_of_another_run(small, tmp_path):
    """kill -9 after export left the new artifact beside the previous run's submission.json (in a fresh clone,
    the committed 2.14070909 reference)."""
    (tmp_path / "submission.json").write_text(json.dumps({"run_id": "older", "val_bpb": 2.14070909}))
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TORCH_COMPILE_DISABLE")}
    env.update(tiny_env(**small, out_dir=str(tmp_path), run_id="killed", ttt_epochs=1, ttt_chunk_tokens=256),
               OMP_NUM_THREADS="1")
    log = tmp_path / "logs" / "killed.txt"
    p = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and p.poll() is None:
            if log.exists() and "\nphase:export " in log.read_text(encoding="utf-8"):  # the artifact is written
                break
            time.sleep(0.01)
        assert p.poll() is None, f"the run ended before its evaluation could be killed: {p.stderr.read()[-2000:]}"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    assert (tmp_path / "final_model.int6.ptz").is_file()  # the new artifact is there, with the kill mid-eval
    assert not any(l.startswith("final_score") for l in log.read_text(encoding="utf-8").splitlines())
    sub = tmp_path / "submission.json"
    assert not sub.exists() or json.loads(sub.read_text())["run_id"] == "killed"
    assert not sub.exists()  # the run died before its end: nothing claims a score
