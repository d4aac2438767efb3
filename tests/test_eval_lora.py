"""Per-document LoRA TTT and phased global SGD on the docs plan (issue #20, spec 6.3-6.4): the adapters leave the base
model exact at B = 0, rows never mix, every target is scored once (1 and 2 ranks), distributions stay normalized,
flips never reach earlier scores (also through a phase that trains on the flipped document), the guard skips a phase
that does not fit, and bad knobs fail at start-up naming the variable."""
import dataclasses
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import perturbed_model, spawn_ranks, tiny
from test_eval_frontier import DOCS, Recorder, _plans, _docs_val

CPU = tg.Runtime.local()
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# LoRA on the docs plan, neural track only; a learning rate large enough that adaptation shows at this size
LORA = dict(DOCS, ttt_enabled=True, ttt_mode="lora", lora_rank=4, lora_alpha=8.0, lora_lr=0.02, ttt_phases="",
            bias_enabled=False, ngram_enabled=False, tilt_enabled=False, ttt_phase_lr=0.05, ttt_chunk_tokens=64)


def _h(env, **kw):
    return dataclasses.replace(env[0], **{**LORA, **kw})


@pytest.fixture(scope="module")
def short_env(env):
    """env with seven of its documents (59 to 194 tokens): each pass takes about a second."""
    docs = tg.find_docs(env[1])
    val = torch.cat([env[1][a:b] for a, b in docs[[0, 3, 4, 5, 6, 7, 11]]] + [env[1][:1]])  # ends on a BOS target
    return env[0], val, env[2]


def _pass(h, val, luts, recorder=None, budget=None):
    model = perturbed_model(h)
    ctx = tg.EvalContext(h, CPU, val, luts)
    return tg.adaptive_pass(ctx, model, model, time.perf_counter(), recorder=recorder, budget=budget)


class StepRecorder(Recorder):
    def __init__(self, keep_rows=()):
        super().__init__(keep_rows)
        self.step = {}

    def __call__(self, rec):
        super().__call__(rec)
        self.step.update(dict.fromkeys(rec["pos"].tolist(), rec["chunk"]))


def test_zero_b_is_the_base_model_and_rows_are_independent():
    """One forward: with B = 0 the adapted model's logits equal the base model's exactly (loop, lanes and gates on);
    changing one row's adapters changes that row only."""
    h = tiny(num_loops=1, loop_start=0, loop_end=0, parallel_start_layer=1, smear_gate="gated", attn_gate=True,
             skip_gates=True, lora_rank=4)
    model = perturbed_model(h)
    x = torch.randint(2, h.vocab_size, (3, 16))
    x[:, 0], x[1, 9] = tg.BOS_ID, tg.BOS_ID
    base = model(x)
    lora = model.lora = tg.DocLoRA(h, model, "cpu", 0)
    assert len(lora.A) == 5 * len(model.orders[True]) + 1  # Q, K, V, O, MLP per virtual layer, and the head
    lora.rows = torch.tensor([2, 0, 1])
    assert torch.equal(model(x), base)
    with torch.no_grad():
        for b in lora.B:
            b[0].normal_()  # document slot 0 = batch row 1
    out = model(x)
    assert torch.equal(out[[0, 2]], base[[0, 2]]) and not torch.allclose(out[1], base[1])
    model.lora = None
    assert torch.equal(model(x), base)


def test_zero_lr_lora_scores_exactly_as_the_fixed_docs_pass(short_env):
    h = _h(short_env, lora_lr=0.0, lora_wd=0.0)
    rec, fixed = Recorder(), Recorder()
    r, _, scorer = _pass(h, short_env[1], short_env[2], rec)
    assert isinstance(scorer, tg.LoRATrainer)
    _pass(dataclasses.replace(h, ttt_enabled=False, ttt_mode="full"), short_env[1], short_env[2], fixed)
    assert rec.nll["neural"] == fixed.nll["neural"]
    trained = _pass(_h(short_env), short_env[1], short_env[2])[0]
    assert trained.val_loss != r.val_loss  # the adapters do move at a real learning rate


def test_rows_of_a_batch_never_influence_each_other(short_env):
    """One batch holds every document: perturbing one document's tokens leaves every other document's scores."""
    h, val, luts = _h(short_env, ttt_doc_batch=64), *short_env[1:]
    docs = tg.find_docs(val)
    a, b = docs[3]
    base, pert = Recorder(), Recorder()
    _pass(h, val, luts, base)
    val2 = val.clone()
    val2[a + 2:b - 1] = (val2[a + 2:b - 1] + 5) % (h.vocab_size - 2) + 2  # never a BOS
    _pass(h, val2, luts, pert)
    others = [p for p in base.nll["neural"] if not a <= p < b]
    assert all(base.nll["neural"][p] == pytest.approx(pert.nll["neural"][p], abs=1e-6) for p in others)
    assert any(base.nll["neural"][p] != pert.nll["neural"][p] for p in range(a, b))


def test_lora_pass_with_phases_scores_each_target_once_normalized(short_env, monkeypatch):
    lines = []
    monkeypatch.setattr(tg, "log0", lambda msg, console=True: lines.append(msg))
    h = _h(short_env, ttt_phases="2,4,100000", bias_enabled=True, ngram_enabled=True, tilt_enabled=True)
    val, luts = short_env[1:]
    rows = [0, 5, 106, 700, val.numel() - 2]
    rec = Recorder(rows)
    r, experts, _ = _pass(h, val, luts, rec)
    assert torch.equal(torch.cat(rec.positions).sort().values, torch.arange(val.numel() - 1))
    assert r.final == "neural+bias+ngram+tilt" and r.tokens == val.numel() - 1
    for p in rows:
        for track, lp in rec.rows[p].items():
            assert abs(lp.double().exp().sum().item() - 1) < 1e-5, (p, track)
    n_docs = len(tg.find_docs(val))
    assert f"ttt_phase docs:100000 skipped: the validation set has {n_docs} documents" in lines
    assert sum(line.startswith("budget phase docs:") and " ran:" in line for line in lines) == 2


def test_every_document_finishes_in_exactly_one_span():
    h = tg.Hyperparameters(**tg.PR549, eval_seq_len=32, eval_stride=1, ttt_chunk=8, ttt_doc_batch=4)
    val = _docs_val()
    docs = tg.find_docs(val)
    for plans in (_plans(h, val, 1), _plans(h, val, 2)):
        assert all(np.array_equal(a.done, b.done) for a, b in zip(plans[0], plans[-1]))  # every rank agrees
        done = np.concatenate([s.done for s in plans[0]])
        assert sorted(done.tolist()) == list(range(len(docs)))
        for s in plans[0]:  # a document is done in the span that scores its last target
            last = {int(d) for d in np.flatnonzero(np.isin(docs[:, 1], s.windows[:, 2]))}
            assert set(s.done.tolist()) == last


@pytest.mark.parametrize("every_part", [False, True])
def test_flip_inside_a_document_a_phase_trains_on(short_env, every_part):
    """Flip the target at t, early in the longest document (the first batch); a phase after the first batch trains on
    that document. Every score before t's step (and, with the stream-order tables, before t in the stream) is
    unchanged, and t's distribution too; the phase carries the flip into later documents."""
    parts = dict(bias_enabled=True, ngram_enabled=True, tilt_enabled=True) if every_part else {}
    h, val, luts = _h(short_env, ttt_phases="4", **parts), *short_env[1:]
    docs = tg.find_docs(val)
    a, b = max(docs.tolist(), key=lambda d: d[1] - d[0])
    t = a + 5
    base, flipped = StepRecorder([t]), StepRecorder([t])
    _pass(h, val, luts, base)
    val2 = val.clone()
    val2[t + 1] = (val2[t + 1] + 17) % h.vocab_size
    assert tg.BOS_ID not in (val[t + 1], val2[t + 1])
    _pass(h, val2, luts, flipped)
    for track in base.nll:
        same = [p for p in base.nll[track] if base.step[p] <= base.step[t]
                and (p < t if every_part else p < t or not a <= p < b)]
        assert same and all(base.nll[track][p] == flipped.nll[track][p] for p in same), track
        assert torch.equal(base.rows[t][track], flipped.rows[t][track]), track
    later = [p for p in base.nll["neural"] if not a <= p < b and base.step[p] > base.step[t]]
    assert any(base.nll["neural"][p] != flipped.nll["neural"][p] for p in later)  # the phase trained on the flip


def test_guard_skips_a_phase_that_does_not_fit(short_env, monkeypatch):
    lines = []
    monkeypatch.setattr(tg, "log0", lambda msg, console=True: lines.append(msg))
    h, val, luts = _h(short_env, ttt_phases="4", eval_budget_seconds=0.5, eval_margin_seconds=0.0), *short_env[1:]
    budget = tg.EvalBudget(h, CPU, time.perf_counter() - 10.0)  # the clock is already past the deadline
    r, _, _ = _pass(h, val, luts, budget=budget)
    assert any(line.startswith("budget phase docs:4 skipped projected:") for line in lines), lines
    assert not any(" ran:" in line for line in lines) and r.budget_error  # and the pass reports the overrun
    lines.clear()
    _pass(h, val, luts, budget=tg.EvalBudget(dataclasses.replace(h, eval_budget_seconds=600.0), CPU,
                                             time.perf_counter()))
    assert any(line.startswith("budget phase docs:4 ran:") for line in lines), lines


@pytest.mark.parametrize("env_vars, match", [
    (dict(LORA_RANK="0"), "LORA_RANK=0 must be >= 1"),
    (dict(LORA_RANK="1000", EVAL_PLAN="docs", HEDGE_ENABLED="0", TTT_MODE="lora"), "LORA_RANK=1000 .*<= MODEL_DIM"),
    (dict(LORA_ALPHA="0"), "LORA_ALPHA=0.0 must be > 0"),
    (dict(LORA_LR="-1"), "LORA_LR=-1.0"),
    (dict(TTT_PHASES="5,3"), "TTT_PHASES=5,3 must be increasing"),
    (dict(TTT_PHASES="0"), "TTT_PHASES=0"),
    (dict(TTT_PHASES="a"), "TTT_PHASES='a'"),
    (dict(TTT_MODE="adapters"), "TTT_MODE=adapters must be one of"),
    (dict(TTT_MODE="lora"), "TTT_MODE=lora must be lora exactly when EVAL_PLAN=docs"),
    (dict(EVAL_PLAN="docs", HEDGE_ENABLED="0"), "TTT_MODE=full must be lora exactly when EVAL_PLAN=docs"),
])
def test_bad_knobs_fail_at_start_up_naming_the_variable(env_vars, match):
    with pytest.raises(ValueError, match=match):
        tg.Hyperparameters.from_env(env_vars)
    ok = tg.Hyperparameters.from_env(dict(EVAL_PLAN="docs", HEDGE_ENABLED="0", TTT_MODE="lora", TTT_PHASES=""))
    assert ok.ttt_phase_list == () and ok.lora_rank == 80 and ok.lora_alpha == 144.0


def _rank_worker(rank, rt, h, out):
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)[:1200]  # about 6 documents: quick
    rec = Recorder()
    model = perturbed_model(h)
    ctx = tg.EvalContext(h, rt, val, tg.load_byte_counter(h, val.numel()))
    r, _, _ = tg.adaptive_pass(ctx, model, model, time.perf_counter(), recorder=rec)
    torch.save({"loss": r.val_loss, "tokens": r.tokens, "bytes": r.bytes, "nll": rec.nll}, f"{out}.{rank}")


def test_two_ranks_score_each_target_once_with_phases(env, tmp_path):
    """Two ranks split the batches and all-reduce the phases' gradients: every target once, one agreed score."""
    h, val = _h(env, ttt_phases="2,4", ttt_doc_batch=2), env[1][:1200]
    out = str(tmp_path / "lora")
    spawn_ranks(2, _rank_worker, h, out)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    mine = [set(rk["nll"]["neural"]) for rk in ranks]
    assert mine[0] and mine[1] and not mine[0] & mine[1] and mine[0] | mine[1] == set(range(val.numel() - 1))
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[0]["tokens"] == val.numel() - 1
