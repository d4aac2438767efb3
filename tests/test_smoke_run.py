"""PRESET=smoke and VAL_MAX_TOKENS: a validation subset is whole sequences from the start of the split, is marked
in the log and submission.json, never logs a final_score, and a smoke run exits 0 whatever its size."""
import json
import re

import pytest

from conftest import TINY
import train_gpt as tg


def test_val_subset_is_a_prefix_of_whole_sequences(dataset):
    h = tg.Hyperparameters(**{**TINY, **dataset})
    full = tg.load_val_tokens(h.val_files, 32)
    n_all = sum(len(tg.load_shard(f)) for f in tg.shard_files(h.val_files)) - 1  # every target, before whole sequences
    for cap, want in ((32, 32), (100, 96), (n_all, full.numel() - 1)):
        sub = tg.load_val_tokens(h.val_files, 32, cap)
        assert sub.numel() - 1 == want and tg.torch.equal(sub, full[:want + 1])
    with pytest.raises(ValueError, match=r"VAL_MAX_TOKENS=31 is shorter than one sequence of EVAL_SEQ_LEN=32"):
        tg.load_val_tokens(h.val_files, 32, 31)
    with pytest.raises(ValueError, match=rf"VAL_MAX_TOKENS={n_all + 1} is larger than the validation set .*fineweb_val_"
                                         rf".* \({n_all} targets\); use 0"):
        tg.load_val_tokens(h.val_files, 32, n_all + 1)


def test_smoke_preset_runs_and_exits_zero_over_the_limit(dataset, tmp_path, monkeypatch):
    """The real PRESET=smoke (from the environment), shrunk to the tiny CPU model; the byte limit is lowered so that
    the run is over it: a normal run would exit 1, the smoke run reports the bytes and exits 0."""
    env = {k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in TINY.items()}
    env.update(PRESET="smoke", DATA_PATH=dataset["data_path"], TOKENIZER_PATH=dataset["tokenizer_path"],
               OUT_DIR=str(tmp_path), RUN_ID="smoke", ITERATIONS="2", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0",
               VAL_MAX_TOKENS="192", SLIDING_DIAGNOSTIC="0", EVAL_STRIDE="16", TRAIN_BATCH_TOKENS="512")
    h = tg.Hyperparameters.from_env(env)
    assert h.preset == "smoke" and h.val_max_tokens == 192 and h.muon_momentum_warmup_steps == tg.PRESETS["smoke"]["muon_momentum_warmup_steps"]
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", 1000)
    assert tg.run(h, tg.Runtime.local()) == 0
    lines = (tmp_path / "logs" / "smoke.txt").read_text(encoding="utf-8").splitlines()
    assert "val_subset tokens:192 (VAL_MAX_TOKENS=192): a pipeline check, not a score" in lines
    assert not any(l.startswith("final_score") for l in lines)
    assert sum(l.startswith("subset_score val_loss:") for l in lines) == 1
    verdict = [l for l in lines if l.startswith("size_verdict:")]
    assert len(verdict) == 1 and "smoke run, not a submission" in verdict[0]
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert sub["val_subset"] is True
    m = re.search(r"bytes_total (\d+) \(code (\d+) \+ model (\d+)\) is over the limit by (\d+) of 1000", verdict[0])
    assert m and [int(x) for x in m.groups()] == [sub["bytes_total"], sub["bytes_code"], sub["bytes_model"],
                                                 sub["bytes_total"] - 1000]
