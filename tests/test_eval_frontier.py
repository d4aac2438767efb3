"""The frontier's evaluation pieces in our one pass: the token-only n-gram tilt (kernel against a dict reference,
prefix-only hints, the closed form's normalization) and the pass's legality with the tilt and every expert on."""
import dataclasses
import math
import os
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import perturbed_model, spawn_ranks, tiny

CPU = tg.Runtime.local()


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ----------------------------------------------------------------------------- the tilt's hints


def reference_hints(tokens, order: int, threshold: float):
    """The documented rule with exact dict keys (no hashing): row t reads the context tokens[t-m .. t-1], then
    token t is counted under it; the top token changes only when a count exceeds the top count."""
    m, ctx, pair = order - 1, {}, {}
    hint, conf = np.full(len(tokens), -1, np.int32), np.zeros(len(tokens), np.float32)
    for t in range(m, len(tokens)):
        c = tuple(int(v) for v in tokens[t - m:t])
        entry = ctx.get(c)  # [total, top_count, top_tok]
        if entry is not None:
            conf[t] = entry[1] / entry[0]
            hint[t] = entry[2] if entry[1] >= threshold * entry[0] else -1
        x = int(tokens[t])
        pair[c, x] = pair.get((c, x), 0) + 1
        if entry is None:
            ctx[c] = [1, 1, x]
        else:
            entry[0] += 1
            if pair[c, x] > entry[1]:
                entry[1], entry[2] = pair[c, x], x
    return hint, conf


def _stream(seed: int, n: int, vocab: int) -> np.ndarray:
    """Random tokens with repeated phrases, so that long contexts recur and counts grow past 1."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, vocab, rng.integers(3, 40)) for _ in range(12)]
    parts, size = [], 0
    while size < n:
        part = phrases[rng.integers(len(phrases))] if rng.random() < 0.6 else rng.integers(0, vocab, 5)
        parts.append(part)
        size += len(part)
    return np.concatenate(parts)[:n]


@pytest.mark.parametrize("order, threshold, vocab, n", [(2, 0.5, 5, 3000), (3, 0.8, 4, 6000), (16, 0.8, 3, 20000),
                                                        (16, 1.0, 50, 20000), (5, 0.3, 65536, 4000), (20, 0.8, 7, 99)])
def test_hints_match_the_dict_reference(order, threshold, vocab, n):
    tokens = _stream(order, n, vocab)
    hint, conf = tg.tilt_hints(tokens, order, threshold)
    want_hint, want_conf = reference_hints(tokens, order, threshold)
    assert np.array_equal(hint, want_hint)
    assert np.array_equal(conf, want_conf)
    if n > 1000:
        assert (hint >= 0).sum() > 20 and ((conf > 0) & (hint < 0)).any()  # both gate outcomes occur


def test_hand_example():
    """Order 2 (context = 1 token) on a b a c a b a. Row 3: a was followed by b once (conf 1); then c follows a
    (b stays top: 1 is not > 1). Row 5: a seen twice, b once (conf 1/2, gated at 0.5 only); b then counts 2.
    Row 6: b was followed by a once (conf 1). Rows 1, 2, 4: contexts not seen yet."""
    a, b, c = 0, 1, 2
    hint, conf = tg.tilt_hints([a, b, a, c, a, b, a], 2, 0.6)
    assert hint.tolist() == [-1, -1, -1, b, -1, -1, a] and conf.tolist() == [0, 0, 0, 1, 0, 0.5, 1]
    assert tg.tilt_hints([a, b, a, c, a, b, a], 2, 0.5)[0].tolist() == [-1, -1, -1, b, -1, b, a]


def test_a_changed_token_never_changes_its_own_or_earlier_rows():
    """The answer flip at the kernel: row t hints token t from tokens[:t]; flip token t and rows <= t stay."""
    tokens = _stream(7, 5000, 6)
    hint, conf = tg.tilt_hints(tokens, 4, 0.5)
    for t in (10, 1234, 2500, 4999):
        flipped = tokens.copy()
        flipped[t] = (flipped[t] + 1) % 6
        h2, c2 = tg.tilt_hints(flipped, 4, 0.5)
        assert np.array_equal(h2[:t + 1], hint[:t + 1]) and np.array_equal(c2[:t + 1], conf[:t + 1])
        assert t == 4999 or not np.array_equal(h2, hint) or not np.array_equal(c2, conf)


def test_each_token_is_counted_once():
    """A stream of one repeated token: at row t the context has been seen t - m times, each time followed by the
    same token, so conf is exactly 1 from row m + 1 on, and the hint is gated at every such row."""
    m = 15
    hint, conf = tg.tilt_hints(np.full(200, 9), m + 1, 0.8)
    assert (hint[:m + 1] == -1).all() and (hint[m + 1:] == 9).all() and (conf[m + 1:] == 1).all()
    tokens = np.tile(np.arange(4), 100)  # period 4: every context of 3 tokens predicts one token, always
    hint, conf = tg.tilt_hints(tokens, 4, 1.0)
    assert (hint[7:] == tokens[7:]).all() and (hint[:7] == -1).all()


def test_bad_input_is_refused():
    for kw in (dict(order=1), dict(order=128), dict(threshold=0.0), dict(threshold=1.5)):
        with pytest.raises(ValueError, match="tilt_hints"):
            tg.tilt_hints(np.zeros(10, np.int64), **{**dict(order=3, threshold=0.5), **kw})
    with pytest.raises(ValueError, match="1-D stream"):
        tg.tilt_hints(np.array([1, -2, 3]))
    for name, value in (("tilt_order", 1), ("tilt_threshold", 0.0), ("tilt_beta", 0.0), ("tilt_beta", 50.0)):
        with pytest.raises(ValueError, match=name.upper()):
            tg.Hyperparameters(**{name: value})
    assert tg.tilt_hints([], 16, 0.8)[0].size == 0


# ----------------------------------------------------------------------------- the closed form


def test_closed_form_is_the_normalized_tilt():
    torch.manual_seed(0)
    lp = (3 * torch.randn(50, 97, dtype=torch.float64)).log_softmax(-1)
    hint = torch.randint(-1, 97, (50,))
    hint[:5] = -1
    beta = 2.625
    cols = torch.arange(97).expand(50, -1)
    got = tg.tilt_log_probs(lp, cols, hint, lp.gather(1, hint.clamp(min=0)[:, None]), beta)
    want = (lp + beta * torch.nn.functional.one_hot(hint.clamp(min=0), 97) * (hint >= 0)[:, None]).log_softmax(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got[:5], lp[:5])  # no hint: untouched
    y = torch.randint(0, 97, (50,))
    q = lp.gather(1, hint.clamp(min=0)[:, None]).squeeze(1).exp()
    nll = -lp.gather(1, y[:, None]).squeeze(1) - beta * (y == hint) + torch.log1p(q * math.expm1(beta)) * (hint >= 0)
    torch.testing.assert_close(-got.gather(1, y[:, None]).squeeze(1), nll, rtol=0, atol=1e-12)


def _experts(h, V, n, bias, betas, tilt, seed=0):
    g = np.random.default_rng(seed)
    tok = g.integers(-1, V, (n + 1, 3)).astype(np.int32)
    tok[::4, 1] = tok[::4, 0]  # a candidate repeated in a row
    cands = (tok, g.random((n + 1, 3)).astype(np.float32) * 2) if betas else None
    hints = np.where(g.random(n + 1) < 0.5, g.integers(0, V, n + 1), -1) if tilt else None
    b = tg.OnlineBias(h, V, CPU.device) if bias else None
    if b is not None:
        b.begin_chunk(None)
    hedge = tg.HedgeMixer(tg.Experts.pool_size(bias, len(betas), tilt), 0.1, CPU.device)
    hedge.log_w = torch.tensor(g.random(hedge.log_w.numel())).log_softmax(0)
    return tg.Experts(h, b, cands, hedge, hints)


@pytest.mark.parametrize("bias, betas, tilt", [(True, (2.0, 4.0), True), (False, (2.0,), True), (True, (), True),
                                               (True, (2.0, 8.0), False), (False, (), False)])
def test_scoring_at_the_targets_equals_the_whole_rows(bias, betas, tilt):
    """The pass scores with cols = the targets (sparse normalizers); every track and expert there equals the whole
    normalized row at the target, with repeated and missing candidates and hints on some rows."""
    V, n = 50, 40
    h = tiny(ngram_betas=",".join(map(str, betas or (2.0,))))
    logits, x = 3 * torch.randn(n, V, generator=torch.Generator().manual_seed(1)), torch.randint(0, V, (n,))
    y, pos = torch.randint(0, V, (n,)), torch.arange(n)
    full, full_ex = _experts(h, V, n, bias, betas, tilt).log_probs(logits, x, pos)
    at, at_ex = _experts(h, V, n, bias, betas, tilt).log_probs(logits, x, pos, y[:, None])
    assert list(full) == list(at) and len(full_ex) == len(at_ex) == 1 + bias + len(betas) + tilt
    for k in full:
        torch.testing.assert_close(full[k].logsumexp(1), torch.zeros(n), rtol=0, atol=2e-5)  # normalized
        torch.testing.assert_close(at[k], full[k].gather(1, y[:, None]), rtol=0, atol=2e-5)
    for e, ea in zip(full_ex, at_ex):
        torch.testing.assert_close(ea, e.gather(1, y[:, None]), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- the pass with the tilt on


ALL_ON = dict(tilt_enabled=True, tilt_order=3, tilt_threshold=0.5, ttt_epochs=1, ttt_lr=0.05)


def adaptive(h, val, luts, recorder=None):
    ctx, model = tg.EvalContext(h, CPU, val, luts), perturbed_model(h)  # one model: TTT's updates reach the scorer
    return tg.adaptive_pass(ctx, model, model, time.perf_counter(), recorder=recorder)


class Recorder:
    def __init__(self, keep_rows=()):
        self.nll, self.rows, self.positions, self.keep_rows = {}, {}, [], set(keep_rows)

    def __call__(self, rec):
        self.positions.append(rec["pos"].clone())
        for k, v in rec["nll"].items():
            self.nll.setdefault(k, {}).update(zip(rec["pos"].tolist(), v.tolist()))
        for i, p in enumerate(rec["pos"].tolist()):
            if p in self.keep_rows:
                self.rows[p] = {k: lp[i].clone() for k, lp in rec["log_probs"].items()}


def test_tilt_track_and_pool(env):
    h = dataclasses.replace(env[0], **ALL_ON)
    rec = Recorder()
    r, experts, _ = adaptive(h, env[1], env[2], rec)
    assert experts.tracks == ["neural", "neural+bias", "neural+bias+ngram", "neural+bias+ngram+tilt", "mixture"]
    assert experts.pool[-1] == f"tilt beta:{h.tilt_beta}" and experts.n_experts == 4 + len(h.ngram_beta_list) - 1
    pos = torch.cat(rec.positions)
    assert torch.equal(pos.sort().values, torch.arange(env[1].numel() - 1))  # every target scored exactly once
    tilted = [p for p in rec.nll["neural+bias+ngram"] if rec.nll["neural+bias+ngram+tilt"][p]
              != rec.nll["neural+bias+ngram"][p]]
    hints = tg.tilt_hints(env[1].numpy(), h.tilt_order, h.tilt_threshold)[0]
    assert tilted and all(hints[p + 1] >= 0 for p in tilted)  # the tilt acts exactly where a hint is gated
    assert r.final == "mixture" and math.isfinite(r.val_bpb)


def test_distributions_sum_to_one_with_the_tilt(env):
    h, val, luts = env
    h = dataclasses.replace(h, **ALL_ON)
    hints = tg.tilt_hints(val.numpy(), h.tilt_order, h.tilt_threshold)[0]
    rows = [int(p) - 1 for p in np.flatnonzero(hints >= 0)[:30]] + [5, 77, 400]
    rec = Recorder(rows)
    adaptive(h, val, luts, rec)
    for p in rows:
        for track, lp in rec.rows[p].items():
            probs = lp.double().exp()
            assert probs.min() >= 0 and abs(probs.sum().item() - 1) < 1e-5, (p, track)


def test_answer_flip_with_every_expert_on(env):
    """Change the target at position t: every score before t and the whole distribution at t stay identical."""
    h, val, luts = env
    h = dataclasses.replace(h, **ALL_ON)
    t = 700
    base, flipped = Recorder([t]), Recorder([t])
    adaptive(h, val, luts, base)
    val2 = val.clone()
    val2[t + 1] = (val2[t + 1] + 17) % h.vocab_size
    adaptive(h, val2, luts, flipped)
    for track in base.nll:
        before = [p for p in base.nll[track] if p < t]
        assert before and all(base.nll[track][p] == flipped.nll[track][p] for p in before), track
        assert torch.equal(base.rows[t][track], flipped.rows[t][track]), track


# ----------------------------------------------------------------------------- the document-isolated plan


DOCS = dict(ALL_ON, eval_plan="docs", ttt_enabled=False, ttt_chunk=8, ttt_doc_batch=4, hedge_enabled=False)
# The two expert sets the docs plan allows: the stream-order tables (n-gram, tilt) or Hedge across documents
DOCS_EXPERTS = {"tables": {}, "hedge": dict(hedge_enabled=True, ngram_enabled=False, tilt_enabled=False)}


def _docs_val(seed=0, n_docs=23, vocab=50) -> torch.Tensor:
    """Documents of very different lengths (1 to 150 targets), a few leading tokens before the first BOS."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(2, vocab, 3)] + [np.concatenate(([tg.BOS_ID], rng.integers(2, vocab, rng.integers(0, 150))))
                                          for _ in range(n_docs)]
    return torch.from_numpy(np.concatenate(docs).astype(np.int32))


def _plans(h, val, world):
    return [tg.plan_docs(tg.EvalContext(h, tg.Runtime(r, r, world, CPU.device), val, None)) for r in range(world)]


@pytest.mark.parametrize("world, chunk, seq, batch", [(1, 8, 32, 4), (2, 8, 32, 4), (3, 5, 12, 2), (2, 48, 48, 64),
                                                      (8, 3, 3, 1)])
def test_docs_plan_scores_every_target_once_inside_its_document(world, chunk, seq, batch):
    h = tg.Hyperparameters(**tg.PR549, eval_seq_len=seq, eval_stride=1, ttt_chunk=chunk, ttt_doc_batch=batch)
    val = _docs_val()
    docs, n = tg.find_docs(val), val.numel() - 1
    assert docs[0].tolist() == [0, 3] and (val[docs[1:, 0]] == tg.BOS_ID).all() and docs[-1, 1] == n
    doc_of = np.searchsorted(docs[:, 0], np.arange(n), side="right") - 1
    plans = _plans(h, val, world)
    assert len({len(p) for p in plans}) == 1  # every rank walks the same steps (the collectives match)
    scored = []
    for rank, spans in enumerate(plans):
        seen = {}  # batch -> the previous step's windows
        for i, span in enumerate(spans):
            assert np.array_equal(span.windows, np.concatenate([p[i].mine for p in plans]))
            for (ws, lo, hi), slot in zip(span.mine, span.slots):
                assert doc_of[ws] == doc_of[hi - 1] and ws <= lo < hi and hi - lo <= chunk and hi - ws <= seq
                assert hi - ws == seq or ws == docs[doc_of[ws], 0]  # the longest context the document has
                assert hi - ws <= span.width <= seq
                assert lo == docs[doc_of[lo], 0] or seen[span.batch][slot] == lo  # its document's previous chunk
                scored.append(np.arange(lo, hi))
            seen[span.batch] = dict(zip(span.slots.tolist(), span.mine[:, 2].tolist()))
    assert np.array_equal(np.sort(np.concatenate(scored)), np.arange(n))
    assert all(np.array_equal(a.mine, b.mine) for a, b in zip(_plans(h, val, world)[0], plans[0]))  # deterministic


def test_docs_plan_runs_the_longest_batches_first_on_the_least_loaded_rank():
    h = tg.Hyperparameters(**tg.PR549, eval_seq_len=32, eval_stride=1, ttt_chunk=8, ttt_doc_batch=3)
    val = _docs_val(1)
    docs = tg.find_docs(val)
    lens = docs[:, 1] - docs[:, 0]
    spans = _plans(h, val, 1)[0]
    firsts = [s for i, s in enumerate(spans) if i == 0 or s.batch != spans[i - 1].batch]
    longest = [max(lens[np.searchsorted(docs[:, 0], s.mine[:, 1], side="right") - 1]) for s in firsts]
    assert longest == sorted(longest, reverse=True) and [s.batch for s in firsts] == list(range(len(firsts)))
    two = _plans(h, val, 2)
    work = [sum(len(s.mine) * s.width for s in p) for p in two]
    assert max(work) - min(work) <= max(len(s.mine) * s.width for p in two for s in p) * -(-150 // 8)


def test_docs_plan_bad_input_fails_at_start_up(dataset, tmp_path):
    with pytest.raises(ValueError, match="EVAL_PLAN=docs.*no BOS"):
        tg.find_docs(torch.arange(2, 40, dtype=torch.int32))
    with pytest.raises(ValueError, match="TTT_CHUNK=64"):
        tg.Hyperparameters(eval_plan="docs", ttt_chunk=64, eval_seq_len=32, ttt_enabled=False)
    with pytest.raises(ValueError, match="EVAL_PLAN=docs"):
        tg.Hyperparameters(eval_plan="docs", ttt_enabled=True)
    with pytest.raises(ValueError, match="EVAL_PLAN=docs.*HEDGE_ENABLED"):
        tg.Hyperparameters(eval_plan="docs", ttt_enabled=False, hedge_enabled=True, ngram_enabled=False)
    with pytest.raises(ValueError, match="TTT_DOC_BATCH=0"):
        tg.Hyperparameters(ttt_doc_batch=0)
    for split in ("train", "val"):  # no BOS anywhere: run() stops before it trains
        tg.write_shard(tmp_path / tg.SHARD_NAME.format(split=split, index=0), np.arange(2, 900) % 1000 + 2)
    h = dataclasses.replace(tiny(data_path=str(tmp_path), tokenizer_path=dataset["tokenizer_path"]), **DOCS,
                            out_dir=str(tmp_path), run_id="nobos")
    with pytest.raises(ValueError, match="no BOS"):
        tg.run(h, CPU)
    assert not (tmp_path / "final_model.int6.ptz").exists()


def _docs_env(env, **kw):
    return dataclasses.replace(env[0], **{**DOCS, **kw}), env[1], env[2]


def test_docs_pass_scores_each_target_once_normalized(env):
    h, val, luts = _docs_env(env)
    rows = [0, 5, 105, 106, 107, 364, 700, 1500, val.numel() - 2]
    rec = Recorder(rows)
    r, experts, _ = adaptive(h, val, luts, rec)
    pos = torch.cat(rec.positions)
    assert torch.equal(pos.sort().values, torch.arange(val.numel() - 1))
    stream = tg.run_pass(tg.EvalContext(h, CPU, val, luts), tg.FixedScorer(perturbed_model(h)), h.eval_stride)
    assert (r.tokens, r.bytes) == (stream.tokens, stream.bytes)
    assert experts.tracks[-1] == r.final == "neural+bias+ngram+tilt"
    for p in rows:
        for track, lp in rec.rows[p].items():
            probs = lp.double().exp()
            assert probs.min() >= 0 and abs(probs.sum().item() - 1) < 1e-5, (p, track)


def test_docs_pass_neural_scores_see_only_their_document(env):
    """A document's neural scores equal scoring it alone, as its own stream (windows never cross a BOS)."""
    h, val, luts = _docs_env(env, bias_enabled=False, ngram_enabled=False, hedge_enabled=False, tilt_enabled=False)
    rec = Recorder()
    adaptive(h, val, luts, rec)
    docs = tg.find_docs(val)
    for a, b in docs[[1, 2, -1]]:
        alone = Recorder()
        adaptive(h, val[a:b + 1].clone(), luts, alone)
        for p in range(a, b):
            assert alone.nll["neural"][p - a] == pytest.approx(rec.nll["neural"][p], abs=2e-5)


def test_docs_pass_bias_is_the_sequential_rule_per_document(env):
    h, val, luts = _docs_env(env, ngram_enabled=False, hedge_enabled=False, tilt_enabled=False, bias_lr=0.5)
    rec = Recorder(range(val.numel() - 1))
    adaptive(h, val, luts, rec)
    x, V = val.long(), h.vocab_size
    r = torch.zeros(V, dtype=torch.float64)
    for t in range(val.numel() - 1):
        p_prev = rec.rows[t - 1]["neural"].double().exp() if t else None
        r = torch.zeros(V, dtype=torch.float64) if x[t] == tg.BOS_ID or t == 0 else \
            r + h.bias_lr * (torch.nn.functional.one_hot(x[t], V).double() - p_prev)
        want = (rec.rows[t]["neural"].double() + r).log_softmax(-1)
        torch.testing.assert_close(rec.rows[t]["neural+bias"].double(), want, rtol=0, atol=2e-4)


@pytest.mark.parametrize("experts", DOCS_EXPERTS)
def test_docs_pass_updates_follow_the_scores_they_use(env, monkeypatch, experts):
    h, val, luts = _docs_env(env, **DOCS_EXPERTS[experts])
    scored, events = set(), []

    def spy(name, fn):
        def wrapped(self, chunk):
            mine = chunk.span.mine
            events.append(name)
            assert all(p in scored for ws, lo, hi in mine for p in range(lo, hi)), name
            return fn(self, chunk)
        return wrapped

    for cls, name in ((tg.OnlineBias, "bias"), (tg.HedgeMixer, "hedge"), (tg.FixedScorer, "scorer")):
        monkeypatch.setattr(cls, "update", spy(name, cls.update))
    rec = Recorder()
    adaptive(h, val, luts, lambda r: (rec(r), scored.update(r["pos"].tolist())))
    assert {"bias", "scorer"} | ({"hedge"} if h.hedge_enabled else set()) <= set(events) and len(scored) == val.numel() - 1


@pytest.mark.parametrize("experts", DOCS_EXPERTS)
def test_docs_answer_flip_with_every_expert_on(env, experts):
    """Flip the target at position t: the distribution at t stays identical, and so does every score that may not
    see it: with the tables, every position before t (each score is a function of its stream prefix); with Hedge,
    every position scored at t's step or before, but t's own and its document's later ones (Hedge's weights carry
    scored losses to later steps, in any document). Other documents' neural scores stay."""
    h, val, luts = _docs_env(env, **DOCS_EXPERTS[experts])
    docs = tg.find_docs(val)
    a, b = max(docs.tolist(), key=lambda d: d[1] - d[0])  # the longest document: its batch is scored first
    t = a + 5  # early in it: other documents are scored after it
    assert tg.BOS_ID not in (val[t + 1], (val[t + 1] + 17) % h.vocab_size)  # the documents stay as they are
    base, flipped, steps = Recorder([t]), Recorder([t]), {}
    adaptive(h, val, luts, lambda r: (base(r), steps.update(dict.fromkeys(r["pos"].tolist(), r["chunk"]))))
    val2 = val.clone()
    val2[t + 1] = (val2[t + 1] + 17) % h.vocab_size
    adaptive(h, val2, luts, flipped)
    for track in base.nll:
        same = [p for p in base.nll[track] if (p < t or not a <= p < b) and steps[p] <= steps[t]] if h.hedge_enabled \
            else [p for p in base.nll[track] if p < t]
        assert same and all(base.nll[track][p] == flipped.nll[track][p] for p in same), track
        assert torch.equal(base.rows[t][track], flipped.rows[t][track]), track
    assert all(base.nll["neural"][p] == flipped.nll["neural"][p] for p in base.nll["neural"] if not a <= p < b)
    final = list(base.nll)[-1]  # Hedge's cross-document adaptation is live: the flip reaches other documents
    assert not h.hedge_enabled or any(base.nll[final][p] != flipped.nll[final][p] for p in base.nll[final] if not a <= p < b)


def _docs_rank_worker(rank, rt, h, out):
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    rec = Recorder()
    ctx = tg.EvalContext(h, rt, val, tg.load_byte_counter(h, val.numel()))
    model = perturbed_model(h)
    r, _, _ = tg.adaptive_pass(ctx, model, model, time.perf_counter(), recorder=rec)
    torch.save({"losses": r.losses, "tokens": r.tokens, "bytes": r.bytes, "nll": rec.nll}, f"{out}.{rank}")


def test_docs_pass_on_two_ranks_scores_each_target_once_as_on_one(env, tmp_path):
    """Two ranks split the batches: together they score every target once, each exactly as one rank does."""
    h, val, luts = _docs_env(env)
    one = Recorder()
    r1, _, _ = adaptive(h, val, luts, one)
    out = str(tmp_path / "docs")
    spawn_ranks(2, _docs_rank_worker, h, out)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert all(rk["tokens"] == r1.tokens and rk["bytes"] == r1.bytes for rk in ranks)
    for track, nll in one.nll.items():
        mine = [set(rk["nll"][track]) for rk in ranks]
        assert mine[0] and mine[1] and not mine[0] & mine[1] and mine[0] | mine[1] == set(nll)
        for rk in ranks:
            assert all(v == pytest.approx(nll[p], abs=1e-5) for p, v in rk["nll"][track].items()), track
        assert ranks[0]["losses"][track] == pytest.approx(r1.losses[track], rel=1e-6)


def test_a_whole_run_with_the_docs_plan_and_the_tilt(dataset, tmp_path, monkeypatch):
    """run(): trains, exports, then the declared docs-plan pass with the tilt built inside the eval clock; the
    diagnostics still slide over the stream."""
    monkeypatch.setattr(tg, "_LOG", {"path": None, "main": True})
    h = dataclasses.replace(tiny(**dataset, out_dir=str(tmp_path), run_id="docs"), **DOCS)
    assert tg.run(h, CPU) == 0
    log = (tmp_path / "logs" / "docs.txt").read_text()
    run = log[log.index("\nhparams "):]  # past the logged source
    assert "eval_plan:docs" in run and "tilt_enabled:True" in run
    assert "\ntilt order:3 threshold:0.5 beta:2.625 gated:" in run and " build_ms:" in run
    assert "\nablation track:neural+bias+ngram+tilt val_loss:" in run and "\nfinal_score val_loss:" in run
    assert "\nfinal_int8_zlib_roundtrip_exact val_loss:" in run
