"""The fused Triton training kernels (MLP up-GEMM + LeakyReLU(0.5)^2, its backward GEMM with the activation's
derivative, softcapped cross-entropy forward and backward) against the eager math, on CPU under TRITON_INTERPRET=1:
odd sizes that need masking, fp32 at a tight tolerance and bf16 at a looser one; their registration (fake
implementations, autograd, autocast, a fullgraph trace); the model's call sites; the start-up choice's rules; and
a build of the kernels for sm_90 by Triton's GPU compiler (no GPU needed), which the interpreter does not check.

conftest turns the interpreter on before anything imports triton (triton reads it as it defines each kernel). CI
sets CI=true: there a missing triton or interpreter fails this file instead of skipping it (.ci/run installs
triton==3.9.0)."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

try:
    import triton  # noqa: F401
    WHY = "" if os.environ.get("TRITON_INTERPRET") == "1" else "TRITON_INTERPRET is not 1"
except ImportError:
    WHY = "triton is not installed (pip install triton==3.9.0)"
if WHY and os.environ.get("CI"):
    raise RuntimeError(f"CI=true but {WHY}: tests/test_kernels.py must run")
if WHY:
    pytest.skip(f"{WHY} (under CI=true this is a failure)", allow_module_level=True)

from torch._dynamo.backends.registry import lookup_backend  # noqa: E402

import train_gpt as tg  # noqa: E402
from conftest import ROOT, perturbed_model, tiny  # noqa: E402

DEV = torch.device("cpu")
# max |fused - float64 eager| / max |float64 eager|. bf16: the interpreter truncates fp32 -> bf16 where a GPU rounds
# to nearest, so its error here is about twice eager bf16's (measured: fused 0.5-1.1 %, eager 0.2-0.6 %).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def ops():
    tg.load_fused()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def fwd_bwd(fn, args, dy=None):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, None if dy is None else dy.to(out.dtype))
    return [out.detach(), *grads]


def check(fused, args, eager, dy=None):
    """Fused output and gradients within TOL of the eager math run in float64 on the same (rounded) inputs."""
    got = fwd_bwd(fused, args, dy)
    ref = fwd_bwd(eager, [a.double() for a in args], dy)
    for name, g, r in zip(("out", *(f"grad{i}" for i in range(len(args)))), got, ref):
        assert g.dtype == args[0].dtype or name == "out" and g.dtype == torch.float32, (name, g.dtype)
        assert g.shape == r.shape and torch.isfinite(g).all(), name
        assert rel_err(g, r) <= TOL[args[0].dtype], (name, rel_err(g, r))
    return got


# Shapes: (lead dims of x, dim, hidden). The CPU tiles are 16 wide: every size below leaves a partial tile in M,
# N or K (K = 24, 40: a partial last K step), and (3, 5) checks the reshape of a 3-D input.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,d,hid", [((37,), 24, 50), ((3, 5), 40, 16), ((1,), 16, 33), ((64,), 32, 96)])
def test_fused_mlp_matches_eager(dtype, lead, d, hid):
    g = torch.Generator().manual_seed(sum(lead) + d + hid)
    x = torch.randn(*lead, d, generator=g).to(DEV, dtype)
    w_up = (torch.randn(hid, d, generator=g) * d ** -0.5).to(DEV, dtype)
    w_down = (torch.randn(d, hid, generator=g) * hid ** -0.5).to(DEV, dtype)
    dy = torch.randn(*lead, d, generator=g).to(DEV, dtype)  # the same rounded values for the float64 reference
    got = check(lambda *a: tg.mlp_forward(*a, fused=True), (x, w_up, w_down), tg.mlp_forward, dy)
    pre = x.double() @ w_up.double().t()
    assert (pre < 0).any() and (pre > 0).any()  # both branches of the activation and of its derivative ran
    assert got[0].shape == (*lead, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,scale", [((13, 77), 20.0), ((2, 3, 32), 1.0), ((5, 100), 200.0), ((1, 7), 0.1)])
def test_fused_softcapped_ce_matches_eager(dtype, shape, scale):
    """Vocabularies of 77 and 100 span three and four 32-wide blocks (partial last block), 32 exactly one, 7 less
    than one; scale 200 saturates the softcap (z near +-cap), 0.1 keeps it linear. Targets include 0 and V - 1."""
    g = torch.Generator().manual_seed(shape[-1])
    logits = (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    targets.view(-1)[0], targets.view(-1)[-1] = 0, shape[-1] - 1
    targets = targets.to(DEV)
    got = check(lambda z: tg.softcapped_ce(z, targets, 30.0, fused=True), (logits,),
                lambda z: tg.softcapped_ce(z, targets, 30.0))
    assert got[0].dim() == 0 and got[0].dtype == torch.float32


def test_fused_ce_per_row_loss_and_lse():
    """The op's per-row outputs: loss = LSE - z_target, and the LSE the backward reads, of the capped logits + cap
    (the kernels' z = 2 cap sigmoid(2x / cap) is softcap(x) + cap)."""
    logits = torch.randn(9, 45, dtype=torch.float64).mul(40).float().to(DEV)
    targets = torch.arange(9, device=DEV) * 5
    loss, lse = torch.ops.pgolf.softcapped_ce(logits, targets, 30.0)
    z = 30.0 * torch.tanh(logits.double() / 30.0)
    torch.testing.assert_close(lse.double() - 30.0, torch.logsumexp(z, -1), rtol=0, atol=2e-5)
    torch.testing.assert_close(loss.double(), F.cross_entropy(z, targets, reduction="none"), rtol=0, atol=2e-5)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the real kernels."""
    g = torch.Generator().manual_seed(0)
    x, w_up, w_down = (torch.randn(*s, generator=g).to(DEV) for s in ((19, 24), (40, 24), (24, 40)))
    logits, targets = torch.randn(7, 45, generator=g).to(DEV), torch.randint(0, 45, (7,), generator=g).to(DEV)
    pre = x @ w_up.t()
    for op, args in ((torch.ops.pgolf.mlp, (x, w_up, w_down)), (torch.ops.pgolf.mlp_dpre, (x, w_down, pre)),
                     (torch.ops.pgolf.softcapped_ce, (logits, targets, 30.0)),
                     (torch.ops.pgolf.softcapped_ce_grad, (logits, targets, logits.exp().sum(-1).log(),
                                                           torch.rand(7, generator=g).to(DEV), 30.0))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fullgraph_compile_traces_the_fused_ops(monkeypatch):
    """torch.compile(fullgraph=True) traces both entry points through the fake implementations and the registered
    autograd (aot_eager: no C++/GPU compiler needed) and computes what the uncompiled ops compute."""
    monkeypatch.setattr(torch._dynamo.config, "disable", False)  # conftest disables compile for the other tests
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x, w_up, w_down = (torch.randn(*s, generator=g).to(DEV) for s in ((2, 9, 24), (40, 24), (24, 40)))
    logits, targets = torch.randn(2, 9, 45, generator=g).to(DEV), torch.randint(0, 45, (2, 9), generator=g).to(DEV)

    def loss(x, w_up, w_down, logits):
        return tg.mlp_forward(x, w_up, w_down, True).square().mean() + tg.softcapped_ce(logits, targets, 30.0, True)

    graphs, aot_eager = [], lookup_backend("aot_eager")

    def backend(gm, example_inputs):  # aot_eager, keeping the traced graph
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(loss, fullgraph=True, dynamic=False, backend=backend)
    args = (x, w_up, w_down, logits)
    for a, b in zip(fwd_bwd(compiled, args), fwd_bwd(loss, args)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):  # the MLP op's autocast rule survives the trace
        for a, b in zip(fwd_bwd(compiled, args), fwd_bwd(loss, args)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert len(graphs) == 2 and {"pgolf.mlp", "pgolf.softcapped_ce"} <= {str(n.target) for n in graphs[0].graph.nodes}
    torch._dynamo.reset()


def test_fused_mlp_follows_autocast():
    """Under autocast the fused MLP runs in bf16 like F.linear does; gradients reach the fp32 weights in fp32."""
    g = torch.Generator().manual_seed(2)
    x, w_up, w_down = (torch.randn(*s, generator=g).to(DEV).requires_grad_() for s in ((21, 24), (40, 24), (24, 40)))
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        fused, eager = tg.mlp_forward(x, w_up, w_down, True), tg.mlp_forward(x, w_up, w_down)
    assert fused.dtype == eager.dtype == torch.bfloat16
    assert rel_err(fused, eager.double()) <= 2e-2
    fused.float().sum().backward()
    assert w_up.grad.dtype == w_down.grad.dtype == x.grad.dtype == torch.float32


def test_model_with_fused_kernels_matches_eager():
    """The model's two call sites: FUSED_KERNELS=1 gives the eager loss and gradients (fp32) from the same
    weights; while GPTQ's tap is set the MLP runs eagerly, so the tapped activations are the eager ones."""
    h = tiny(vocab_size=160, fused_kernels=tg.resolve_fused("1", torch.device("cpu")))  # small V: the interpreter
    assert h.fused_kernels == "1"
    eager, fused = perturbed_model(replace(h, fused_kernels="0")), tg.build_model(h)
    fused.load_state_dict(eager.state_dict())
    assert (fused.fused_mlp, fused.fused_ce, eager.fused_mlp, eager.fused_ce) == (True, True, False, False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, h.vocab_size, (2, 24), generator=g)
    tgt = torch.randint(0, h.vocab_size, (2, 24), generator=g)
    losses = [m(ids, tgt) for m in (eager, fused)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    names = [n for n, _ in eager.named_parameters()]
    grads = [torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
             for loss, m in zip(losses, (eager, fused))]
    for name, ge, gf in zip(names, *grads):
        assert (ge is None) == (gf is None), name
        if ge is not None:
            torch.testing.assert_close(gf, ge, rtol=1e-4, atol=1e-5 * ge.abs().max().item(), msg=name)
    taps = {}
    for m in (eager, fused):
        m.tap = lambda site, i, x, m=m: taps.setdefault(id(m), []).append((site, i, x.detach().clone()))
        with torch.no_grad():
            m(ids, tgt)
        m.tap = None
    (te, tf) = taps.values()
    assert [s[:2] for s in tf] == [s[:2] for s in te] and any(s == "mlp_act" for s, _, _ in tf)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(te, tf))


def test_resolve_rules(monkeypatch):
    cpu = torch.device("cpu")
    assert tg.resolve_fused("auto", cpu, (64, 16, 32, 50)) == "0"  # auto: off without CUDA, nothing measured
    assert tg.resolve_fused("0", cpu) == "0"
    assert tg.resolve_startup(tiny(), tg.Runtime.local()).fused_kernels == "0"
    assert tg.resolve_fused("mlp", cpu) == "mlp" and tg.resolve_fused("ce", cpu) == "ce"  # interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"FUSED_KERNELS=1 needs CUDA"):
        tg.resolve_fused("1", cpu)
    monkeypatch.setattr(tg, "_FUSED", {})  # as if never loaded, on a machine without triton
    monkeypatch.setitem(__import__("sys").modules, "triton", None)
    with pytest.raises(ValueError, match=r"FUSED_KERNELS=ce needs triton"):
        tg.resolve_fused("ce", cpu)
    assert tg.resolve_fused("auto", cpu) == "0"
    with pytest.raises(ValueError, match=r"FUSED_KERNELS=2 must be one of"):
        tiny(fused_kernels="2")


def test_measure_fused_times_matching_kernels_and_rejects_a_mismatch(monkeypatch):
    shape = (40, 16, 24, 50)  # (tokens, dim, hidden, vocab)
    table = tg.measure_fused(("mlp", "ce"), shape, DEV, reps=1)
    assert all(isinstance(table[n][k], float) and table[n][k] > 0 for n in ("mlp", "ce") for k in ("eager", "fused"))
    monkeypatch.setattr(tg, "FUSED_TOLERANCE", 0.0)  # bf16 always misses the fp32 reference by something
    table = tg.measure_fused(("mlp",), shape, DEV, reps=1)
    assert isinstance(table["mlp"]["eager"], float) and table["mlp"]["fused"].startswith("mismatch(")


AOT = r"""
import triton, train_gpt as tg
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
tg.load_fused()
hopper, c = GPUTarget("cuda", 90, 32), "constexpr"
names = ("a", "b", "c", "d", "M", "N", "K", "sam", "sak", "sbk", "sbn")
for dt in ("bf16", "fp32"):  # as a launch specializes them: unit strides fixed, the rest divisible by 16
    for fwd, unit in ((True, ("sak", "sbk")), (False, ("sak", "sbn"))):  # x @ W_up^T; go @ W_down
        sig = {n: f"*{dt}" if n in "abcd" else c if n in unit else "i32" for n in names}
        sig.update(dict.fromkeys(("FWD", "PREC", "UPCAST", "BM", "BN", "BK"), c))
        cst = dict(dict.fromkeys(unit, 1), FWD=fwd, PREC="ieee" if dt == "fp32" else None, UPCAST=False,
                   BM=128, BN=128, BK=64)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in unit}
        triton.compile(ASTSource(tg._FUSED["gemm_act"], sig, cst, attrs), target=hopper,
                       options=dict(num_warps=8, num_stages=3))
    for name, args in (("ce_fwd", dict(x=f"*{dt}", y="*i64", loss="*fp32", lse="*fp32")),
                       ("ce_bwd", dict(x=f"*{dt}", y="*i64", lse="*fp32", g="*fp32", dx=f"*{dt}"))):
        sig = dict(args, cap="fp32", V="i32", sx="i32", BV=c)
        triton.compile(ASTSource(tg._FUSED[name], sig, dict(BV=1024)), target=hopper, options=dict(num_warps=8))
print("compiled", sorted(tg._FUSED))
"""


def test_kernels_compile_for_hopper_ahead_of_time():
    """The interpreter runs the kernels as Python; this builds them as a GPU would (Triton's frontend, its type and
    constexpr checks, LLVM, the wheel's ptxas) for sm_90 without one: bf16 and fp32, both GEMM epilogues. A fresh
    process: the interpreter must be off while triton defines its kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled ['ce_bwd', 'ce_fwd', 'gemm_act']" in r.stdout
