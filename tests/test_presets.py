"""Presets: pr549 reproduces the seed's script bit for bit (a committed fingerprint); cpu stays on the pr549 stack."""
import json
from pathlib import Path

import train_gpt as tg
from fingerprint import fingerprint

FP = Path(__file__).with_name("fingerprints") / "pr549_tiny.json"


def test_pr549_preset_reproduces_the_seed_fingerprint(tmp_path):
    """Training losses (exact floats) and the int6 payload's sha256 of the seed's script (commit 95def0e)."""
    assert fingerprint(tg, tmp_path, tg.PRESETS["pr549"]) == json.loads(FP.read_text())


def test_cpu_preset_is_the_pr549_stack():
    pr, cpu = tg.Hyperparameters(**tg.PRESETS["pr549"]), tg.Hyperparameters(**tg.PRESETS["cpu"])
    for name in tg.PR549:
        if name not in ("preset", "data_path", "tokenizer_path") and name not in tg.PRESETS["cpu"] or name in (
                "smear_gate", "num_loops", "doc_mask", "muon_ns", "muon_eq_r", "warmdown_frac"):
            assert getattr(cpu, name) == getattr(pr, name), name


def test_every_preset_builds():
    for name, overrides in tg.PRESETS.items():
        assert tg.Hyperparameters(**overrides).preset == name
