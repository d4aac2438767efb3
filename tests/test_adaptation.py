"""Issue 11: TTT that adapts with few updates (bias-corrected Polyak), Hedge's bound against the neural expert,
the CPU preset's fixed step count and the log lines the plot reads."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import perturbed_model, tiny

CPU = tg.Runtime.local()


def per_position_nll(h, val, luts, scorer, experts=None):
    nll = {}

    def rec(r):
        for k, v in r["nll"].items():
            nll.setdefault(k, {}).update(zip(r["pos"].tolist(), v.tolist()))

    ctx = tg.EvalContext(h, CPU, val, luts)
    r = tg.run_pass(ctx, scorer, h.eval_stride, experts, h.ttt_chunk_tokens, recorder=rec)
    return r, nll


def repeated_pattern_stream(h, period=48, n_chunks=6, seed=0):
    """A random pattern longer than the window, repeated: the model cannot copy it from its context, and no
    training shard holds it, so only adaptation on the scored chunks can learn it."""
    g = np.random.default_rng(seed)
    pattern = g.choice(np.arange(2, h.vocab_size), period, replace=False)
    n = n_chunks * h.ttt_chunk_tokens + 1
    return torch.from_numpy(np.resize(pattern, n).astype(np.int32))


@pytest.mark.parametrize("bias_correct", [True, False])
def test_score_first_ttt_learns_a_repeated_unseen_pattern(env, bias_correct):
    """Score-first TTT at a useful LR lowers the later chunks' loss below the plain sliding score, with the record's
    Polyak decay (0.998) and only a few updates. The plain EMA (bias_correct=False, the old behaviour) stays ~99%
    at the start weights after 5 updates and gains almost nothing: the gap between the two is the fix."""
    h, _, luts = env
    h = dataclasses.replace(h, ttt_lr=0.5, ttt_epochs=2, ttt_polyak_decay=0.998, ttt_polyak_bias_correct=bias_correct,
                            bias_enabled=False, ngram_enabled=False, hedge_enabled=False)
    val = repeated_pattern_stream(h)
    _, plain = per_position_nll(h, val, luts, tg.FixedScorer(perturbed_model(h)))
    model = perturbed_model(h)
    _, adapted = per_position_nll(h, val, luts, tg.TestTimeTrainer(h, CPU, model, model, lambda m: m))
    C = h.ttt_chunk_tokens
    first = [p for p in plain["neural"] if p < C]
    assert all(adapted["neural"][p] == pytest.approx(plain["neural"][p], abs=1e-6) for p in first)  # nothing trained yet
    later = [p for p in plain["neural"] if p >= 2 * C]
    gain = np.mean([plain["neural"][p] - adapted["neural"][p] for p in later])
    if bias_correct:
        assert gain > 0.5, gain  # nats per token, on chunks 2..5
    else:
        assert gain < 0.1, gain


def test_polyak_rate_is_a_mean_early_and_the_plain_ema_late():
    d = 0.998
    rates = [tg.TestTimeTrainer.polyak_rate(d, t) for t in range(1, 6)]
    assert rates[0] == 1.0
    # five updates of the recursion give the d-weighted mean of the five iterates
    xs = np.random.default_rng(0).normal(size=5)
    avg = 123.0
    for a, x in zip(rates, xs):
        avg += a * (x - avg)
    w = d ** np.arange(4, -1, -1)
    assert avg == pytest.approx(float((w * xs).sum() / w.sum()), rel=1e-12)
    assert tg.TestTimeTrainer.polyak_rate(d, 5700) == pytest.approx(1 - d, rel=2e-5)  # record scale: the plain EMA
    assert tg.TestTimeTrainer.polyak_rate(d, 3, bias_correct=False) == pytest.approx(1 - d)


def harmful_candidates(val, vocab, top_k=3):
    """n-gram candidates that are always wrong: every slot names a token other than the actual next one."""
    nxt = val.numpy().astype(np.int64)
    tok = np.stack([(nxt + 1 + j) % vocab for j in range(top_k)], 1).astype(np.int32)
    return tok, np.full(tok.shape, 3.0, np.float32)


def test_mixture_stays_within_its_bound_of_the_neural_expert(env):
    """Bias and n-gram experts made harmful: the declared mixture ends within sum_c n_c log(1/w_neural,c) of the
    plain neural score (HedgeMixer's bound), token by token and in total, and Hedge moves its weight to neural."""
    h, val, luts = env
    h = dataclasses.replace(h, bias_lr=30.0, ngram_betas="1.0,2.0", hedge_eta=1.0, ttt_enabled=False)
    bias = tg.OnlineBias(h, h.vocab_size, CPU.device)
    hedge = tg.HedgeMixer(tg.Experts.pool_size(True, 2), h.hedge_eta, CPU.device)
    experts = tg.Experts(h, bias, harmful_candidates(val, h.vocab_size), hedge)
    assert experts.n_experts == 4
    slack, worst = [0.0], [-math.inf]

    def rec(r):
        log_w_neural = hedge.log_w[0].item()  # the weight this chunk is scored with (updates come after)
        n = r["nll"]["mixture"].numel()
        slack[0] += -log_w_neural * n
        excess = r["nll"]["mixture"] - r["nll"]["neural"] + log_w_neural
        worst[0] = max(worst[0], excess.max().item())

    ctx = tg.EvalContext(h, CPU, val, luts)
    r = tg.run_pass(ctx, tg.FixedScorer(perturbed_model(h)), h.eval_stride, experts, h.ttt_chunk_tokens, recorder=rec)
    assert r.losses["neural+bias"] > r.losses["neural"] + 0.5  # the premise: both helpers really hurt
    assert r.losses["neural+bias+ngram"] > r.losses["neural"] + 0.5
    assert worst[0] <= 1e-5  # per token: -log p_mix <= -log p_neural + log(1/w_neural)
    assert (r.losses["mixture"] - r.losses["neural"]) * r.tokens <= slack[0] + 1e-6 * r.tokens
    assert slack[0] / r.tokens < 0.5 * math.log(4)  # Hedge learned: the bound is well under log K per token
    assert hedge.log_w.exp()[0] > 0.9


def test_cpu_preset_trains_a_fixed_step_count_with_diagnostics_off():
    h = tg.Hyperparameters.from_env({"PRESET": "cpu"})
    assert h.max_wallclock_seconds == 0 and 0 < h.iterations < 100000  # steps, not a wall clock, set the run
    assert not h.float_diagnostic and not h.sliding_diagnostic and h.train_log_every <= 10
    assert tg.Hyperparameters.from_env({"PRESET": "cpu", "MAX_WALLCLOCK_SECONDS": "60"}).max_wallclock_seconds == 60
    with pytest.raises(ValueError, match="ITERATIONS"):
        tg.Hyperparameters.from_env({"PRESET": "cpu", "ITERATIONS": "0"})


def test_run_log_has_the_lines_the_plot_reads(dataset, tmp_path):
    """A run with the float and sliding diagnostics off: the roundtrip line stays; the warmdown start, the TTT
    plan and one progress line per chunk (all tracks) are logged, and plot_log reads them back."""
    import plot_log
    h = tiny(**dataset, out_dir=str(tmp_path), run_id="lines", iterations=4, warmdown_iters=2, float_diagnostic=False,
             sliding_diagnostic=False, eval_stride=32, ttt_chunk_tokens=512)
    assert tg.run(h, tg.Runtime.local()) == 0
    text = (tmp_path / "logs" / "lines.txt").read_text()
    lines = text.splitlines()
    assert not any(l.startswith(("final_float ", "int6_sliding ")) for l in lines)
    assert sum(l.startswith("final_int8_zlib_roundtrip_exact ") for l in lines) == 1
    d = plot_log.parse_log(text)
    assert d["warmdown_step"] == 3  # the first step whose LR is below the peak: 4 - 2 + 1
    pts = d["passes"]["pass"]
    assert [p["chunk"] for p in pts] == list(range(1, pts[0]["n_chunks"] + 1))
    assert list(pts[-1]["bpb"]) == list(d["ablation"]) == ["neural", "neural+bias", "neural+bias+ngram", "mixture"]
    assert pts[-1]["bpb"]["mixture"] == pytest.approx(d["ablation"]["mixture"]["val_bpb"], abs=1e-4)  # 1 rank: same
    plan = [l for l in lines if l.startswith("ttt ")]
    assert len(plan) == 1 and f"planned_updates:{pts[0]['n_chunks'] - 1}" in plan[0] and "bias_corrected:1" in plan[0]


def test_tune_eval_holds_out_the_end_of_the_last_train_shard(dataset):
    import tune_eval
    assert tune_eval.parse_config("NGRAM_BETAS=0.5,1.0,ttt_lr=0.01") == {"NGRAM_BETAS": "0.5,1.0", "TTT_LR": "0.01"}
    h = tiny(**dataset)
    last = tg.load_shard(tg.shard_files(h.train_files)[-1])
    cut = tune_eval.heldout_tokens(h, 600, steps=1)
    assert int(cut[0]) == tg.BOS_ID and (cut.numel() - 1) % h.eval_seq_len == 0
    start = len(last) - (600 + 1)
    assert np.array_equal(cut.numpy(), last[start:][np.flatnonzero(last[start:] == tg.BOS_ID)[0]:][:cut.numel()])
    with pytest.raises(ValueError, match="not held out"):
        tune_eval.heldout_tokens(h, 600, steps=10_000)
    with pytest.raises(ValueError, match="larger than the validation set"):
        tune_eval.val_tokens(h, 10 ** 9)


def test_tune_keeps_a_value_only_if_it_gains_min_gain(monkeypatch):
    """Coordinate descent: a value replaces the best so far only when it is at least min_gain lower; later knobs
    are tried on top of the earlier choices."""
    import tune_eval
    table = {("0.02", "1.0"): 2.0, ("0.04", "1.0"): 2.0 - 5e-5, ("0.08", "1.0"): 1.9,  # bias: 0.08 gains 0.1
             ("0.08", "0.5"): 1.9 - 2e-4, ("0.08", "0.25"): 1.9 - 2.5e-4,  # hedge 0.5 gains 2e-4; 0.25 only 5e-5 more
             ("0.02", "0.5"): 2.0 - 1e-3, ("0.02", "0.25"): 2.0 - 2e-3}
    seen = []

    def fake_score(artifact, h, tokens, luts):
        seen.append((str(h.bias_lr), str(h.hedge_eta)))
        return tg.EvalResult({"mixture": 0.0}, {"mixture": table[seen[-1]]}, "mixture", 1, 1, 0.0)

    monkeypatch.setattr(tune_eval, "score", fake_score)
    grid = {"bias_lr": ["0.04", "0.08"], "hedge_eta": ["0.5", "0.25"]}
    best = tune_eval.tune(None, {"BIAS_LR": "0.02", "HEDGE_ETA": "1.0"}, None, None, grid, min_gain=1e-4)
    assert best == {"BIAS_LR": "0.08", "HEDGE_ETA": "0.5"}
    assert ("0.02", "0.5") not in seen  # the hedge knob is tried at the chosen bias only
    best = tune_eval.tune(None, {"BIAS_LR": "0.02", "HEDGE_ETA": "1.0"}, None, None, grid, min_gain=0.5)
    assert best == {"BIAS_LR": "0.02", "HEDGE_ETA": "1.0"}  # nothing gains 0.5: the start values stay


def test_bench_experts_prints_a_rate(capsys):
    import bench_experts
    assert bench_experts.main(["--rows", "600", "--reps", "1", "--betas", "1.0,2.0"]) == 0
    out = capsys.readouterr().out
    assert "experts:4 betas:1.0,2.0" in out and float(out.split("us_per_row:")[1].split()[0]) > 0


def test_tune_cpu_preset_scales_the_schedule_and_keeps_the_env():
    """A lever trial: the base preset, its schedule scaled to the steps, the trial's env on top; no TTT or GPTQ
    (the trial scores the float model), and an env typo is the same error train_gpt.py would give."""
    import tune_cpu_preset as tcp
    variant, o = tcp.trial_config("cpu", {"DOC_MASK": "1", "XSA_LAST_N": "3"}, 120)
    assert variant == "sp1024" and o["iterations"] == 120 and o["warmdown_iters"] == 40
    assert o["muon_momentum_warmup_steps"] == 30 and o["doc_mask"] and o["xsa_last_n"] == 3
    assert not o["ttt_enabled"] and not o["gptq_enabled"] and o["bigram_vocab_size"] == 512
    with pytest.raises(ValueError, match="DOC_MAKS"):
        tcp.trial_config("cpu", {"DOC_MAKS": "1"}, 120)
