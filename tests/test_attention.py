"""The attention glue on CPU: FlashAttention 3/2 call conventions through stand-in modules, SDPA pinned to one
backend (with and without K/V expansion, and through torch.compile's tracer), and the start-up measurement's
rules (a kernel that raises or misses the fp32 reference is out)."""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from test_foundation import _naive_attention

CPU = torch.device("cpu")


def stand_in_flash(calls: list, returns_tuple: bool):
    """A FlashAttention module made of SDPA, with FA's contract: (B, T, H, D) bf16 tensors with a contiguous last
    dim, KV heads grouped (query head j reads KV head j // (H // KV)), causal only when asked, bf16 out."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kw):
        calls.append(dict(shapes=[tuple(t.shape) for t in (q, k, v)], dtypes={t.dtype for t in (q, k, v)},
                          causal=causal, kw=kw, strides=[t.stride(-1) for t in (q, k, v)]))
        assert {t.dtype for t in (q, k, v)} == {torch.bfloat16}, "FlashAttention takes bf16 (or fp16) only"
        assert q.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2] and q.size(2) % k.size(2) == 0
        rep = q.size(2) // k.size(2)
        qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
        out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, scale=softmax_scale).transpose(1, 2)
        out = out.to(torch.bfloat16)
        return (out, torch.zeros(q.size(0), q.size(2), q.size(1))) if returns_tuple else out

    return flash_attn_func


@pytest.mark.parametrize("backend,module", [("fa3", "flash_attn_interface"), ("fa2", "flash_attn")])
@pytest.mark.parametrize("returns_tuple", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_call_convention(monkeypatch, backend, module, returns_tuple, dtype):
    calls = []
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(flash_attn_func=stand_in_flash(calls, returns_tuple)))
    torch.manual_seed(0)
    B, T, H, KV, D = 2, 24, 8, 2, 16
    q = torch.randn(B, T, H, D, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, T, KV, D, dtype=dtype) for _ in range(2))
    y = tg.attention_kernel(backend)(q, k, v)
    assert calls == [dict(shapes=[(B, T, H, D), (B, T, KV, D), (B, T, KV, D)], dtypes={torch.bfloat16}, causal=True,
                          kw={}, strides=[1, 1, 1])]
    assert y.shape == (B, T, H, D) and y.dtype == dtype  # back in the caller's dtype, whatever FA returned
    ref = _naive_attention(*(t.detach().bfloat16().float() for t in (q, k, v)))  # causal, FA's head grouping
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == dtype and torch.isfinite(q.grad).all()
    k2, v2 = k.clone(), v.clone()
    k2[:, T // 2:], v2[:, T // 2:] = 5.0, -5.0  # the future must not leak into earlier positions
    y2 = tg.attention_kernel(backend)(q.detach(), k2, v2)
    assert torch.equal(y2[:, :T // 2], y.detach()[:, :T // 2]) and not torch.equal(y2[:, T // 2:], y.detach()[:, T // 2:])


@pytest.mark.parametrize("kernel,expand", [("FLASH_ATTENTION", False), ("MATH", True), ("MATH", False)])
@pytest.mark.parametrize("H,KV", [(4, 2), (4, 4), (8, 2)])
def test_sdpa_pinned_matches_reference(kernel, expand, H, KV):
    torch.manual_seed(H + KV)
    q, k, v = torch.randn(2, 19, H, 8), torch.randn(2, 19, KV, 8), torch.randn(2, 19, KV, 8)
    y = tg.sdpa_pinned(kernel, expand)(q, k, v)
    torch.testing.assert_close(y.double(), _naive_attention(q, k, v), atol=2e-6, rtol=1e-5)


def test_sdpa_pinned_backend_is_really_pinned():
    """Pinned to a backend that CPU lacks, SDPA must fail rather than fall back to another kernel."""
    q, k, v = torch.randn(1, 8, 4, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    with pytest.raises(RuntimeError):
        tg.sdpa_pinned("EFFICIENT_ATTENTION", True)(q, k, v)


def test_sdpa_pinned_traces_fullgraph():
    """torch.compile(fullgraph=True) must trace the sdpa_kernel context (a graph break would be an error on GPU)."""
    import torch._dynamo
    torch._dynamo.reset()
    q, k, v = torch.randn(1, 16, 4, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    fn = tg.sdpa_pinned("MATH", True)
    with torch._dynamo.config.patch(disable=False):
        y = torch.compile(fn, backend="eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(y, fn(q, k, v))


def test_measurement_drops_broken_and_wrong_kernels(monkeypatch):
    """The start-up measurement keeps a kernel only if it runs and matches the fp32 reference: a non-causal
    FlashAttention is out, a missing one is out, SDPA is timed."""
    calls = []
    wrong = stand_in_flash(calls, False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        types.SimpleNamespace(flash_attn_func=lambda q, k, v, causal=False: wrong(q, k, v, causal=False)))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    shape = (2, 64, 4, 2, 16)
    table = tg.measure_attention(["fa3", "fa2", "sdpa"], shape, CPU)
    assert table["fa3"].startswith("mismatch(") and float(table["fa3"][9:-1]) > tg.ATTN_TOLERANCE
    assert table["fa2"] == "failed(ModuleNotFoundError)"
    assert isinstance(table["sdpa"], float) and table["sdpa"] > 0  # timed, so within ATTN_TOLERANCE of fp32


def test_resolve_attention_on_cpu():
    shape = (2, 64, 4, 2, 16)
    assert tg.attention_candidates(CPU) == ["sdpa"]
    notes = []
    assert tg.resolve_attention("auto", CPU, shape, notes) == "sdpa" and notes == []  # CPU: no timing
    for forced in ("fa3", "fa2", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"):
        with pytest.raises(ValueError, match=f"ATTN_BACKEND={forced} is not available here"):
            tg.resolve_attention(forced, CPU, shape)
    assert tg.attention_shape(tg.Hyperparameters()) == (48, 2048, 8, 4, 64)
    assert math.prod(tg.attention_shape(tg.Hyperparameters())[:2]) * 8 == tg.Hyperparameters().train_batch_tokens


# ----------------------------------------------------------------------------- document masking (varlen)


def _starts(B, T, seed=0):
    """(B, T) document starts: a few per row, never at position 0 (a row always begins a segment anyway)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, T, generator=g) < 0.15
    s[:, 0] = False
    return s


def _masked_reference(q, k, v, starts):
    """Each row split at its starts; each piece attends causally within itself (fp64, FA's head grouping)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.size(0)):
        cuts = [0] + starts[b].nonzero().flatten().tolist() + [q.size(1)]
        for lo, hi in zip(cuts, cuts[1:]):
            if hi > lo:
                out[b, lo:hi] = _naive_attention(q[b:b + 1, lo:hi], k[b:b + 1, lo:hi], v[b:b + 1, lo:hi])[0]
    return out


def stand_in_varlen(calls: list, returns_tuple: bool, honours_cu: bool = True):
    """FlashAttention's varlen entry point made of SDPA: (total, H, D) bf16 tensors, int32 cu_seqlens (n + 1) whose
    empty segments are skipped, max_seqlen >= every segment; each segment causal on its own."""

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **kw):
        calls.append(dict(shapes=[tuple(t.shape) for t in (q, k, v)], dtypes={t.dtype for t in (q, k, v)},
                          cu=cu_seqlens_q.clone(), same_cu=cu_seqlens_q is cu_seqlens_k,
                          max=(max_seqlen_q, max_seqlen_k), causal=causal, kw=kw))
        assert {t.dtype for t in (q, k, v)} == {torch.bfloat16} and cu_seqlens_q.dtype == torch.int32
        assert q.dim() == 3 and q.size(0) == k.size(0) == int(cu_seqlens_q[-1])
        cuts = cu_seqlens_q.tolist() if honours_cu else [0, q.size(0)]
        assert max(b - a for a, b in zip(cuts, cuts[1:])) <= max_seqlen_q or not honours_cu
        rep, out = q.size(1) // k.size(1), torch.zeros(q.shape, dtype=torch.float32)
        for lo, hi in zip(cuts, cuts[1:]):
            if hi > lo:
                qf, kf, vf = (t[lo:hi].float().transpose(0, 1) for t in (q, k.repeat_interleave(rep, 1),
                                                                       v.repeat_interleave(rep, 1)))
                out[lo:hi] = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal).transpose(0, 1)
        out = out.to(torch.bfloat16)
        return (out, torch.zeros(q.size(1), q.size(0))) if returns_tuple else out

    return flash_attn_varlen_func


def test_doc_layout_sdpa_mask_is_block_diagonal_causal():
    B, T = 3, 40
    starts = _starts(B, T)
    mask = tg.doc_layout("sdpa", starts)
    assert mask.shape == (B, 1, T, T) and mask.dtype == torch.bool
    for b in range(B):
        seg = starts[b].cumsum(0)
        for i in range(T):
            want = [j <= i and seg[j] == seg[i] for j in range(T)]
            assert mask[b, 0, i].tolist() == want


def test_doc_layout_varlen_is_static_and_exact():
    """cu_seqlens: every row start and document start of the flattened rows, then total repeated to a length fixed
    by (B, T) alone; max_seqlen = T."""
    B, T = 3, 40
    for seed, density in ((0, 0.15), (1, 0.0), (2, 0.5)):
        starts = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < density
        cu, max_len = tg.doc_layout("fa3", starts)
        real = sorted({b * T for b in range(B)} | {b * T + t for b, t in starts.nonzero().tolist()})
        assert cu.dtype == torch.int32 and max_len == T and len(cu) == min(B * T, B + B * T // 64 + 256) + 1
        assert cu.tolist() == real + [B * T] * (len(cu) - len(real))


def test_doc_layout_varlen_overflow_drops_late_starts_never_rows():
    """More document starts than the static length holds: the latest are dropped, every row start stays."""
    B, T = 2, 512
    starts = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) < 0.5
    cu, _ = tg.doc_layout("fa2", starts)
    n = B + B * T // 64 + 256
    assert len(cu) == n + 1 and cu[-1] == B * T and torch.all(cu[1:] >= cu[:-1]) and T in cu.tolist()
    real = sorted({0, T} | {b * T + t for b, t in starts.nonzero().tolist()})
    assert len(real) > n and set(cu[:-1].tolist()) <= set(real)
    assert cu[:-1].tolist() == sorted([0, T] + [p for p in real if p not in (0, T)][:n - 2])


@pytest.mark.parametrize("backend,module", [("fa3", "flash_attn_interface"), ("fa2", "flash_attn")])
@pytest.mark.parametrize("returns_tuple", [False, True])
def test_flash_varlen_call_convention(monkeypatch, backend, module, returns_tuple):
    calls = []
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(
        flash_attn_func=None, flash_attn_varlen_func=stand_in_varlen(calls, returns_tuple)))
    torch.manual_seed(1)
    B, T, H, KV, D = 2, 24, 4, 2, 8
    q = torch.randn(B, T, H, D, requires_grad=True)
    k, v = (torch.randn(B, T, KV, D) for _ in range(2))
    starts = _starts(B, T, 3)
    docs = tg.doc_layout(backend, starts)
    y = tg.attention_kernel(backend)(q, k, v, docs)
    (call,) = calls
    assert call["shapes"] == [(B * T, H, D), (B * T, KV, D), (B * T, KV, D)] and call["dtypes"] == {torch.bfloat16}
    assert call["causal"] and call["same_cu"] and call["max"] == (T, T) and call["kw"] == {}
    assert torch.equal(call["cu"], docs[0])
    assert y.shape == (B, T, H, D) and y.dtype == torch.float32
    ref = _masked_reference(*(t.detach().bfloat16().float() for t in (q, k, v)), starts)
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=2e-2)
    assert (ref - _naive_attention(q.detach(), k, v)).abs().max() > 0.1  # the mask matters at these starts
    y.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_sdpa_with_doc_layout_matches_reference():
    torch.manual_seed(2)
    B, T, H, KV, D = 2, 30, 4, 2, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, KV, D), torch.randn(B, T, KV, D)
    starts = _starts(B, T, 4)
    ref = _masked_reference(q, k, v, starts)
    for fn in (tg.attention_kernel("sdpa"), tg.sdpa_pinned("MATH", True)):
        torch.testing.assert_close(fn(q, k, v, tg.doc_layout("sdpa", starts)).double(), ref, atol=2e-6, rtol=1e-5)


def test_measurement_with_doc_mask_judges_the_masked_kernels(monkeypatch):
    """With doc_mask the measurement runs each kernel in its masked form: a varlen kernel that ignores cu_seqlens
    is a mismatch, a correct one and masked SDPA are timed."""
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(
        flash_attn_func=None, flash_attn_varlen_func=stand_in_varlen(calls, False, honours_cu=False)))
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_func=None, flash_attn_varlen_func=stand_in_varlen(calls, True)))
    table = tg.measure_attention(["fa3", "fa2", "sdpa"], (2, 128, 4, 2, 16), CPU, doc_mask=True)
    assert table["fa3"].startswith("mismatch(")
    assert isinstance(table["fa2"], float) and isinstance(table["sdpa"], float)
    assert calls and all(c["max"] == (128, 128) for c in calls)


def _cuda_module(module: str, hopper: bool) -> bool:
    if not torch.cuda.is_available() or (hopper and torch.cuda.get_device_capability()[0] != 9):
        return False
    try:
        return getattr(__import__(module), "flash_attn_varlen_func", None) is not None
    except Exception:
        return False


@pytest.mark.parametrize("backend,module,hopper", [("fa3", "flash_attn_interface", True), ("fa2", "flash_attn", False)])
def test_flash_varlen_matches_masked_sdpa_on_gpu(backend, module, hopper):
    if not _cuda_module(module, hopper):
        pytest.skip(f"needs CUDA{' sm90' if hopper else ''} + {module}.flash_attn_varlen_func")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, T, H, KV, D = 2, 256, 8, 4, 64
    q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, KV, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    starts = _starts(B, T).to(dev)
    y = tg.attention_kernel(backend)(q, k, v, tg.doc_layout(backend, starts))
    ref = tg.attention_kernel("sdpa")(q.float(), k.float(), v.float(), tg.doc_layout("sdpa", starts))
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
