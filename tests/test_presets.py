"""Presets: pr549 reproduces the seed's script bit for bit; cpu is the pr549 stack at CPU size (the quick start);
cpu-frontier is that stack with the frontier levers that paid at CPU size."""
from pathlib import Path

import train_gpt as tg
from fingerprint import fingerprint, load_script

# The seed's script (commit 95def0e), shipped: both fingerprints are computed on the machine that runs the test,
# because exact float results differ across CPU types (a committed hash held on one machine only).
SEED = Path(__file__).with_name("fingerprints") / "seed_train_gpt.py"


def test_pr549_preset_reproduces_the_seed_script(tmp_path):
    """Training losses (exact floats) and the int6 payload's sha256, today's script with PRESET=pr549 against the seed's
    script with its defaults (the pr549 config), on the same synthetic data."""
    want = fingerprint(load_script(str(SEED)), tmp_path / "seed")
    assert fingerprint(tg, tmp_path / "today", tg.PRESETS["pr549"]) == want


def test_cpu_preset_is_the_pr549_stack():
    pr, cpu = tg.Hyperparameters(**tg.PRESETS["pr549"]), tg.Hyperparameters(**tg.PRESETS["cpu"])
    for name in tg.PR549:
        if name not in ("preset", "data_path", "tokenizer_path") and name not in tg.PRESETS["cpu"] or name in (
                "smear_gate", "num_loops", "doc_mask", "muon_ns", "muon_eq_r", "warmdown_frac"):
            assert getattr(cpu, name) == getattr(pr, name), name


def test_cpu_frontier_shares_the_cpu_size_and_data():
    """The README's two CPU rows differ in the stack and the steps only: same dims, sequence, batch and stand-in data."""
    new, cpu = tg.Hyperparameters(**tg.PRESETS["cpu-frontier"]), tg.Hyperparameters(**tg.PRESETS["cpu"])
    for name in (*tg.CPU_SIZE, "vocab_size", "bigram_vocab_size", "ve_layers", "matrix_lr"):
        assert getattr(new, name) == getattr(cpu, name), name
    assert new.iterations > cpu.iterations and new.doc_mask and new.muon_eq_r and not new.ttt_enabled


def test_every_preset_builds():
    for name, overrides in tg.PRESETS.items():
        assert tg.Hyperparameters(**overrides).preset == name
