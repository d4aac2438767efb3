# ----------------------------------------------------------------------------------------------
# Causal n-gram candidate proposer (eval-time, legal by construction).
#
# Legality invariant: row t of the output reads only tokens[:t]; token t is inserted into the
# tables only after row t has been emitted, exactly once per order. Keys hash the context only
# (never the continuation); gates use only prefix statistics (context count, order).
#
# Convention: "order k" = the k tokens tokens[t-k .. t-1] (all of them, t-1 always included),
# i.e. a (k+1)-gram. An order-k context exists for t >= k.
#
# Bucket of an order-k context (polynomial hash mod the prime M = 2**31 - 1, nearest token first):
#     h_0 = 0;  h_j = (h_{j-1} * NG_MUL + tokens[t-j] + 1) % NG_MOD   for j = 1..k
#     bucket = h_k & (2**table_bits - 1)
# Colliding contexts share a bucket (merged counts; hint quality only, the downstream full
# softmax stays normalized).
#
# Bucket layout, int64 [1 + slots]: word 0 = total count of the (merged) context; words 1.. =
# continuation slots, each packed as count << 16 | token, kept sorted descending (so ranking is
# by count, ties by larger token id; empty slot = 0 at the end).
# Slot rule (space-saving): a token already in a slot gets +1; otherwise it takes the first empty
# slot with count 1; if none is empty it replaces the last (smallest) slot and gets that slot's
# count + 1. The touched slot then bubbles up to restore the order. Sum of slot counts == total.
# ----------------------------------------------------------------------------------------------
import math
import time

import numpy as np

try:
    import numba
    from numba import njit
except ImportError:  # plain-Python fallback with the same function names
    numba = None

    def njit(*args, **kwargs):
        if len(args) == 1 and callable(args[0]):
            return args[0]
        return lambda f: f

NG_MOD = 2147483647  # 2**31 - 1 (prime); h * NG_MUL < 2**62, so no int64 overflow anywhere
NG_MUL = 1220703125  # 5**13, a large multiplier coprime to NG_MOD
NG_TOK_BITS = 16
NG_TOK_MASK = (1 << NG_TOK_BITS) - 1


@njit(cache=True)
def _ng_context_buckets(tokens, t, kmax, mask, out):
    """out[k] = bucket of the order-k context tokens[t-k..t-1], for k = 1..kmax (kmax <= t)."""
    h = 0
    for k in range(1, kmax + 1):
        h = (h * NG_MUL + int(tokens[t - k]) + 1) % NG_MOD
        out[k] = h & mask


@njit(cache=True)
def _ng_emit(bucket, row_tok, row_logc):
    """Write the top len(row_tok) continuations of a bucket (already sorted) as token, log1p(count)."""
    for j in range(min(row_tok.shape[0], bucket.shape[0] - 1)):
        v = bucket[1 + j]
        if v == 0:
            break
        row_tok[j] = v & NG_TOK_MASK
        row_logc[j] = math.log1p(v >> NG_TOK_BITS)


@njit(cache=True)
def _ng_insert(bucket, x):
    """Count token x as one continuation of this bucket's context (space-saving slot rule)."""
    bucket[0] += 1
    n = bucket.shape[0]
    j = n - 1
    for i in range(1, n):
        v = bucket[i]
        if v == 0 or (v & NG_TOK_MASK) == x:
            j = i
            break
    v = bucket[j]
    if v != 0 and (v & NG_TOK_MASK) != x:  # all slots full, x absent: take over the smallest slot
        v = (v >> NG_TOK_BITS) << NG_TOK_BITS
    v = (v | x) + (1 << NG_TOK_BITS)
    while j > 1 and bucket[j - 1] < v:  # bubble up; slots stay sorted descending
        bucket[j] = bucket[j - 1]
        j -= 1
    bucket[j] = v


@njit(cache=True)
def _ng_scan(tokens, min_order, max_order, table, min_count, cand_tok, cand_logc, hits, inserted):
    """One left-to-right pass: emit row t from the tables (prefix only), then insert tokens[t]."""
    mask = table.shape[1] - 1
    buckets = np.zeros(max_order + 1, np.int64)
    for t in range(tokens.shape[0]):
        kmax = min(max_order, t)
        _ng_context_buckets(tokens, t, kmax, mask, buckets)
        for k in range(kmax, min_order - 1, -1):  # backoff: highest order with enough context count
            b = table[k - min_order, buckets[k]]
            if b[0] >= min_count:
                _ng_emit(b, cand_tok[t], cand_logc[t])
                hits[k - min_order] += 1
                break
        x = int(tokens[t])
        for k in range(min_order, kmax + 1):  # only now may token t enter the tables
            _ng_insert(table[k - min_order, buckets[k]], x)
            inserted[k - min_order] += 1


def ngram_candidates(tokens, min_order=2, max_order=6, table_bits=20, top_k=4, min_count=2, slots=None):
    """Causal n-gram candidates for every position of a token stream.

    Row t (cand_tok[t], cand_logc[t]) is a function of tokens[:t] only: at each t the contexts
    tokens[t-k..t-1] (order k = k previous tokens, min_order <= k <= max_order) are looked up from
    the highest order down; the first whose bucket total count >= min_count emits its top_k
    continuations (by count, ties -> larger token id) as (token, log1p(count)); then tokens[t] is
    inserted once into every order's bucket. Empty slots: token -1, logc 0.

    Returns (cand_tok int32 [N, top_k], cand_logc float32 [N, top_k], stats dict).
    Deterministic: every rank calling it on the same stream gets identical arrays.
    """
    t0 = time.perf_counter()
    slots = top_k if slots is None else slots
    assert 1 <= min_order <= max_order and 0 <= table_bits <= 30 and 1 <= top_k <= slots
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    assert tokens.ndim == 1 and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() <= NG_TOK_MASK))
    n_orders = max_order - min_order + 1
    table = np.zeros((n_orders, 1 << table_bits, 1 + slots), np.int64)
    cand_tok = np.full((tokens.size, top_k), -1, np.int32)
    cand_logc = np.zeros((tokens.size, top_k), np.float32)
    hits = np.zeros(n_orders, np.int64)
    inserted = np.zeros(n_orders, np.int64)
    _ng_scan(tokens, min_order, max_order, table, min_count, cand_tok, cand_logc, hits, inserted)
    orders = range(min_order, max_order + 1)
    stats = {
        "positions": int(tokens.size),
        "with_candidates": int(hits.sum()),
        "hits_per_order": {k: int(hits[i]) for i, k in enumerate(orders)},
        "inserted_per_order": {k: int(inserted[i]) for i, k in enumerate(orders)},
        "table_mass_per_order": {k: int(table[i, :, 0].sum()) for i, k in enumerate(orders)},
        "slot_mass_per_order": {k: int((table[i, :, 1:] >> NG_TOK_BITS).sum()) for i, k in enumerate(orders)},
        "table_bytes": int(table.nbytes),
        "seconds": time.perf_counter() - t0,
    }
    return cand_tok, cand_logc, stats
