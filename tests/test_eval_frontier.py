"""The frontier's evaluation pieces in our one pass: the token-only n-gram tilt (kernel against a dict reference,
prefix-only hints, the closed form's normalization) and the pass's legality with the tilt and every expert on."""
import dataclasses
import math
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import perturbed_model

CPU = tg.Runtime.local()


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is much faster and keeps reductions stable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    got = tg.tilt_log_probs(lp, hint, beta)
    want = (lp + beta * torch.nn.functional.one_hot(hint.clamp(min=0), 97) * (hint >= 0)[:, None]).log_softmax(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got[:5], lp[:5])  # no hint: untouched
    y = torch.randint(0, 97, (50,))
    q = lp.gather(1, hint.clamp(min=0)[:, None]).squeeze(1).exp()
    nll = -lp.gather(1, y[:, None]).squeeze(1) - beta * (y == hint) + torch.log1p(q * math.expm1(beta)) * (hint >= 0)
    torch.testing.assert_close(-got.gather(1, y[:, None]).squeeze(1), nll, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- the pass with the tilt on


ALL_ON = dict(tilt_enabled=True, tilt_order=3, tilt_threshold=0.5, ttt_epochs=1, ttt_lr=0.05)


def adaptive(h, val, luts, recorder=None):
    ctx = tg.EvalContext(h, CPU, val, luts)
    return tg.adaptive_pass(ctx, perturbed_model(h), perturbed_model(h), time.perf_counter(), recorder=recorder)


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
