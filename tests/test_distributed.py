"""Multi-process tests on gloo (CPU): the sharded Muon step (overlapped = synchronous, bit for bit) and a whole
torchrun run must match one process.

Workers are this file run as a script (`python tests/test_distributed.py muon RANK WORLD OUT`), so nothing
depends on how pytest imports test modules. Total < 60 s on 2 cores.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT, TINY, tiny  # noqa: E402  (conftest puts the repo root on sys.path)
import train_gpt as tg  # noqa: E402

from plot_log import FINAL_SCORE_RE, TRAIN_RE  # noqa: E402

CPU = torch.device("cpu")
MUON_STEPS = 3
CLIPS = (0.0, 0.3)  # clip off (coef exactly 1) and the record's clip (global norm over the sharded banks)
# The seed's Muon (quintic Newton-Schulz) and the record's (Polar-Express table, MuonEq-R row normalization)
MUONS = {"seed": {}, "record": dict(muon_ns="polar_express", muon_eq_r=True)}


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_all(procs, timeout: float) -> list[str]:
    """Collect every process's output; kill whatever is still running if one of them hangs."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        kill_all(procs)


def base_env(**extra) -> dict:
    """A minimal environment: no inherited knobs, one intra-op thread per process, no GPU."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR", "PYENV_ROOT", "PYTHONDONTWRITEBYTECODE")
           if k in os.environ}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ----------------------------------------------------------------------------- parallel Muon


def muon_config(clip: float, muon: str = "seed") -> tg.Hyperparameters:
    # 3 layers: banks of 6 and 3 slots, so 2 ranks exercise the zero-padded shard
    return tiny(num_layers=3, ve_layers="2", grad_clip_norm=clip, **MUONS[muon])


def exact_grads(model, seed: int) -> dict:
    """Multiples of 2^-12 with |k| <= 64: (G + D) + (G - D) and its halving are exact in fp32, so the all-reduced
    average is bit-identical to G and any difference comes from the optimizer itself."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randint(-64, 65, p.shape, generator=g).float() / 4096 for n, p in model.named_parameters()}


def muon_run(rank: int, world: int, clip: float, overlap: bool = True, muon: str = "seed") -> dict:
    h = muon_config(clip, muon)
    torch.manual_seed(h.seed)
    model = tg.build_model(h)
    opt = tg.Optimizers(h, model, tg.Runtime(rank, rank, world, CPU), overlap=overlap)
    sign = 1.0 if rank == 0 else -1.0
    for step in range(MUON_STEPS):  # a different gradient each step: scale changes are not invisible to NS
        G, D = exact_grads(model, 100 + step), exact_grads(model, 200 + step)
        opt.set_schedule(step, 1.0)
        for n, p in model.named_parameters():
            p.grad = G[n] + sign * D[n] if world > 1 else G[n].clone()
        opt.step()
        assert all(p.grad is None for p in model.parameters())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def muon_worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    # Rendezvous through a file, not a probed "free" TCP port that a concurrent job can take first; gloo itself
    # then connects the ranks over 127.0.0.1 (GLOO_SOCKET_IFNAME=lo) on ports the OS assigns.
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    try:
        results = {(muon, clip, overlap): muon_run(rank, world, clip, overlap, muon)
                   for muon in MUONS for clip in CLIPS for overlap in (True, False)}
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out}.rank{rank}")


def test_two_rank_muon_step_matches_one_rank(tmp_path):
    out = str(tmp_path / "muon")
    procs = [subprocess.Popen([sys.executable, __file__, "muon", str(r), "2", out], cwd=ROOT,
                              env=base_env(PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = {(m, clip): muon_run(0, 1, clip, muon=m) for m in MUONS for clip in CLIPS}  # meanwhile, 1 rank here
    except BaseException:
        kill_all(procs)
        raise
    finally:
        torch.set_num_threads(n)
    logs = wait_all(procs, 120)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    torch.manual_seed(muon_config(0.0).seed)
    init = dict(tg.build_model(muon_config(0.0)).named_parameters())
    for (m, clip), params in ref.items():
        for name, want in params.items():
            got, where = ranks[0][m, clip, True][name], f"muon={m} clip={clip} {name}"
            for r in range(2):  # the overlapped step (async collectives) is the synchronous step, bit for bit
                assert torch.equal(ranks[r][m, clip, True][name], ranks[r][m, clip, False][name]), \
                    f"{where}: rank {r} overlapped != synchronous"
            assert torch.equal(got, ranks[1][m, clip, True][name]), f"{where}: ranks disagree"
            moved = (want - init[name]).norm()
            assert moved > 0, name  # every parameter took a step
            rel = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
            assert rel <= 1e-6, f"{where}: 2-rank vs 1-rank relative error {rel:.3g}"
    for name in tg.BANK_NAMES:  # the two Muons really differ
        assert not torch.equal(ref["seed", 0.3][name], ref["record", 0.3][name]), name


# ----------------------------------------------------------------------------- torchrun vs python3


def run_env(dataset, out_dir: Path) -> dict:
    env = {k.upper(): (int(v) if isinstance(v, bool) else v) for k, v in TINY.items()}
    env.update(PRESET="pr549")  # TINY sizes the seed's stack (conftest's tiny()), not the record's defaults
    env.update(DATA_PATH=dataset["data_path"], TOKENIZER_PATH=dataset["tokenizer_path"], OUT_DIR=out_dir,
               RUN_ID="dist", ITERATIONS=3, SLIDING_DIAGNOSTIC=0, EVAL_STRIDE=16)
    return base_env(**env)


def parse(log: Path):
    lines = log.read_text(encoding="utf-8").splitlines()
    losses = [(int(m["step"]), float(m["train_loss"])) for m in map(TRAIN_RE.fullmatch, lines) if m]
    finals = [m for m in map(FINAL_SCORE_RE.fullmatch, lines) if m]
    floats = [float(l.split("val_loss:")[1].split()[0]) for l in lines if l.startswith("final_float ")]
    return lines, losses, finals, floats


def test_torchrun_two_ranks_matches_one_process(dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    script = str(ROOT / "train_gpt.py")
    p1 = subprocess.Popen([sys.executable, script], cwd=tmp_path, env=run_env(dataset, one),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p2 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script], cwd=tmp_path, env=run_env(dataset, two),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out1, out2 = wait_all([p1, p2], 180)
    assert p1.returncode == 0, out1[-3000:]
    assert p2.returncode == 0, out2[-3000:]
    lines1, losses1, finals1, float1 = parse(one / "logs" / "dist.txt")
    lines2, losses2, finals2, float2 = parse(two / "logs" / "dist.txt")
    assert any(l.startswith("world_size:1 grad_accum_steps:8 ") for l in lines1)
    assert any(l.startswith("world_size:2 grad_accum_steps:4 ") for l in lines2)
    assert len(finals1) == len(finals2) == 1
    assert [s for s, _ in losses1] == [s for s, _ in losses2] == [1, 2, 3]
    for (step, a), (_, b) in zip(losses1, losses2):
        assert abs(a - b) <= 1e-4, f"step {step}: 1 rank {a} vs 2 ranks {b}"
    assert len(float1) == len(float2) == 1 and abs(float1[0] - float2[0]) <= 1e-4


if __name__ == "__main__":
    if sys.argv[1] == "muon":
        muon_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
