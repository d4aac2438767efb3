"""Full-Hessian GPTQ (sections 4, 7, 9 of train_gpt.py): the quantizer, the Hessian collection, the reserve.

The 2-rank test runs this file as a gloo worker (`python tests/test_gptq.py hessians RANK WORLD DATA OUT`), as
tests/test_distributed.py does. CPU only; the whole file takes a few seconds.
"""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny  # noqa: E402  (conftest puts the repo root on sys.path)
import train_gpt as tg  # noqa: E402

CPU = tg.Runtime.local()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads stall each other ~50x on these tiny ops, and
    the timed run must not measure that."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def correlated_inputs(g: torch.Generator, n: int, c: int) -> torch.Tensor:
    """Inputs with strongly correlated features (as activations are), so error feedback has something to use."""
    return torch.randn(n, c, generator=g) @ torch.randn(c, c, generator=g) * 0.3 + 0.1 * torch.randn(n, c, generator=g)


# ----------------------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_beats_round_to_nearest_on_the_input_weighted_error(seed):
    g = torch.Generator().manual_seed(seed)
    S, R, C, N = 2, 24, 40, 400  # two slots with different inputs; blocks of 16 leave a partial last block
    X = torch.stack([correlated_inputs(g, N, C) for _ in range(S)])  # (S, N, C)
    W = torch.randn(S, R, C, generator=g) * 0.05
    s = tg.int6_scales(W)
    rtn = tg._quant(W, s, tg.INT6_MAX)
    gptq = tg.gptq_codes(W, X.mT @ X, s, damp=0.01, block_size=16)
    assert gptq.abs().max() <= tg.INT6_MAX and torch.equal(gptq, gptq.round())
    for k in range(S):
        err_rtn = ((W[k] - rtn[k] * s[k, :, None]) @ X[k].T).norm()
        err_gptq = ((W[k] - gptq[k] * s[k, :, None]) @ X[k].T).norm()
        assert err_gptq < 0.9 * err_rtn, (k, err_gptq.item(), err_rtn.item())


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_gptq_with_identity_hessian_is_round_to_nearest_on_the_same_grid(block_size):
    g = torch.Generator().manual_seed(block_size)
    W = torch.distributions.StudentT(3.0).sample((3, 20, 40)) * 0.05  # heavy tails: the clip search clips
    s = tg.int6_scales(W)
    H = torch.eye(40).repeat(3, 1, 1) * torch.rand(3, 1, 1, generator=g)  # any multiple of I
    assert torch.equal(tg.gptq_codes(W, H, s, damp=0.01, block_size=block_size), tg._quant(W, s, tg.INT6_MAX))


def test_gptq_rounds_inputs_never_seen_alone_and_survives_a_singular_hessian():
    g = torch.Generator().manual_seed(5)
    X = correlated_inputs(g, 8, 32)  # rank 8 < 32: singular H; two inputs never active
    X[:, :2] = 0
    W = torch.randn(1, 16, 32, generator=g) * 0.05
    s = tg.int6_scales(W)
    codes = tg.gptq_codes(W, (X.T @ X)[None], s, damp=0.0, block_size=8)
    assert torch.isfinite(codes).all() and codes.abs().max() <= tg.INT6_MAX
    # an unseen input's column gets no error fed into it (it goes last) and none of its own propagates
    assert torch.equal(codes[..., :2], tg._quant(W, s, tg.INT6_MAX)[..., :2])


# ----------------------------------------------------------------------------- the artifact


@torch.no_grad()
def on_grid_model(seed: int) -> tg.GPT:
    """A tiny model whose banks already sit on the int6 grid (each row: integer codes with a +-31, times an fp16
    scale), whose tables are non-trivial and whose passthrough tensors are fp16 values."""
    g = torch.Generator().manual_seed(seed)
    model = tg.build_model(tiny())
    for name, p in model.named_parameters():
        if name in tg.BANK_NAMES:
            codes = torch.randint(-30, 31, p.shape, generator=g).float()
            codes[..., 0] = 31 * torch.where(torch.rand(p.shape[:-1], generator=g) < 0.5, -1.0, 1.0)
            scale = (torch.rand(p.shape[:-1], generator=g) * 0.004 + 0.001).half().float()
            p.copy_(codes * scale.unsqueeze(-1))
        elif name in tg.TOKEN_PARAM_NAMES:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        else:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
            p.copy_(p.half().float())
    return model


def test_qat_forward_equals_reloaded_gptq_artifact_for_weights_on_the_grid(dataset, tmp_path, capsys):
    h = tiny(**dataset, gptq_enabled=True)
    model = on_grid_model(0)
    model.hessians = tg.collect_hessians(h, CPU, model, tg.DistributedTokenLoader(h.train_files, CPU), 2)
    path = tmp_path / "m.ptz"
    tg.export_artifact(h, CPU, model, path)
    assert "quant_method qo_bank:gptq kv_bank:gptq mlp_up_bank:gptq mlp_down_bank:gptq " in capsys.readouterr().out
    loaded = tg.load_artifact(path, h, CPU.device)
    for name in tg.BANK_NAMES:
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    ids = torch.randint(0, h.vocab_size, (3, h.train_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids, qat=True) - loaded(ids)).abs().max().item() < 1e-5
    # Not vacuous: off the grid, GPTQ writes other codes than round-to-nearest with these Hessians.
    with torch.no_grad():
        model.qo_bank.add_(torch.randn(model.qo_bank.shape, generator=torch.Generator().manual_seed(2)) * 1e-3)
    gptq, rtn = tg.quantize_model(model, model.hessians), tg.quantize_model(model)
    assert not torch.equal(gptq["qo_bank"][1], rtn["qo_bank"][1])
    assert torch.equal(gptq["qo_bank"][2], rtn["qo_bank"][2])  # the same grid: same scales


# ----------------------------------------------------------------------------- the collection


def reference_hessians(model: tg.GPT, ids: torch.Tensor) -> dict:
    """H of each bank input recomputed from a second forward through the taps, one site at a time."""
    seen = {}

    def tap(site, i, x):
        seen.setdefault((site, i), []).append(x.detach().reshape(-1, x.size(-1)))

    model.tap = tap
    with torch.no_grad():
        model(ids)
    model.tap = None
    H = {k: torch.cat(v).T @ torch.cat(v) / ids.numel() for k, v in seen.items()}
    return {bank: torch.stack([H[(site, i)] for site in sites for i in range(model.L)])
            for bank, sites in tg.BANK_INPUTS.items()}


def test_hessians_are_the_bank_inputs_second_moments(dataset):
    h = tiny(**dataset)
    torch.manual_seed(0)
    model = tg.build_model(h)
    got = tg.collect_hessians(h, CPU, model, tg.DistributedTokenLoader(h.train_files, CPU), 3)
    loader = tg.DistributedTokenLoader(h.train_files, CPU)
    ids = torch.cat([loader.next_batch(h.train_batch_tokens, h.train_seq_len)[0] for _ in range(3)])
    want = reference_hessians(model, ids)
    for bank in tg.BANK_NAMES:
        w = getattr(model, bank)
        assert got[bank].shape == (w.size(0), w.size(2), w.size(2))
        torch.testing.assert_close(got[bank], want[bank], rtol=1e-5, atol=1e-7)


def hessian_worker(rank: int, world: int, data_path: str, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    try:
        torch.save(collect(data_path, tg.Runtime(rank, rank, world, torch.device("cpu"))), f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def collect(data_path: str, rt: tg.Runtime) -> dict:
    """Each rank takes 4 / world batches: on 1 and on 2 ranks the same sequences (rank r: the r-th span)."""
    h = tiny(data_path=data_path)
    torch.manual_seed(0)
    model = tg.build_model(h)
    return tg.collect_hessians(h, rt, model, tg.DistributedTokenLoader(h.train_files, rt), 4 // rt.world_size)


def test_two_rank_gloo_hessians_equal_one_rank(dataset, tmp_path):
    from test_distributed import base_env, kill_all, wait_all
    out = str(tmp_path / "hess")
    procs = [subprocess.Popen([sys.executable, __file__, "hessians", str(r), "2", dataset["data_path"], out],
                              cwd=ROOT, env=base_env(PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        ref = collect(dataset["data_path"], CPU)
    except BaseException:
        kill_all(procs)
        raise
    logs = wait_all(procs, 120)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    for bank, want in ref.items():
        assert torch.equal(ranks[0][bank], ranks[1][bank]), f"{bank}: ranks disagree"
        assert want.abs().max() > 0
        torch.testing.assert_close(ranks[0][bank], want, rtol=1e-5, atol=1e-7)


class ValSpy(torch.Tensor):
    """The validation tokens, recording every torch operation that reads them."""
    reads: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.reads.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_timed_run_honours_the_reserve_and_collects_without_reading_val(dataset, sp, capsys):
    cap = 3.0
    h = tiny(**dataset, gptq_enabled=True, gptq_calib_batches=4, max_wallclock_seconds=cap, iterations=100000,
             train_log_every=1000, warmdown_iters=5)
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len).as_subclass(ValSpy)
    ctx = tg.EvalContext(h, CPU, val, tg.ByteCounter(tg.build_bpb_luts(sp, h.vocab_size)))
    torch.manual_seed(0)
    model = tg.build_model(h)
    ValSpy.reads.clear()
    steps, train_ms, _ = tg.train(ctx, model)
    assert ValSpy.reads == []
    assert train_ms <= 1000 * cap, f"training + collection took {train_ms:.0f} ms > the {cap} s cap"
    out = capsys.readouterr().out
    reserve = [l for l in out.splitlines() if l.startswith("gptq_reserve:")]
    assert len(reserve) == 1 and " measured per_batch:" in reserve[0]
    assert "stopping_early: wallclock_cap" in out and "gptq_calibration batches:4 ranks:1 " in out
    assert set(model.hessians) == set(tg.BANK_NAMES) and steps > 0
    val[:4].sum()  # the spy does see reads
    assert ValSpy.reads


def test_reserve_that_leaves_no_training_time_is_refused():
    h = tiny(gptq_enabled=True, gptq_reserve_seconds=5.0, max_wallclock_seconds=5.0)
    with pytest.raises(ValueError, match="GPTQ reserve 5.0s .* MAX_WALLCLOCK_SECONDS=5.0"):
        tg.gptq_reserve(h, CPU, tg.build_model(h), h.train_files)
    assert tg.gptq_reserve(tiny(gptq_enabled=True, gptq_reserve_seconds=2.0, max_wallclock_seconds=5.0), CPU,
                           None, "") == 2.0
    assert tg.gptq_reserve(tiny(gptq_enabled=False, max_wallclock_seconds=5.0), CPU, None, "") == 0.0


if __name__ == "__main__":
    if sys.argv[1] == "hessians":
        hessian_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
