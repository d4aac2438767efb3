"""The training loop under a fake clock: the seed's wallclock warmdown, late QAT driven by it, the cap; the record's
WARMDOWN_FRAC schedule and depth-recurrence switch; the compile warmup that must leave no trace. The other tests
run with MAX_WALLCLOCK_SECONDS=0 and WARMUP_STEPS=0, so none of these branches would run there."""
import copy
import re

import pytest
import torch

import train_gpt as tg
from conftest import tiny

RT1 = tg.Runtime.local()
MICRO_S = 1 / 32  # fake seconds per micro-batch forward: a step (8 micro-batches) takes exactly 250 ms
STEP_MS = 1000 * MICRO_S * RT1.grad_accum_steps


@pytest.fixture(autouse=True)
def _quiet_shared_state(monkeypatch):
    """One intra-op thread (tiny models on a shared 2-core box) and console-only logging."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setitem(tg._LOG, "path", None)
    monkeypatch.setitem(tg._LOG, "main", True)
    yield
    torch.set_num_threads(n)


class Run:
    """A model whose every forward advances a fake clock by MICRO_S and records its qat flag and `model.looping`
    (None while unset: the loop switch is a plain attribute here); the schedule each step handed to the optimizers
    is recorded too."""

    def __init__(self, h, monkeypatch, seed=0):
        torch.manual_seed(seed)
        self.model, self.now, self.qat, self.looping, self.schedule = tg.build_model(h), 0.0, [], [], []
        forward = self.model.forward

        def timed_forward(ids, targets=None, qat=False):
            self.now += MICRO_S
            self.qat.append(bool(qat))
            self.looping.append(getattr(self.model, "looping", None))
            return forward(ids, targets, qat)

        monkeypatch.setattr(self.model, "forward", timed_forward)
        set_schedule = tg.Optimizers.set_schedule

        def recording(opt, step, lr_mult):
            self.schedule.append((step, lr_mult))
            set_schedule(opt, step, lr_mult)

        monkeypatch.setattr(tg.Optimizers, "set_schedule", recording)  # a second Run wraps the first: harmless

    def clock(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ctx_parts(dataset):
    h = tiny(**dataset)
    return tg.load_val_tokens(h.val_files, h.eval_seq_len), tg.load_byte_counter(h)


def _train(h, ctx_parts, monkeypatch, capsys):
    run = Run(h, monkeypatch)
    capsys.readouterr()
    steps, train_ms, _ = tg.train(tg.EvalContext(h, RT1, *ctx_parts), run.model, clock=run.clock)
    return run, steps, train_ms, capsys.readouterr().out


# Cap 2.125 s at 250 ms a step: the cap is crossed after step 9 (2250 ms). WARMDOWN_ITERS=3 steps' worth of time
# (750 ms) before the cap is 1375 ms, first reached at step 6; from there the multiplier is remaining / 750 ms.
CAPPED = dict(iterations=100, max_wallclock_seconds=2.125, warmdown_iters=3, qat_enabled=False, late_qat_threshold=0.6)


def test_wallclock_warmdown_late_qat_and_cap(dataset, ctx_parts, monkeypatch, capsys):
    h = tiny(**dataset, **CAPPED)
    run, steps, train_ms, out = _train(h, ctx_parts, monkeypatch, capsys)
    assert steps == 9 and train_ms == 9 * STEP_MS
    assert "stopping_early: wallclock_cap train_time:2250ms step:9/100" in out.splitlines()
    mults = [m for _, m in run.schedule]
    assert [s for s, _ in run.schedule] == list(range(9))
    assert mults[:6] == [1.0] * 6  # before the warmdown
    assert mults[6:] == pytest.approx([625 / 750, 375 / 750, 125 / 750], rel=1e-12)
    # late QAT: on from the first step whose multiplier is below 0.6 (step 7), for all its micro-batches
    qat_lines = [ln for ln in out.splitlines() if ln.startswith("qat:on")]
    assert len(qat_lines) == 1 and qat_lines[0].startswith("qat:on step:7 lr_mult:0.5000 ")
    per_step = [run.qat[i:i + RT1.grad_accum_steps] for i in range(0, len(run.qat), RT1.grad_accum_steps)]
    assert per_step == [[s >= 7] * RT1.grad_accum_steps for s in range(9)]


def test_no_cap_means_iteration_warmdown(dataset, ctx_parts, monkeypatch, capsys):
    """MAX_WALLCLOCK_SECONDS=0: the same fake clock changes nothing; the warmdown is the last WARMDOWN_ITERS steps."""
    h = tiny(**dataset, **{**CAPPED, "iterations": 5, "max_wallclock_seconds": 0.0})
    run, steps, _, out = _train(h, ctx_parts, monkeypatch, capsys)
    assert steps == 5 and "stopping_early" not in out
    assert [m for _, m in run.schedule] == [1.0, 1.0, 1.0, 2 / 3, 1 / 3]


# The record's schedule and loop switch. Cap 2.75 s less a 0.25 s GPTQ reserve = 2.5 s at 250 ms a step: frac =
# step / 10 at the start of each step, as with ITERATIONS=10 and no cap. WARMDOWN_FRAC 0.6 / MIN_LR 0.3: 1 while
# frac < 0.4, then (1 - frac) / 0.6 floored at 0.3. LOOP_ACTIVATE_FRAC 0.4: on at step 4 (frac 0.4 exactly: >=).
LOOPED = dict(iterations=100, max_wallclock_seconds=2.75, gptq_enabled=True, gptq_reserve_seconds=0.25,
              gptq_calib_batches=2, warmdown_iters=0, warmdown_frac=0.6, min_lr=0.3, late_qat_threshold=0.0,
              num_loops=1, loop_start=0, loop_end=0, loop_activate_frac=0.4)
LOOPED_ITERS = {**LOOPED, "iterations": 10, "max_wallclock_seconds": 0.0}


@pytest.mark.parametrize("kw", [LOOPED, LOOPED_ITERS], ids=["clock", "iterations"])
def test_frac_warmdown_and_loop_switch(dataset, ctx_parts, monkeypatch, capsys, kw):
    h = tiny(**dataset, **kw)
    run, steps, _, out = _train(h, ctx_parts, monkeypatch, capsys)
    assert steps == 10 and ("stopping_early" in out) == (kw is LOOPED)
    assert [m for _, m in run.schedule] == pytest.approx([1.0] * 5 + [0.5 / 0.6, 0.4 / 0.6, 0.5, 0.2 / 0.6, 0.3],
                                                         rel=1e-12)
    assert [ln for ln in out.splitlines() if ln.startswith(("loop:", "warmdown:"))] == [
        "loop:on step:4 frac:0.4000", "warmdown:start step:5 lr_mult:0.8333"]
    n = 10 * RT1.grad_accum_steps
    assert run.looping[:n] == [s >= 4 for s in range(10) for _ in range(RT1.grad_accum_steps)]
    assert run.looping[n:] == [True] * h.gptq_calib_batches  # GPTQ calibration (then export and eval) run looped
    assert run.model.looping is True


def test_loop_is_on_after_training_even_if_the_clock_never_switched_it(dataset, ctx_parts, monkeypatch, capsys):
    h = tiny(**dataset, **{**LOOPED, "loop_activate_frac": 1.0})  # the cap stops training before frac reaches 1
    run, steps, _, out = _train(h, ctx_parts, monkeypatch, capsys)
    n = steps * RT1.grad_accum_steps
    assert steps == 10 and "loop:on" not in out
    assert run.looping == [False] * n + [True] * h.gptq_calib_batches and run.model.looping is True


def _state(model, opt) -> dict:
    sd = opt.state_dict()
    return dict(model={k: v.clone() for k, v in model.state_dict().items()}, adam=sd["adam"], muon=sd["muon"])


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_compile_warmup_restores_weights_and_optimizer_state(dataset, monkeypatch, capsys):
    h = tiny(**dataset, warmup_steps=3, qat_enabled=False, late_qat_threshold=0.6)
    run = Run(h, monkeypatch)
    opt = tg.Optimizers(h, run.model, RT1)
    before = copy.deepcopy(_state(run.model, opt))
    seen = []

    def loader():
        seen.append(tg.DistributedTokenLoader(h.train_files, RT1))
        return seen[-1]

    tg.compile_warmup(h, RT1, run.model, run.model, opt, loader)
    assert len(run.qat) == 3 * RT1.grad_accum_steps and len(seen) == 1  # the steps ran on their own loader
    _assert_same(before, _state(run.model, opt))


@pytest.mark.parametrize("kw, n_steps", [(CAPPED, 9), (LOOPED, 10)], ids=["late_qat", "loop"])
def test_warmup_leaves_the_timed_run_as_a_fresh_start(dataset, ctx_parts, monkeypatch, capsys, kw, n_steps):
    """Same init, with and without 3 warmup steps (both QAT variants, or both loop variants): identical losses,
    weights, step count under the cap (warmup time is not train time), schedule and per-forward flags."""
    runs = []
    for warmup in (0, 3):
        h = tiny(**dataset, **{**kw, "warmup_steps": warmup})
        run, steps, train_ms, out = _train(h, ctx_parts, monkeypatch, capsys)
        losses = re.findall(r"^step:\d+/\d+ train_loss:\S+", out, re.M)
        timed = run.schedule[warmup:]  # compile_warmup sets (0, 1.0) once per warmup step
        k = warmup * RT1.grad_accum_steps
        runs.append((steps, train_ms, losses, timed, run.qat[k:], run.looping[k:],
                     {k: v.clone() for k, v in run.model.state_dict().items()}))
    (s0, ms0, l0, sch0, q0, lp0, w0), (s1, ms1, l1, sch1, q1, lp1, w1) = runs
    assert s0 == s1 == n_steps and ms0 == ms1 and len(l0) == n_steps
    assert l0 == l1 and sch0 == sch1 and q0 == q1 and lp0 == lp1
    _assert_same(w0, w1, "weights")


LOOP1 = dict(num_loops=1, loop_start=0, loop_end=0, late_qat_threshold=0.0)
LATE_QAT = dict(qat_enabled=False, late_qat_threshold=0.6)


@pytest.mark.parametrize("warmup, kw, n_steps", [(1, LATE_QAT, 1), (2, LATE_QAT, 2), (2, dict(qat_enabled=True), 2),
                                                 (2, dict(qat_enabled=False, late_qat_threshold=0.0), 2),
                                                 (2, LOOP1, 2), (3, {**LOOP1, **LATE_QAT}, 3),
                                                 (0, {**LOOP1, **LATE_QAT, "torch_compile": "1"}, 4),
                                                 (0, {**LOOP1, "torch_compile": "1"}, 2)])
def test_compile_warmup_logs_the_variants_it_ran(dataset, monkeypatch, capsys, warmup, kw, n_steps):
    """Each step runs the next (QAT, looping) variant; compiling, at least one step per variant even at
    WARMUP_STEPS=0, so no graph compiles inside the clock. `model.looping` is restored afterwards."""
    h = tiny(**dataset, warmup_steps=warmup, **kw)
    run = Run(h, monkeypatch)
    if h.num_loops:
        run.model.looping = True  # the model's own default (eval runs looped)
    opt = tg.Optimizers(h, run.model, RT1)
    capsys.readouterr()
    tg.compile_warmup(h, RT1, run.model, run.model, opt, lambda: tg.DistributedTokenLoader(h.train_files, RT1))
    logged = re.findall(r"^compile_warmup steps:(\d+) qat_variants:(\d+) loop_variants:(\d+)$",
                        capsys.readouterr().out, re.M)
    loops = set(run.looping) if h.num_loops else set()  # the model always has the flag; without loops it stays put
    assert logged == [(str(n_steps), str(len(set(run.qat))), str(len(loops)))]
    assert len(run.qat) == n_steps * RT1.grad_accum_steps
    assert len(set(zip(run.qat, run.looping))) == min(n_steps, len(set(run.qat)) * max(len(loops), 1))
    assert run.model.looping is True
