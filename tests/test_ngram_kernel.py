"""Tests for the causal n-gram candidate kernel (train_gpt.py §7, ngram_candidates).

A plain-dict reference implements the documented rules (hash, head rule, slot rule, backoff) on its
own; the kernel must match it exactly, be causal, insert each token once per order, and give the
same answer in its no-JIT and no-numba fallbacks.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    """The module that holds ngram_candidates."""
    sys.path.insert(0, str(ROOT))
    import train_gpt
    return train_gpt


# ---------------------------------------------------------------- reference (plain Python dicts)
MOD = 2**31 - 1


def ref_hash(context, mul):
    """sum_j (tokens[t-j] + 1) * mul**(j-1) mod M, written as Horner over the context, oldest first."""
    h = 0
    for x in context:
        h = (h * mul + x + 1) % MOD
    return h


def ref_add_slot(slots, x, cap):
    """Space-saving: +1 if present, else a free slot with 1, else replace the (count, token)-minimum."""
    if x in slots:
        slots[x] += 1
    elif len(slots) < cap:
        slots[x] = 1
    else:
        count, token = min((c, tok) for tok, c in slots.items())
        del slots[token]
        slots[x] = count + 1


def reference(tokens, min_order, max_order, table_bits, top_k, min_count):
    ng = load()
    tokens = [int(x) for x in tokens]
    n, mask = len(tokens), (1 << table_bits) - 1
    orders = range(min_order, max_order + 1)
    tables = {k: {} for k in orders}  # bucket -> [tag, total, {token: count}]
    counts = np.zeros((n, top_k), np.float32)
    cand_tok = np.full((n, top_k), -1, np.int32)
    chosen = np.zeros(n, np.int8)
    inserted, dropped, evicted = ({k: 0 for k in orders} for _ in range(3))
    for t in range(n):
        keys = {k: (ref_hash(tokens[t - k:t], ng.NG_MUL_ROW) & mask, ref_hash(tokens[t - k:t], ng.NG_MUL_TAG))
                for k in orders if t >= k}
        for k in sorted(keys, reverse=True):  # backoff, reading the tables before token t
            bucket = tables[k].get(keys[k][0])
            if bucket and bucket[0] == keys[k][1] and bucket[1] >= min_count:
                ranked = sorted(bucket[2].items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:top_k]
                for j, (tok, c) in enumerate(ranked):
                    cand_tok[t, j], counts[t, j] = tok, c
                chosen[t] = k
                break
        x = tokens[t]
        for k, (row, tag) in keys.items():  # then offer token t once to every order
            bucket = tables[k].setdefault(row, [tag, 0, {}])
            if bucket[1] == 0 or bucket[0] == tag:
                bucket[0], bucket[1] = tag, bucket[1] + 1
                ref_add_slot(bucket[2], x, top_k)
                inserted[k] += 1
            elif bucket[1] > 1:
                bucket[1] -= 1
                dropped[k] += 1
            else:
                evicted[k] += sum(bucket[2].values())
                tables[k][row] = [tag, 1, {x: 1}]
                inserted[k] += 1
    slot_mass = {k: sum(sum(b[2].values()) for b in tables[k].values()) for k in orders}
    stats = {"inserted_per_order": inserted, "dropped_per_order": dropped, "evicted_mass_per_order": evicted,
             "slot_mass_per_order": slot_mass}
    return cand_tok, np.log1p(counts), chosen, stats


def stream(seed, n, vocab):
    """Random stream with repeats: Zipf-ish tokens plus copied spans, so contexts recur at every order."""
    rng = np.random.default_rng(seed)
    toks = np.minimum(rng.zipf(1.3, n) - 1, vocab - 1)
    for _ in range(n // 200):
        a, b = sorted(rng.integers(0, n, 2))
        span = rng.integers(5, 60)
        if b + span <= n and a < b:
            toks[b:b + span] = toks[a:a + span]
    return toks.astype(np.int64)


# ---------------------------------------------------------------- kernel == reference
CASES = [  # seed, n, vocab, min_order, max_order, table_bits, top_k, min_count
    (0, 4000, 8, 1, 4, 0, 3, 1),  # one bucket per order: every context collides
    (1, 6000, 12, 1, 6, 3, 3, 2),
    (2, 8000, 20, 2, 5, 6, 4, 2),  # top_k 4 (unaligned buckets)
    (3, 20000, 50, 1, 6, 10, 3, 2),
    (4, 12000, 30, 1, 3, 20, 2, 3),
    (5, 5000, 8, 3, 3, 2, 1, 1),  # single order, single slot
    (6, 2000, 1024, 1, 6, 22, 3, 2),  # large vocab, large table
]


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}-bits{c[5]}" for c in CASES])
def test_matches_reference(case):
    seed, n, vocab, lo, hi, bits, top_k, min_count = case
    toks = stream(seed, n, vocab)
    cand_tok, cand_logc, stats = load().ngram_candidates(toks, lo, hi, bits, top_k, min_count, debug=True)
    ref_tok, ref_logc, ref_chosen, ref_stats = reference(toks, lo, hi, bits, top_k, min_count)
    assert cand_tok.dtype == np.int32 and cand_logc.dtype == np.float32 and cand_tok.shape == (n, top_k)
    np.testing.assert_array_equal(cand_tok, ref_tok)
    np.testing.assert_array_equal(cand_logc, ref_logc)
    np.testing.assert_array_equal(stats["order"], ref_chosen)
    for key, value in ref_stats.items():
        assert stats[key] == value, key
    assert stats["with_candidates"] == int((ref_chosen > 0).sum()) > 0
    if bits <= 3:  # tiny tables: the drop and evict branches of the head rule really ran
        assert sum(stats["dropped_per_order"].values()) > 0 and sum(stats["evicted_mass_per_order"].values()) > 0


def test_hand_example():
    """1 2 3 1 2 3 1 2 3: order 2 needs one prior occurrence of its context (min_count=1)."""
    toks = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3])
    cand_tok, cand_logc, stats = load().ngram_candidates(toks, 1, 2, 8, 1, 1)
    # t=0..2: nothing seen; t=3: context [3] never seen before t=3 either
    assert cand_tok[:4, 0].tolist() == [-1, -1, -1, -1]
    # t=4: order-2 context (3, 1) unseen, order 1 context (1) -> 2 once; t=5..8: order 2 contexts
    # (1, 2) -> 3, (2, 3) -> 1, (3, 1) -> 2 once each, then (1, 2) -> 3 twice
    assert cand_tok[4:, 0].tolist() == [2, 3, 1, 2, 3]
    assert stats["order"].tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2]
    np.testing.assert_array_equal(cand_logc[4:, 0], np.log1p(np.float32([1, 1, 1, 1, 2])))


# ---------------------------------------------------------------- legality
@pytest.mark.parametrize("bits", [0, 12])
def test_causal_future_tokens_do_not_change_past_rows(bits):
    ng, rng = load(), np.random.default_rng(7)
    toks = stream(7, 6000, 16)
    base_tok, base_logc, base = ng.ngram_candidates(toks, 1, 5, bits, 3, 1)
    for t in rng.integers(1, len(toks) - 1, 8):
        changed = toks.copy()
        changed[t:] = rng.integers(0, 16, len(toks) - t)  # target t and everything after it
        changed[t] = (toks[t] + 1) % 16  # x_t really differs
        tok, logc, st = ng.ngram_candidates(changed, 1, 5, bits, 3, 1)
        np.testing.assert_array_equal(tok[:t + 1], base_tok[:t + 1])  # row t is the distribution for x_t
        np.testing.assert_array_equal(logc[:t + 1], base_logc[:t + 1])
        np.testing.assert_array_equal(st["order"][:t + 1], base["order"][:t + 1])


def test_each_token_offered_once_per_order():
    toks = stream(11, 15000, 40)
    n = len(toks)
    for bits in (0, 4, 16):
        _, _, st = load().ngram_candidates(toks, 1, 6, bits, 3, 2, debug=True)
        for k in range(1, 7):
            assert st["inserted_per_order"][k] + st["dropped_per_order"][k] == n - k  # positions with context
            # space-saving keeps the slot mass: all inserted counts are in the slots or were evicted
            assert st["slot_mass_per_order"][k] + st["evicted_mass_per_order"][k] == st["inserted_per_order"][k]
        assert sum(st["hits_per_order"].values()) == st["with_candidates"] == int((st["order"] > 0).sum())


def test_same_result_for_any_chunk_and_thread_count(monkeypatch):
    ng = load()
    toks = stream(3, 30000, 64)
    ref = ng.ngram_candidates(toks, 1, 6, 12, 3, 2)
    monkeypatch.setattr(ng, "NG_CHUNK", 777)
    threads = ng.numba.get_num_threads() if ng.numba else 1
    for n_threads in sorted({1, threads}):
        if ng.numba:
            ng.numba.set_num_threads(n_threads)
        try:
            out = ng.ngram_candidates(toks, 1, 6, 12, 3, 2)
        finally:
            if ng.numba:
                ng.numba.set_num_threads(threads)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])
        np.testing.assert_array_equal(out[2]["order"], ref[2]["order"])


def test_edge_cases():
    ng = load()
    for n in (0, 1, 3):
        tok, logc, st = ng.ngram_candidates(np.arange(n), 2, 4, 4, 3, 1)
        assert tok.shape == (n, 3) and (tok == -1).all() and (logc == 0).all() and st["with_candidates"] == 0
    toks = np.array([65535, 0, 65535, 0, 65535, 0], np.uint16)  # extreme token ids survive the packing
    tok, _, _ = ng.ngram_candidates(toks, 1, 1, 4, 2, 1)
    assert tok[:, 0].tolist() == [-1, -1, -1, 0, 65535, 0]
    with pytest.raises(ValueError, match="tokens"):
        ng.ngram_candidates(np.array([70000]))
    for kw, name in ((dict(top_k=0), "top_k"), (dict(table_bits=40), "table_bits"), (dict(min_count=0), "min_count"),
                     (dict(min_order=3, max_order=2), "min_order")):
        with pytest.raises(ValueError, match=name):
            ng.ngram_candidates(toks, **kw)


def test_defaults_are_the_run_defaults():
    import inspect
    import train_gpt as tg
    sig = inspect.signature(tg.ngram_candidates).parameters
    for arg in ("min_order", "max_order", "table_bits", "top_k", "min_count"):
        assert sig[arg].default == getattr(tg.Hyperparameters, f"ngram_{arg}"), arg


# ---------------------------------------------------------------- fallbacks (no JIT, no numba)
FALLBACK = """
import sys, json, numpy as np
if {block}:
    sys.modules["numba"] = None  # import numba -> ImportError
sys.path.insert(0, {tests!r})
from test_ngram_kernel import load, stream
ng = load()
assert (ng.numba is None) == {block}
toks = stream(5, 1500, 10)
tok, logc, st = ng.ngram_candidates(toks, 1, 4, 5, 3, 2)
print(json.dumps([tok.tolist(), logc.tolist(), st["order"].tolist()]))
"""


@pytest.mark.parametrize("mode", ["NUMBA_DISABLE_JIT", "no_numba"])
def test_fallback_matches_jit(mode):
    env = dict(os.environ, NUMBA_DISABLE_JIT="1" if mode == "NUMBA_DISABLE_JIT" else "0")
    code = FALLBACK.format(block=mode == "no_numba", tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    tok, logc, order = json.loads(out.stdout)
    toks = stream(5, 1500, 10)
    ref_tok, ref_logc, ref = load().ngram_candidates(toks, 1, 4, 5, 3, 2)
    np.testing.assert_array_equal(np.array(tok, np.int32), ref_tok)
    np.testing.assert_array_equal(np.array(logc, np.float32), ref_logc)
    np.testing.assert_array_equal(np.array(order), ref["order"])
