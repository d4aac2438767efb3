"""The record's optimizer and schedule (PR #1855): Polar-Express Newton-Schulz, MuonEq-R, the AdamW groups with
LR-scaled decoupled weight decay, the gradient clip, momentum warmup, EMA from step 0 and the WARMDOWN_FRAC / MIN_LR
schedule. The model is the tiny pr549 one: these are optimizer mechanisms, independent of the architecture."""
import pytest
import torch

import train_gpt as tg
from conftest import tiny

RT1 = tg.Runtime.local()
# The record's optimizer and schedule fields, read from the defaults (section 1 holds the record's values).
OPT_FIELDS = ("matrix_lr", "scalar_lr", "tied_embed_lr", "muon_momentum", "muon_momentum_warmup_start",
              "muon_momentum_warmup_steps", "muon_ns", "muon_eq_r", "muon_wd", "embed_wd", "scalar_wd", "beta1",
              "beta2", "grad_clip_norm", "warmdown_iters", "warmdown_frac", "min_lr")
FRONTIER_OPT = {n: getattr(tg.Hyperparameters(), n) for n in OPT_FIELDS}


def frontier(**kw) -> tg.Hyperparameters:
    return tiny(**{**FRONTIER_OPT, **kw})


def ns_reference(G: torch.Tensor, steps: int, coeffs) -> torch.Tensor:
    """The iteration in float64, written out: normalize, transpose tall matrices, k-th tuple (last one reused)."""
    X = G.double()
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for k in range(steps):
        a, b, c = coeffs[k] if k < len(coeffs) else coeffs[-1]
        X = a * X + (b * (X @ X.mT) + c * (X @ X.mT) @ (X @ X.mT)) @ X
    return X.mT if tall else X


@pytest.mark.parametrize("table", sorted(tg.NS_COEFFS))
@pytest.mark.parametrize("shape", [(2, 24, 40), (3, 40, 24)])
def test_each_newton_schulz_iteration_matches_float64(table, shape):
    """After every iteration k (1..7, past the five-tuple table too) the fp32 CPU result is the float64 iteration
    with the same coefficients; the other table's iteration is far off, so the coefficients really are the table's."""
    torch.manual_seed(3)
    G = torch.randn(shape)
    coeffs, other = tg.NS_COEFFS[table], tg.NS_COEFFS[sorted(set(tg.NS_COEFFS) - {table})[0]]
    for steps in range(1, 8):
        got = tg.zeropower_via_newtonschulz5(G, steps, coeffs=coeffs)
        assert got.dtype == torch.float32 and got.shape == G.shape
        want = ns_reference(G, steps, coeffs)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, (table, steps, err)
        assert ((got.double() - ns_reference(G, steps, other)).norm() / want.norm()).item() > 1e-2


def test_polar_express_orthogonalizes_tighter_than_the_quintic():
    """Five Polar-Express iterations put the singular values nearer 1 than the seed's fixed quintic tuple."""
    torch.manual_seed(4)
    G = torch.randn(4, 48, 96)
    spread = {t: (torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(G, 5, coeffs=c).double()) - 1).abs().max()
              for t, c in tg.NS_COEFFS.items()}
    assert spread["polar_express"] < 0.5 * spread["quintic"], spread


def _grads(model, seed=0, scale=1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def _capture_ns(monkeypatch) -> list:
    """Record (input, coeffs) of every Newton-Schulz call the optimizer makes."""
    seen, ns = [], tg.zeropower_via_newtonschulz5

    def recording(G, steps=5, eps=1e-7, coeffs=tg.NS_COEFFS["quintic"]):
        seen.append((G.clone(), coeffs))
        return ns(G, steps, eps, coeffs)

    monkeypatch.setattr(tg, "zeropower_via_newtonschulz5", recording)
    return seen


@pytest.mark.parametrize("eq_r", [True, False])
def test_muon_eq_r_unit_rows_before_newton_schulz(monkeypatch, eq_r):
    """Newton-Schulz gets the Nesterov update U = g + mu * buf (first step: (1 + mu) g), with MuonEq-R each row of
    each bank matrix divided by its L2 norm (rows of the stored orientation, tall W_up included); the table is
    MUON_NS's."""
    h = frontier(muon_eq_r=eq_r, grad_clip_norm=0.0)
    torch.manual_seed(0)
    model = tg.build_model(h)
    opt, seen = tg.Optimizers(h, model, RT1), _capture_ns(monkeypatch)
    grads = _grads(model, scale=0.01)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.set_schedule(0, 1.0)
    opt.step()
    assert len(seen) == len(tg.BANK_NAMES)
    by_shape = {tuple(grads[n].shape): grads[n] for n in tg.BANK_NAMES}
    assert any(s[1] > s[2] for s in by_shape)  # a tall bank: the row norm is not taken after a transpose
    for G, coeffs in seen:
        assert coeffs is tg.NS_COEFFS[h.muon_ns]
        U = (1 + opt.momentum) * by_shape[tuple(G.shape)]
        rows = G.norm(dim=-1)
        if eq_r:
            torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-6)
            torch.testing.assert_close(G, U / U.norm(dim=-1, keepdim=True), rtol=1e-6, atol=1e-7)
        else:
            assert (rows - 1).abs().max() > 0.1
            torch.testing.assert_close(G, U, rtol=1e-6, atol=0)


def test_unit_rows_clamps_zero_rows():
    U = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])
    assert torch.equal(tg.unit_rows(U), torch.tensor([[[0.6, 0.8], [0.0, 0.0]]]))


def test_momentum_warms_from_0_92_to_0_97_over_1500_steps():
    h = frontier()
    opt = tg.Optimizers(h, tg.build_model(h), RT1)
    for step, want in ((0, 0.92), (750, 0.945), (1500, 0.97), (4000, 0.97)):
        opt.set_schedule(step, 1.0)
        assert opt.momentum == pytest.approx(want, abs=1e-12), step


def test_adamw_groups_and_lr_scaled_decoupled_weight_decay():
    """Embeddings: TIED_EMBED_LR / EMBED_WD; every other non-bank tensor: SCALAR_LR / SCALAR_WD; betas (BETA1, BETA2).
    With zero gradients every optimizer's step is the decay alone, p <- p (1 - lr wd) at the CURRENT lr (base lr x
    multiplier): an L2 penalty folded into the gradient would instead take an Adam-normalized step of ~lr."""
    h = frontier()
    torch.manual_seed(0)
    model = tg.build_model(h)
    opt = tg.Optimizers(h, model, RT1)
    names = {id(p): n for n, p in model.named_parameters()}
    emb, sc = opt.adam.param_groups
    assert {names[id(p)] for p in emb["params"]} == {n for n in names.values() if n in tg.TOKEN_PARAM_NAMES}
    assert {names[id(p)] for p in sc["params"]} == set(names.values()) - set(tg.TOKEN_PARAM_NAMES) - set(tg.BANK_NAMES)
    assert (emb["base_lr"], emb["weight_decay"], sc["base_lr"], sc["weight_decay"]) == (0.03, 0.085, 0.02, 0.02)
    assert emb["betas"] == sc["betas"] == (0.9, 0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # no zero weights: the decay must show everywhere
    before, mult = {n: p.detach().clone() for n, p in model.named_parameters()}, 0.25
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.set_schedule(10, mult)
    opt.step()
    for n, p in model.named_parameters():
        lr, wd = ((h.matrix_lr, h.muon_wd) if n in tg.BANK_NAMES else
                  (h.tied_embed_lr, h.embed_wd) if n in tg.TOKEN_PARAM_NAMES else (h.scalar_lr, h.scalar_wd))
        torch.testing.assert_close(p.detach(), before[n] * (1 - lr * mult * wd), rtol=1e-6, atol=0, msg=n)


def test_clip_scales_every_gradient_by_the_global_norm():
    """The clip sees one norm over all parameters (banks and replicated): Muon's momentum and Adam's first moment
    after step 1 hold the gradients scaled by GRAD_CLIP_NORM / that norm."""
    h = frontier()
    torch.manual_seed(0)
    model = tg.build_model(h)
    opt = tg.Optimizers(h, model, RT1)
    grads = _grads(model, seed=1)
    norm = torch.stack([g.pow(2).sum() for g in grads.values()]).sum().sqrt()
    assert norm > 10 * h.grad_clip_norm
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.set_schedule(0, 1.0)
    opt.step()
    coef = h.grad_clip_norm / (norm + 1e-6)
    for name, buf in zip(tg.BANK_NAMES, opt.buf):
        torch.testing.assert_close(buf, grads[name] * coef, rtol=1e-5, atol=1e-9)
    for n, p in model.named_parameters():
        if n not in tg.BANK_NAMES:
            torch.testing.assert_close(opt.adam.state[p]["exp_avg"], (1 - h.beta1) * grads[n] * coef,
                                       rtol=1e-5, atol=1e-9, msg=n)


# WARMDOWN_FRAC 0.85, MIN_LR 0.1: 1 before 15 % of the budget, then (1 - frac) / 0.85, floored at 0.1 (from 91.5 %).
SCHEDULE = [(0.0, 1.0), (0.1, 1.0), (0.15, 1.0), (0.2, 0.8 / 0.85), (0.5, 0.5 / 0.85), (0.9, 0.1 / 0.85),
            (0.915, 0.1), (0.95, 0.1), (1.0, 0.1), (1.02, 0.1)]


@pytest.mark.parametrize("frac, want", SCHEDULE)
def test_lr_multiplier_frac_form_on_the_clock_and_on_iterations(frac, want):
    """The clock form (elapsed / cap; the step count is ignored) and the iteration form (step / ITERATIONS, no cap)."""
    clock = tg.Hyperparameters(max_wallclock_seconds=599.5, iterations=10**6)
    iters = tg.Hyperparameters(max_wallclock_seconds=0.0, iterations=2000)
    assert (clock.warmdown_frac, clock.min_lr, clock.warmdown_iters) == (0.85, 0.1, 0)
    assert tg.budget_frac(clock, 123, frac * 599_500) == pytest.approx(frac, abs=1e-15)
    assert tg.budget_frac(iters, round(frac * 2000), 1e9) == pytest.approx(frac, abs=1e-15)
    assert tg.lr_multiplier(clock, 123, frac * 599_500) == pytest.approx(want, rel=1e-12)
    assert tg.lr_multiplier(iters, round(frac * 2000), 1e9) == pytest.approx(want, rel=1e-12)


def test_ema_averages_every_step_from_the_first(dataset, monkeypatch):
    """EMA_DECAY d from step 0: the shadow starts at the weights the timed run starts from (the init, restored after
    the compile warmup) and folds in every step's weights: after 3 steps d^3 w0 + (1 - d)(d^2 w1 + d w2 + w3)."""
    h = frontier(**dataset, ema_decay=0.75, ema_min_steps=3, iterations=3, warmup_steps=2)
    torch.manual_seed(0)
    model = tg.build_model(h)
    init, calls, step = [p.detach().clone() for p in model.parameters()], [], tg.train_step

    def recording(*args, **kw):
        before = [p.detach().clone() for p in model.parameters()]
        loss = step(*args, **kw)
        calls.append((before, [p.detach().clone() for p in model.parameters()]))
        return loss

    monkeypatch.setattr(tg, "train_step", recording)
    monkeypatch.setitem(tg._LOG, "path", None)
    tg.train(tg.EvalContext(h, RT1, None, None), model)
    assert len(calls) == 2 + 3  # the warmup's steps, then the timed ones
    w = [calls[2][0]] + [after for _, after in calls[2:]]
    for a, b in zip(w[0], init):
        assert torch.equal(a, b)  # the warmup left no trace
    d = h.ema_decay
    for i, p in enumerate(model.parameters()):
        want = d ** 3 * w[0][i] + (1 - d) * (d ** 2 * w[1][i] + d * w[2][i] + w[3][i])
        assert not torch.equal(want, w[3][i])
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7)
