"""The legal pass: exactly-once windows, answer flip, update-after-score ordering, TTT invariants, ranks."""
import dataclasses
import re
import math
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import perturbed_model, spawn_ranks, tiny

CPU = tg.Runtime.local()


def adaptive(h, model, val, luts, recorder=None, rt=CPU, budget=None):
    return tg.adaptive_pass(tg.EvalContext(h, rt, val, luts), model, model, time.perf_counter(), recorder=recorder,
                            budget=budget)


class WorkClock:
    """A deterministic clock driven by the work done: SCORE_S per scored batch, EPOCH_S per TTT step."""
    SCORE_S, EPOCH_S = 1.0, 2.0

    def __init__(self, monkeypatch):
        self.t = 0.0
        real_score, real_step = tg.score_windows, tg.TestTimeTrainer._step
        monkeypatch.setattr(tg, "score_windows", lambda *a: (self.tick(self.SCORE_S), real_score(*a))[1])
        monkeypatch.setattr(tg.TestTimeTrainer, "_step", lambda tr, *a: (self.tick(self.EPOCH_S), real_step(tr, *a))[1])

    def tick(self, dt):
        self.t += dt

    def __call__(self):
        return self.t


def tight_budget(h, val, monkeypatch, share=0.5) -> tuple[tg.EvalBudget, float]:
    """A guard on a WorkClock whose budget holds all the pass's scoring and `share` of its full-epoch TTT work."""
    spans = tg.plan_chunks(tg.EvalContext(h, CPU, val, None), h.eval_stride, h.ttt_chunk_tokens)
    scoring = sum(-(-len(s.mine) // h.eval_batch_seqs) for s in spans) * WorkClock.SCORE_S
    seconds = scoring + share * (len(spans) - 1) * h.ttt_epochs * WorkClock.EPOCH_S
    hb = dataclasses.replace(h, eval_budget_seconds=seconds, eval_margin_seconds=0.0)
    return tg.EvalBudget(hb, CPU, 0.0, WorkClock(monkeypatch)), seconds


@pytest.fixture(params=["unguarded", "guarded"])
def guard(request, monkeypatch):
    """None, or a factory of a tight budget guard (it must lower the TTT epochs during the pass)."""
    if request.param == "unguarded":
        return None
    return lambda h, val: tight_budget(h, val, monkeypatch)[0]


class Recorder:
    def __init__(self, keep_rows=()):
        self.nll, self.rows, self.events = {}, {}, []
        self.keep_rows = set(keep_rows)

    def __call__(self, rec):
        self.events.append(("score", rec["chunk"], rec["pos"].min().item(), rec["pos"].max().item()))
        for k, v in rec["nll"].items():
            self.nll.setdefault(k, {}).update(zip(rec["pos"].tolist(), v.tolist()))
        for i, p in enumerate(rec["pos"].tolist()):
            if p in self.keep_rows:
                self.rows[p] = {k: lp[i].clone() for k, lp in rec["log_probs"].items()}


@pytest.mark.parametrize("n,window,stride", [(1000, 32, 8), (1001, 32, 8), (31, 32, 8), (257, 64, 64), (500, 50, 7)])
def test_windows_score_every_target_exactly_once(n, window, stride):
    wins = tg.plan_windows(n, window, stride)
    scored = np.concatenate([np.arange(lo, hi) for _, lo, hi in wins])
    assert np.array_equal(scored, np.arange(n))
    assert all(hi - ws <= window and lo >= ws for ws, lo, hi in wins)
    if stride < window:  # every window but the first keeps at least window-stride tokens of context
        assert all(lo - ws >= window - stride for ws, lo, hi in wins[1:])


def test_stride_equal_window_is_plain_eval(env):
    h, val, luts = env
    model = perturbed_model(h)
    r = tg.run_pass(tg.EvalContext(h, CPU, val, luts), tg.FixedScorer(model), stride=h.eval_seq_len)
    n = (val.numel() - 1) // h.eval_seq_len * h.eval_seq_len
    x, y = val[:n].long().view(-1, h.eval_seq_len), val[1:n + 1].long().view(-1, h.eval_seq_len)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x).reshape(-1, h.vocab_size).double(), y.reshape(-1), reduction="sum")
    assert r.tokens == val.numel() - 1 == n
    assert r.val_loss == pytest.approx(ce.item() / n, rel=1e-6)


def test_answer_flip_full_pass(env, guard):
    """Change the target at position t: every score before t and the whole distribution at t stay identical.
    Guarded: the budget guard lowers TTT epochs mid-pass, identically in both runs (it reads only the clock)."""
    h, val, luts = env
    h = dataclasses.replace(h, ttt_epochs=2, ttt_lr=0.05)
    t = 700
    base, flipped = Recorder([t]), Recorder([t])
    budgets = [guard(h, val) if guard else None]  # each guard's clock starts at 0 with its own run
    adaptive(h, perturbed_model(h), val, luts, base, budget=budgets[0])
    val2 = val.clone()
    val2[t + 1] = (val2[t + 1] + 17) % h.vocab_size
    budgets.append(guard(h, val2) if guard else None)
    adaptive(h, perturbed_model(h), val2, luts, flipped, budget=budgets[1])
    if guard:
        assert budgets[0].changes and budgets[0].changes == budgets[1].changes
        assert min(e for _, _, e in budgets[0].changes) < h.ttt_epochs
    for track in base.nll:
        before = [p for p in base.nll[track] if p < t]
        assert before and all(base.nll[track][p] == flipped.nll[track][p] for p in before), track
        assert torch.equal(base.rows[t][track], flipped.rows[t][track]), track
    later = [p for p in base.nll["mixture"] if p > t + 1]
    assert any(base.nll["mixture"][p] != flipped.nll["mixture"][p] for p in later)  # adaptation is live


def test_every_update_follows_the_scores_it_uses(env, monkeypatch, guard):
    h, val, luts = env
    h = dataclasses.replace(h, ttt_epochs=2)
    events = []
    rec = Recorder()
    budget = guard(h, val) if guard else None

    def spy(name, fn):
        def wrapped(self, scored):
            events.append((name, scored.index, scored.lo, scored.hi))
            return fn(self, scored)
        return wrapped

    for cls, name in ((tg.OnlineBias, "bias"), (tg.HedgeMixer, "hedge"), (tg.TestTimeTrainer, "ttt")):
        monkeypatch.setattr(cls, "update", spy(name, cls.update))
    adaptive(h, perturbed_model(h), val, luts, lambda r: (rec(r), events.append(rec.events[-1])), budget=budget)
    if budget is not None:
        assert budget.changes and budget.clock() <= budget.deadline
    scored_upto = -1
    for ev in events:
        if ev[0] == "score":
            assert ev[2] > scored_upto  # left to right, never re-scored
            scored_upto = ev[3]
        else:  # an update only covers positions whose scores are already recorded
            assert ev[3] - 1 <= scored_upto, ev
    assert {e[0] for e in events} == {"score", "bias", "hedge", "ttt"}
    n_chunks = max(e[1] for e in events) + 1
    assert sum(e[0] == "ttt" for e in events) == n_chunks


def test_last_chunk_is_never_trained_on(env, monkeypatch):
    h, val, luts = env
    trained = []
    orig = tg.TestTimeTrainer._step
    monkeypatch.setattr(tg.TestTimeTrainer, "_step", lambda self, x, y, n: (trained.append(int(y.max())), orig(self, x, y, n)))
    chunks = []
    adaptive(dataclasses.replace(h, bias_enabled=False, ngram_enabled=False, hedge_enabled=False), perturbed_model(h), val, luts,
             lambda r: chunks.append(r["chunk"]))
    n_chunks = max(chunks) + 1
    assert n_chunks >= 3 and len(trained) == (n_chunks - 1) * h.ttt_epochs


def test_ttt_lr0_equals_plain_sliding(env):
    h, val, luts = env
    h = dataclasses.replace(h, ttt_lr=0.0, ttt_polyak_decay=0.0, bias_enabled=False, ngram_enabled=False, hedge_enabled=False)
    plain = tg.run_pass(tg.EvalContext(h, CPU, val, luts), tg.FixedScorer(perturbed_model(h)), stride=h.eval_stride)
    r, _, _ = adaptive(h, perturbed_model(h), val, luts)
    assert r.final == "neural" and r.val_loss == plain.val_loss
    h2 = dataclasses.replace(h, ttt_polyak_decay=0.998)  # the averaged copy of unchanged weights: equal up to rounding
    r2, _, _ = adaptive(h2, perturbed_model(h), val, luts)
    assert r2.val_loss == pytest.approx(plain.val_loss, rel=1e-6)


def test_polyak_scores_with_a_separate_copy(env):
    h, val, luts = env
    h = dataclasses.replace(h, ttt_lr=0.05, bias_enabled=False, ngram_enabled=False, hedge_enabled=False)
    off, on = Recorder(), Recorder()
    _, _, ttt_off = adaptive(dataclasses.replace(h, ttt_polyak_decay=0.0), perturbed_model(h), val, luts, off)
    _, _, ttt_on = adaptive(dataclasses.replace(h, ttt_polyak_decay=0.9), perturbed_model(h), val, luts, on)
    assert ttt_off.current is ttt_off.model and ttt_on.current is ttt_on.avg
    first = [p for p in off.nll["neural"] if p < h.ttt_chunk_tokens]
    assert all(off.nll["neural"][p] == on.nll["neural"][p] for p in first)  # chunk 0: nothing trained yet
    later = [p for p in off.nll["neural"] if p >= 2 * h.ttt_chunk_tokens]
    assert any(abs(off.nll["neural"][p] - on.nll["neural"][p]) > 1e-6 for p in later)
    # the raw weights keep training: they differ from the averaged copy
    assert any(not torch.equal(a, b) for a, b in zip(ttt_on.model.parameters(), ttt_on.avg.parameters()))


def test_distributions_sum_to_one_and_bias_resets_at_bos(env):
    h, val, luts = env
    rows = np.random.default_rng(0).choice(val.numel() - 1, 40, replace=False).tolist()
    bos_rows = [p for p in range(val.numel() - 1) if int(val[p]) == tg.BOS_ID]
    rec = Recorder(rows + bos_rows)
    adaptive(h, perturbed_model(h), val, luts, rec)
    for p in rows:
        for track, lp in rec.rows[p].items():
            probs = lp.double().exp()
            assert probs.min() >= 0 and abs(probs.sum().item() - 1) < 1e-6, (p, track)
    assert bos_rows
    for p in bos_rows:  # input at p is BOS: a new document, so the bias is exactly zero
        assert torch.equal(rec.rows[p]["neural+bias"], rec.rows[p]["neural"])


def test_hedge_weights_use_only_earlier_chunks(env):
    """Replay: the mixture scored in chunk c equals Hedge weights computed from the recorded expert losses of
    chunks < c alone (w_k <- w_k exp(-eta * mean loss_k)), applied to that chunk's experts."""
    h, val, luts = env
    h = dataclasses.replace(h, hedge_eta=3.0, ttt_enabled=False)
    per_chunk = {}
    _, experts, _ = adaptive(h, perturbed_model(h), val, luts, lambda r: per_chunk.setdefault(r["chunk"], []).append(r))
    log_w = torch.full((experts.n_experts,), -math.log(experts.n_experts), dtype=torch.float64)
    for c in sorted(per_chunk):
        losses, n = torch.zeros(experts.n_experts, dtype=torch.float64), 0
        for r in per_chunk[c]:
            mix = torch.logsumexp(torch.stack(r["experts"]).double() + log_w[:, None, None], 0)
            assert torch.allclose(mix, r["log_probs"]["mixture"].double(), atol=1e-5)
            losses += torch.stack([-e.gather(1, r["y"][:, None]).double().sum() for e in r["experts"]])
            n += r["y"].numel()
        log_w = log_w - h.hedge_eta * losses / n
        log_w = log_w - torch.logsumexp(log_w, 0)
    assert torch.allclose(experts.hedge.log_w, log_w)
    assert (log_w.exp() - 1 / experts.n_experts).abs().max() > 1e-3  # the weights did move


def test_one_bucket_collision_stays_honest(env):
    """With a single hash bucket every context collides; the boosted experts remain normalized, and the n-gram
    track cannot beat the neural+bias track by more than a unigram-prior's worth."""
    h, val, luts = env
    h = dataclasses.replace(h, ngram_table_bits=0, ttt_enabled=False)
    rows = list(range(100, 2000, 97))
    rec = Recorder(rows)
    r, _, _ = adaptive(h, perturbed_model(h), val, luts, rec)
    for p in rows:
        for lp in rec.rows[p].values():
            assert abs(lp.double().exp().sum().item() - 1) < 1e-6
    assert r.bpbs["neural+bias+ngram"] > r.bpbs["neural+bias"] - 0.25
    assert r.bpbs["mixture"] > 0.5 * r.bpbs["neural"]


def _rank_worker(rank, rt, h, out):
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    r, _, _ = adaptive(h, perturbed_model(h), val, tg.load_byte_counter(h), rt=rt)
    if rank == 0:
        torch.save({"losses": r.losses, "tokens": r.tokens, "bytes": r.bytes}, out)


def test_two_ranks_match_one_rank(env, tmp_path):
    """Windows split across ranks, TTT gradients all-reduced, Hedge losses all-reduced: the 2-rank score equals
    the 1-rank score up to float reassociation (sums of NLL and gradients in another order; TTT compounds it
    over a few chunks), so 1e-5 relative. The online bias is off: its in-chunk context legitimately differs
    across ranks (see OnlineBias)."""
    h, val, luts = env
    h = dataclasses.replace(h, bias_enabled=False, ttt_lr=0.02)
    one, _, _ = adaptive(h, perturbed_model(h), val, luts)
    out = str(tmp_path / "r2.pt")
    spawn_ranks(2, _rank_worker, h, out)
    two = torch.load(out)
    assert two["tokens"] == one.tokens and two["bytes"] == one.bytes
    for k, v in one.losses.items():
        assert two["losses"][k] == pytest.approx(v, rel=1e-5), k


# ----------------------------------------------------------------------------- the eval budget guard


class _SimScorer:
    epochs = 0


@pytest.mark.parametrize("n, score_s, epoch_s, compile_s, epochs, budget", [
    (50, 1.0, 2.0, 30.0, 3, 200.0), (50, 1.0, 2.0, 30.0, 3, 400.0), (50, 1.0, 2.0, 30.0, 3, 1000.0),
    (20, 0.5, 5.0, 0.0, 2, 40.0), (200, 0.1, 0.3, 10.0, 4, 60.0), (50, 1.0, 2.0, 30.0, 3, 60.0),
])
def test_guard_keeps_a_simulated_pass_inside_its_deadline(n, score_s, epoch_s, compile_s, epochs, budget):
    """Constant per-chunk costs (chunk 0 also pays compilation): the guard's projections are then exact, so the
    pass ends inside the deadline whenever the unavoidable work fits (chunk 0 and 1 train at full epochs before
    any clean measurement exists), it never wastes a whole epoch of room, and it flags the infeasible case."""
    h = tiny(ttt_epochs=epochs, eval_budget_seconds=budget, eval_margin_seconds=5.0)
    t = [0.0]
    g = tg.EvalBudget(h, CPU, 0.0, lambda: t[0])
    sc = _SimScorer()
    sc.epochs = epochs
    trained = []
    for c in range(n):
        span = tg.ChunkSpan(c, n, np.zeros((4, 3), np.int64), np.zeros((4, 3), np.int64))
        g.begin(span, sc)
        t[0] += score_s + (compile_s if c == 0 else 0.0)
        g.plan(span, sc)
        if c < n - 1:
            t[0] += sc.epochs * epoch_s
            trained.append(sc.epochs)
    minimum = compile_s + n * score_s + 2 * epochs * epoch_s
    if minimum <= g.deadline:
        assert t[0] <= g.deadline and not g.error
        assert t[0] + (n - 3) * epoch_s > g.deadline or trained[2:] == [epochs] * (n - 3)  # room is used
    if compile_s + n * score_s + 2 * epochs * epoch_s > g.deadline + epochs * epoch_s:
        assert g.error.startswith("ERROR: eval budget") and "invalid" in g.error
    assert [e for _, _, e in g.changes] == [trained[c] for c, _, _ in g.changes]


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(tg, "_LOG", {"path": None, "main": True})


@pytest.mark.parametrize("share, rc", [(0.5, 0), (-0.5, 1)])
def test_tiny_run_lands_inside_a_small_eval_budget(dataset, tmp_path, monkeypatch, fresh_log, share, rc):
    """A whole run on the WorkClock: with room for half the TTT work the guard lowers epochs, skips the optional
    diagnostics it has no room for and the pass ends inside the budget; with less than the scoring alone it logs
    an ERROR and exits 1 after writing the results."""
    h = tiny(**dataset, out_dir=str(tmp_path), run_id="budget", ttt_epochs=2, ngram_enabled=False)
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    budget, seconds = tight_budget(h, val, monkeypatch, share)
    h = dataclasses.replace(h, eval_budget_seconds=seconds, eval_margin_seconds=0.0)
    assert tg.run(h, CPU, clock=budget.clock) == rc
    log = (tmp_path / "logs" / "budget.txt").read_text()
    run = log[re.search(r"^hparams ", log, re.M).start():]  # past the logged source
    end = float(re.search(r"^budget pass_end elapsed:([\d.]+)s", run, re.M).group(1))
    assert (tmp_path / "submission.json").is_file() and "final_score val_loss:" in run
    if rc == 0:
        assert end <= seconds and re.search(r"^budget chunk:\d+ epochs:2->[01] projected:[\d.]+s", run, re.M)
        skips = re.findall(r"^skip diagnostic:(\S+) reason:estimated", run, re.M)
        assert "int6_sliding" in skips  # as costly as the pass's scoring: no room left for it
        exact = re.search(r"^final_int8_zlib_roundtrip_exact ", run, re.M)
        assert ("final_int8_zlib_roundtrip" in skips) == (exact is None)
        total = float(re.search(r"^eval_total_time:([\d.]+)ms", run, re.M).group(1)) / 1000
        assert total <= seconds
    else:
        assert re.search(r"^ERROR: eval budget: even scoring only", run, re.M) and end > seconds
