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
