"""Adaptive eval components against their stated rules: the TTT freeze (frozen blocks are out of the update and
out of the clip norm), the online bias's parallel form against its sequential rule, and its committed carry
across chunks and ranks."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import train_gpt as tg
from conftest import perturbed_model, spawn_ranks, tiny

CPU = tg.Runtime.local()
BOS = tg.BOS_ID


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ----------------------------------------------------------------------------- TTT freeze


def _scored_chunk(stream: torch.Tensor, index=0, n_chunks=3) -> tg.ScoredChunk:
    n = stream.numel() - 1
    return tg.ScoredChunk(index, n_chunks, 0, n, stream[1:].long(), stream, torch.zeros(1, dtype=torch.float64))


def _reference_ttt(h, model: tg.GPT, stream: torch.Tensor) -> tuple[list[float], dict]:
    """What TTT must do, written out: gradients of the trained parameters only (frozen blocks' control tensors
    and bank slots s with s % L < k excluded), clipped by the norm over exactly those, times the slot LR
    multipliers, then plain SGD with momentum, and the Polyak average of all weights after each step.
    Updates `model` in place; returns the pre-clip norms and the average."""
    k, L, T = h.ttt_freeze_blocks, model.L, h.eval_seq_len
    frozen = tuple(f"blocks.{i}." for i in range(k))
    params = {n: p for n, p in model.named_parameters() if not n.startswith(frozen)}
    keep = {n: (torch.arange(params[n].size(0)) % L >= k).float().view(-1, 1, 1) for n in tg.BANK_NAMES}
    mult = {n: torch.ones(params[n].size(0)).view(-1, 1, 1) for n in tg.BANK_NAMES}
    mult["qo_bank"][L:] = h.ttt_proj_lr_mult  # output projections
    mult["mlp_down_bank"][:] = h.ttt_proj_lr_mult
    mult["mlp_up_bank"][:] = h.ttt_fc_lr_mult
    x, y = stream[:-1].long().view(-1, T), stream[1:].long().view(-1, T)
    buf, norms, d = {}, [], h.ttt_polyak_decay
    avg = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(1, h.ttt_epochs + 1):
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in range(0, x.size(0), h.ttt_batch_seqs):
            logits = model(x[i:i + h.ttt_batch_seqs])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i:i + h.ttt_batch_seqs].reshape(-1),
                                   reduction="sum") / y.numel()
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    grads[n] += g
        for n in tg.BANK_NAMES:
            grads[n] *= keep[n]
        norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))
        norms.append(norm)
        coef = min(1.0, h.ttt_grad_clip / (norm + 1e-6))
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n] * coef * mult.get(n, 1.0)
                buf[n] = g if n not in buf else h.ttt_momentum * buf[n] + g
                p.sub_(h.ttt_lr * buf[n])
            a = (1 - d) / (1 - d ** t) if h.ttt_polyak_bias_correct else 1 - d  # bias-corrected average
            for n, p in params.items():
                avg[n] = (1 - a) * avg[n] + a * p
    return norms, avg


@pytest.mark.parametrize("k, polyak", [(1, 0.0), (2, 0.0), (1, 0.9)])
def test_ttt_freeze_leaves_frozen_blocks_and_clips_without_them(k, polyak):
    """TTT_FREEZE_BLOCKS=k: blocks < k (control tensors and bank slots) bit-identical, in the trained weights and
    in the Polyak scoring copy; the rest trained as if the frozen blocks were not in the clip norm at all."""
    h = tiny(num_layers=3, ttt_freeze_blocks=k, ttt_epochs=2, ttt_batch_seqs=2, ttt_lr=0.5, ttt_momentum=0.9,
             ttt_grad_clip=0.05, ttt_polyak_decay=polyak)
    stream = torch.from_numpy(np.random.default_rng(k).integers(0, h.vocab_size, 4 * h.eval_seq_len + 1)).int()
    model = perturbed_model(h)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    norms, ref_avg = _reference_ttt(h, ref, stream)
    assert min(norms) > 4 * h.ttt_grad_clip  # the clip is active, so the norm it uses matters
    ttt = tg.TestTimeTrainer(h, CPU, model, model, lambda m: m)
    ttt.update(_scored_chunk(stream))
    got, want = dict(model.named_parameters()), {n: p.detach() for n, p in ref.named_parameters()}
    _check_frozen_and_trained(got, want, init, k, model.L)
    if polyak > 0:
        assert ttt.current is ttt.avg
        _check_frozen_and_trained(dict(ttt.avg.named_parameters()), ref_avg, init, k, model.L)


def _check_frozen_and_trained(got: dict, want: dict, init: dict, k: int, L: int) -> None:
    for n, p in got.items():
        if n.startswith(tuple(f"blocks.{i}." for i in range(k))):  # frozen control tensors: bit-identical
            assert torch.equal(p, init[n]), n
            continue
        delta, ref_delta = p.detach() - init[n], want[n] - init[n]
        if n in tg.BANK_NAMES:  # frozen slots bit-identical, the others moved
            frozen = torch.arange(p.size(0)) % L < k
            assert torch.equal(p[frozen], init[n][frozen]), n
            assert (delta[~frozen].abs().amax(dim=(1, 2)) > 0).all(), n
        scale = ref_delta.norm().item()
        ulps = 4 * torch.finfo(torch.float32).eps * init[n].norm().item()  # float32 rounding of p - lr * buf
        assert scale > 0, n
        assert (delta - ref_delta).norm().item() <= 1e-4 * scale + ulps, (n, (delta - ref_delta).norm().item(), scale)


# ----------------------------------------------------------------------------- online bias: parallel = sequential


LR = 0.3


def sequential(x: np.ndarray, p: np.ndarray, r0: np.ndarray) -> np.ndarray:
    """The docstring's rule, one position at a time, from r0 at the first position (0 there if it is a BOS):
    r_t = 0 if x_t is BOS, else r_{t-1} + lr (onehot(x_t) - p_{t-1}). Returns r for every position."""
    V = p.shape[1]
    r, out = r0.copy(), []
    for t in range(len(x)):
        if x[t] == BOS:
            r = np.zeros(V)
        elif t > 0:
            r = r + LR * (np.eye(V)[x[t]] - p[t - 1])
        out.append(r)
    return np.array(out).reshape(len(x), V)


def random_stream(seed: int, n: int, V: int, bos_rate: float):
    """n positions: inputs x[0:n], targets x[1:n+1], and float32 neural distributions p (n, V)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, n + 1)
    x[rng.random(n + 1) < bos_rate] = BOS
    p = torch.softmax(torch.from_numpy(rng.normal(size=(n, V)) * 2), -1).float().numpy()
    return x, p


def split(lo: int, hi: int, cuts) -> list[tuple[int, int]]:
    """[lo, hi) cut at the given offsets (any order, duplicates and out-of-range ignored): non-empty parts."""
    edges = sorted({lo, hi} | {lo + c for c in cuts if 0 < c < hi - lo})
    return list(zip(edges[:-1], edges[1:]))


def bias_rows(bias: tg.OnlineBias, x: np.ndarray, p: np.ndarray, batches) -> np.ndarray:
    """Feed consecutive batches of positions to biases(), as run_pass does; their rows, concatenated."""
    return np.concatenate([bias.biases(torch.from_numpy(x[a:b]), torch.from_numpy(p[a:b])).double().numpy()
                           for a, b in batches])


def _chunk(targets: np.ndarray) -> tg.ScoredChunk:
    """update() reads only the targets of the rank's positions."""
    t = torch.from_numpy(targets)
    return tg.ScoredChunk(0, 1, 0, len(t), t, t, torch.zeros(1, dtype=torch.float64))


H_BIAS = tiny(bias_lr=LR)
V = 6  # > BOS_ID; small so that a stream revisits every token


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 60), bos_rate=st.sampled_from([0.0, 0.1, 0.3]),
       chunk_cuts=st.lists(st.integers(1, 59), max_size=6), batch_cuts=st.lists(st.integers(1, 59), max_size=8))
def test_one_rank_bias_and_carry_equal_the_sequential_rule(seed, n, bos_rate, chunk_cuts, batch_cuts):
    """World 1: over any chunking and any batching, the rows are the sequential rule over the whole stream, and
    after each chunk the committed carry is the rule's r at the next chunk's first position."""
    x, p = random_stream(seed, n, V, bos_rate)
    want = sequential(x, np.concatenate([p, np.zeros((1, V))]), np.zeros(V))  # r at positions 0..n
    bias = tg.OnlineBias(H_BIAS, V, "cpu")
    for lo, hi in split(0, n, chunk_cuts):
        bias.begin_chunk(None)
        rows = bias_rows(bias, x, p, split(lo, hi, [c - lo for c in batch_cuts]))
        np.testing.assert_allclose(rows, want[lo:hi], rtol=1e-6, atol=1e-6)  # rows are returned as float32
        bias.update(_chunk(x[lo + 1:hi + 1]))
        np.testing.assert_allclose(bias.carry.numpy(), want[hi], rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 60), bos_rate=st.sampled_from([0.0, 0.1, 0.3]),
       a=st.integers(0, 58), width=st.integers(1, 60), batch_cuts=st.lists(st.integers(1, 59), max_size=8))
def test_a_later_rank_starts_from_the_carry_or_zero_after_a_bos(seed, n, bos_rate, a, width, batch_cuts):
    """A rank scoring positions [a, b) of a chunk that starts at 0 knows no in-chunk p before a: it starts from the
    committed carry, or from 0 if an input in (0, a] is a BOS, and follows the rule from there."""
    x, p = random_stream(seed, n, V, bos_rate)
    a = min(a, n - 1)
    b = min(a + width, n)
    carry = np.random.default_rng(seed + 1).normal(size=V)  # the committed carry at the chunk's first position
    bias = tg.OnlineBias(H_BIAS, V, "cpu")
    bias.carry = torch.from_numpy(carry)
    bias.begin_chunk(torch.from_numpy(x[1:a + 1]) if a > 0 else None)
    rows = bias_rows(bias, x, p, split(a, b, [c - a for c in batch_cuts]))
    r0 = np.zeros(V) if (x[1:a + 1] == BOS).any() else carry
    np.testing.assert_allclose(rows, sequential(x[a:b], p[a:b], r0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the committed carry on 2 ranks


CARRY_H = dict(eval_stride=16, eval_batch_seqs=3, ngram_enabled=False, hedge_enabled=False, ttt_enabled=False)
CHUNK_TOKENS = 80


def carry_pass(h, val, luts, rt):
    """The real pass with only the online bias: every scored position's input and neural distribution, and the
    committed carry seen when each chunk starts (recorded at its first batch), plus the final carry."""
    bias = tg.OnlineBias(h, h.vocab_size, rt.device)
    seen = dict(pos=[], p=[], carry={})

    def recorder(rec):
        seen["carry"].setdefault(rec["chunk"], bias.carry.clone())
        seen["pos"].append(rec["pos"].clone())
        seen["p"].append(rec["log_probs"]["neural"].exp().double())  # exactly what biases() was given

    tg.run_pass(tg.EvalContext(h, rt, val, luts), tg.FixedScorer(perturbed_model(h).eval()), h.eval_stride,
                tg.Experts(h, bias, None, None), CHUNK_TOKENS, recorder)
    return dict(pos=torch.cat(seen["pos"]), p=torch.cat(seen["p"]), carry=seen["carry"], final=bias.carry.clone())


def _carry_worker(rank, rt, h, val, luts, out):
    torch.save(carry_pass(h, val, luts, rt), f"{out}.{rank}")


def carry_stream(h, n_targets: int) -> tuple[torch.Tensor, list]:
    """Random tokens with BOS placed where the carry composition has its cases: a chunk's first input, a later
    rank's first input (= the earlier rank's last target), inside each rank's span, and a chunk with none."""
    rng = np.random.default_rng(0)
    val = rng.integers(2, h.vocab_size, n_targets + 1)
    spans = tg.plan_chunks(tg.EvalContext(h, tg.Runtime(1, 1, 2, CPU.device), torch.zeros(n_targets + 1), ()),
                           h.eval_stride, CHUNK_TOKENS)
    first1 = [int(s.mine[0, 1]) for s in spans]  # rank 1's first position in each chunk
    val[int(spans[1].windows[0, 1])] = BOS
    val[first1[2]] = BOS
    val[(int(spans[3].windows[0, 1]) + first1[3]) // 2] = BOS
    val[first1[4] + 5] = BOS
    return torch.from_numpy(val).int(), spans


def _check_carries(runs: list[dict], val: torch.Tensor, spans, V: int) -> None:
    """Every rank's committed carry at each chunk start, and at the end, against the sequential rule run over
    the neural distributions that all ranks together scored."""
    n = val.numel() - 1
    pos = torch.cat([run["pos"] for run in runs])
    order = torch.argsort(pos)
    assert torch.equal(pos[order], torch.arange(n))  # every position once
    p = torch.cat((torch.cat([run["p"] for run in runs])[order], torch.zeros(1, V, dtype=torch.float64))).numpy()
    x = val.numpy()
    r = torch.zeros(V, dtype=torch.float64)  # the sequential rule, position by position (tensors: V = 1024)
    want = [r]
    eye = torch.eye(V, dtype=torch.float64)
    for t in range(1, n + 1):
        r = torch.zeros(V, dtype=torch.float64) if x[t] == BOS else r + LR * (eye[x[t]] - torch.from_numpy(p[t - 1]))
        want.append(r)
    for run in runs:
        for c, carry in run["carry"].items():
            torch.testing.assert_close(carry, want[int(spans[c].windows[0, 1])], rtol=0, atol=1e-9)
        torch.testing.assert_close(run["final"], want[n], rtol=0, atol=1e-9)
    assert set().union(*(run["carry"] for run in runs)) == set(range(len(spans)))


def test_committed_carry_is_the_sequential_rule_on_two_ranks_as_on_one(dataset, tmp_path):
    h = tiny(**dataset, bias_lr=LR, **CARRY_H)
    luts = tg.load_byte_counter(h)
    val, spans = carry_stream(h, 6 * CHUNK_TOKENS + 16)
    assert len(spans[-1].windows) == 1  # the last chunk: rank 0 scores nothing, its carry must pass through
    one = carry_pass(h, val, luts, CPU)
    _check_carries([one], val, spans, h.vocab_size)
    out = str(tmp_path / "carry")
    spawn_ranks(2, _carry_worker, h, val, luts, out)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])  # all-gathered: the same carry on both ranks
    assert 6 not in ranks[0]["carry"] and 6 in ranks[1]["carry"]  # rank 0 has no windows in the last chunk
    _check_carries(ranks, val, spans, h.vocab_size)
    torch.testing.assert_close(ranks[0]["final"], one["final"], rtol=0, atol=1e-6)
