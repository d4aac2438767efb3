"""The frontier artifact: SDClip GPTQ on every matrix, an int7 tied embedding, LQER, the per-group ZPAQ codec with the
MLP's hidden order absorbed, its bad-input errors and the fit on it."""
import struct
import sys

import pytest
import torch

import train_gpt as tg
from fingerprint import synthetic_shards

CPU = tg.Runtime.local()
# The frontier defaults at a tiny size (loop and lanes off: the tiny model has 2 layers); vocab 96 is not a power
# of two, so a corrupted permutation can hold an index past the last row.
FRONTIER_TINY = dict(vocab_size=96, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                     xsa_last_n=1, num_loops=0, parallel_start_layer=0, rope_dims=4, train_seq_len=32,
                     train_batch_tokens=512, eval_seq_len=32, eval_stride=16, torch_compile="0",
                     max_wallclock_seconds=0.0, gptq_calib_batches=2, compressor="pergroup")
needs_zpaq = pytest.mark.skipif(tg._codec("pergroup") is None, reason="zpaq not installed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier_data")
    synthetic_shards(root, tg)
    return root


def frontier(root, **kw) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**FRONTIER_TINY, "data_path": str(root), "out_dir": str(root), **kw})


def trained_like(h, seed=0):
    """A tiny model nudged off its init (zero-init matrices too), with its GPTQ Hessians collected."""
    torch.manual_seed(seed)
    model = tg.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.hessians = tg.collect_hessians(h, CPU, model, tg.DistributedTokenLoader(h.train_files, CPU), 2)
    return model.eval()


def test_defaults_are_the_frontier_artifact_and_pr549_the_seeds():
    h, pr = tg.Hyperparameters(), tg.Hyperparameters(**tg.PR549)
    assert (h.quant_scheme, h.gptq_enabled, h.lqer_top_k, h.mlp_sort) == ("sdclip", True, 3, True)
    assert (pr.quant_scheme, pr.gptq_enabled, pr.lqer_top_k, pr.mlp_sort) == ("percentile", False, 0, False)
    with pytest.raises(ValueError, match="QUANT_SCHEME"):
        tg.Hyperparameters(quant_scheme="sd")
    with pytest.raises(ValueError, match="LQER_TOP_K"):
        tg.Hyperparameters(lqer_top_k=-1)


def test_sdclip_scales_are_k_std_over_r_by_group():
    w = torch.randn(3, 5, 40)
    for name, bits, k in (("mlp_up_bank", 6, 11.5), ("qo_bank", 6, 13.0), ("tok_emb.weight", 7, 14.0)):
        s, qmax = tg.sdclip_scales(w, tg.quant_group(name))
        assert qmax == 2 ** (bits - 1) - 1
        assert torch.equal(s, (k * w.std(-1) / qmax).half().float())
    gate = torch.randn(8, 12)
    kind, codes, s = tg._sdclip_entry("blocks.0.attn_gate.weight", gate, None, 0.01, 128)
    assert kind == "int8" and codes.abs().amax(-1).eq(127).all()  # s = max|row| / 127: each row's max hits 127
    assert tg._sdclip_entry("skip_weights", torch.randn(256, 256), None, 0.01, 128)[0] == "fp16"
    assert tg._sdclip_entry("big.weight", torch.randn(257, 256), None, 0.01, 128)[0] == "int8"


@pytest.mark.parametrize("name, shape, kind", [("mlp_down_bank", (3, 16, 64), "int6"), ("kv_bank", (4, 8, 64), "int6"),
                                              ("tok_emb.weight", (96, 64), "int7"), ("big.weight", (300, 256), "int8"),
                                              ("ve.embed.weight", (96, 8), "fp16")])
def test_sdclip_fake_quant_is_the_exports_rounding_with_straight_through_gradients(name, shape, kind):
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(shape, generator=gen) * 0.05).requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    out = tg.fake_quant(w, name, sdclip=True)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)
    entry = tg._sdclip_entry(name, w.detach(), None, 0.01, 128)
    assert entry[0] == kind
    assert torch.equal(out.detach(), tg.dequantize({name: entry})[name])  # bit for bit what the export's RTN reloads
    assert not torch.equal(out.detach(), w.detach())
    if kind != "fp16":  # not the seed's percentile grid
        assert not torch.equal(out.detach(), tg.fake_quant(w, name).detach())


@pytest.mark.parametrize("scheme", ["sdclip", "percentile"])
def test_qat_forward_is_the_model_on_its_schemes_rounded_weights(shards, scheme):
    h = frontier(shards, quant_scheme=scheme)
    model = trained_like(h)
    ids = torch.randint(0, h.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    sd = model.state_dict()
    q = tg.quantize_model({n: sd[n] for n in model.qat_tensors()}, None, scheme=scheme)
    rounded = tg.build_model(h)
    rounded.load_state_dict({**sd, **tg.dequantize(q)})
    with torch.no_grad():
        assert torch.equal(model(ids, qat=True), rounded.eval()(ids))
        assert not torch.equal(model(ids, qat=True), model(ids))


def test_collection_covers_the_head_input_and_runs_looped(shards):
    h = frontier(shards)
    model, seen = tg.build_model(h), []
    model.looping = False
    real = model.forward
    model.forward = lambda *a, **k: (seen.append(model.looping), real(*a, **k))[1]
    H = tg.collect_hessians(h, CPU, model, tg.DistributedTokenLoader(h.train_files, CPU), 2)
    assert seen == [True, True] and model.looping is False  # looped while collecting, restored after
    assert H["tok_emb.weight"].shape == (1, h.model_dim, h.model_dim) and H["tok_emb.weight"][0].trace() > 0
    pr = tg.collect_hessians(frontier(shards, quant_scheme="percentile"), CPU, model,
                             tg.DistributedTokenLoader(h.train_files, CPU), 1)
    assert set(pr) == set(tg.BANK_NAMES)


@needs_zpaq
def test_frontier_default_exports_sdclip_gptq_int7_lqer_pergroup_and_reloads_exactly(shards, capsys):
    h = frontier(shards)
    model = trained_like(h)
    q, weights, _ = tg.export_payload(h, model)
    kinds = {n: e[0] for n, e in q.items()}
    assert {kinds[n] for n in tg.BANK_NAMES} == {"int6"} and kinds["tok_emb.weight"] == "int7"
    assert sum(k == "lqa" for k in kinds.values()) == h.lqer_top_k == sum(k == "lqb" for k in kinds.values())
    assert "tok_emb.weight:gptq" in capsys.readouterr().out
    path = shards / "frontier.ptz"
    size, codec = tg.export_artifact(h, CPU, model, path)
    assert codec == "pergroup" and path.read_bytes()[4] == tg.CODECS.index("pergroup")
    loaded = tg.load_artifact(path, h, "cpu").state_dict()
    expected = tg.dequantize(q)
    assert all(torch.equal(loaded[n], expected[n].to(loaded[n].dtype)) for n in expected)


def test_lqer_corrects_the_worst_matrices(shards):
    h = frontier(shards, mlp_sort=False)
    model = trained_like(h)
    sd = model.state_dict()
    q = tg.quantize_model(sd, model.hessians, scheme="sdclip")
    deq0, deq1 = tg.dequantize(q), tg.dequantize(tg.lqer_correct(q, sd, 3))
    errs = sorted(((sd[n].float() - deq0[n]).view(-1, *sd[n].shape[-2:])[i].norm().item(), n, i)
                  for n in (*tg.BANK_NAMES, "tok_emb.weight") for i in range(sd[n].view(-1, *sd[n].shape[-2:]).size(0)))
    for e, n, i in errs[-3:]:  # the three largest errors shrink; every other matrix is untouched
        assert (sd[n].float() - deq1[n]).view(-1, *sd[n].shape[-2:])[i].norm().item() < e
    for _, n, i in errs[:-3]:
        assert torch.equal(deq1[n].view(-1, *sd[n].shape[-2:])[i], deq0[n].view(-1, *sd[n].shape[-2:])[i])


def test_absorbed_mlp_sort_leaves_the_model_function_unchanged(shards):
    h = frontier(shards)
    model = trained_like(h)
    sd, H = tg.sort_mlp_hidden(model.state_dict(), model.hessians)
    assert not torch.equal(sd["mlp_up_bank"], model.mlp_up_bank.detach())  # something moved
    sorted_model = tg.build_model(h)
    sorted_model.load_state_dict(sd)
    ids = torch.randint(0, h.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(sorted_model.eval()(ids), model(ids), rtol=1e-5, atol=1e-5)
    # the down Hessian moves with the hidden units: H_sorted[a, b] = H[p[a], p[b]]
    p = torch.stack([(model.mlp_up_bank[0].detach()[:, None] == sd["mlp_up_bank"][0][None]).all(-1).float().argmax(0)])
    assert torch.equal(H["mlp_down_bank"][0], model.hessians["mlp_down_bank"][0][p[0]][:, p[0]])


def _frame(h, model):
    raw = tg.serialize(tg.export_payload(h, model)[0])
    return raw, tg._pergroup_pack(raw)


def _reframe(streams) -> bytes:
    return tg.PERGROUP_MAGIC + struct.pack(f"<{1 + len(streams)}I", len(streams), *map(len, streams)) + b"".join(
        streams)


@needs_zpaq
def test_pergroup_roundtrips_and_stores_only_the_embedding_permutation(shards):
    h = frontier(shards)
    raw, frame = _frame(h, trained_like(h))
    assert tg._pergroup_unpack(frame) == raw
    streams = tg._pergroup_streams(frame)
    _, buckets = tg._pergroup_layout(raw)
    assert [b[0] for b in buckets] == ["qo_bank[0:2]", "qo_bank[2:4]", "kv_bank[0:2]", "kv_bank[2:4]",
                                       "mlp_up_bank[0:2]", "mlp_down_bank[0:2]", "tok_emb.weight[0:1]"]
    assert len(streams) == 1 + len(buckets) + 1 and len(streams[-1]) == (96 * 7 + 7) // 8  # 7 bits per row index


@needs_zpaq
@pytest.mark.parametrize("damage", ["truncated stream", "wrong stream count", "index out of range",
                                    "repeated row", "garbled bucket"])
def test_corrupt_pergroup_frame_names_the_tensor_and_stream(shards, tmp_path, damage):
    h = frontier(shards)
    raw, frame = _frame(h, trained_like(h))
    streams = tg._pergroup_streams(frame)
    if damage == "truncated stream":
        bad, match = frame[:-5], r"stream 8 truncated"
    elif damage == "wrong stream count":
        bad, match = _reframe(streams[:-1]), r"8 streams, the header needs 9 .*7 tensor buckets, 1 permutations"
    elif damage in ("index out of range", "repeated row"):
        order = torch.arange(96)
        order[5] = 100 if damage == "index out of range" else 4
        bad = _reframe(streams[:-1] + [tg._pack_perm(order.numpy(), 96)])
        match = (r"stream 8 \(row permutation of tensor tok_emb.weight\[0:1\]\): "
                 + ("row index 100 out of range \\[0, 96\\)" if damage == "index out of range" else "not a perm"))
    else:
        bad, match = _reframe(streams[:5] + [streams[5][:-3]] + streams[6:]), r"stream 5 \(tensor mlp_up_bank\[0:2\]\)"
    with pytest.raises(ValueError, match=match):
        tg._pergroup_unpack(bad)
    blob = tg.compress_payload(raw, "pergroup")[0]
    path = tmp_path / "bad.ptz"
    path.write_bytes(blob[:18] + bad)
    with pytest.raises(ValueError, match=str(path)):  # load_artifact: one error naming the file, the tensor, the stream
        tg.load_artifact(path, h, "cpu")


def test_missing_zpaq_skips_the_codec_with_one_log_line(shards, monkeypatch):
    h = frontier(shards, compressor="auto")
    raw = tg.serialize(tg.quantize_model(tg.build_model(h), scheme="sdclip"))
    monkeypatch.setitem(sys.modules, "zpaq", None)  # import zpaq now raises ImportError
    lines = []
    monkeypatch.setattr(tg, "log0", lambda msg, console=True: lines.append(msg))
    blob, chosen, sizes = tg.compress_payload(raw, "auto")
    assert "pergroup" not in sizes and chosen in sizes and tg.decompress_artifact(blob) == raw
    assert sum("pergroup skipped" in line for line in lines) == 1
    with pytest.raises(ValueError, match="COMPRESSOR=pergroup: module for pergroup is not installed"):
        tg.compress_payload(raw, "pergroup")


@needs_zpaq
def test_fit_to_budget_on_the_pergroup_codec(shards):
    h = frontier(shards, model_dim=64, mlp_mult=4.0)
    model = trained_like(h)
    q, weights, hd = tg.export_payload(h, model)
    full = len(tg.compress_payload(tg.serialize(q), "pergroup")[0])
    budget = full - 600
    blob, codec, _, st = tg.fit_to_budget(q, weights, "pergroup", budget, 0.2, hd)
    assert codec == "pergroup" and len(blob) <= budget and 0 < st["pruned"] and st["probes"] <= tg.FIT_PROBES
    raw = tg.decompress_artifact(blob)
    assert raw[:8] == tg.serialize(q)[:8]  # the same payload layout, some int6 codes zeroed
    assert tg.dequantize(tg.deserialize(raw)).keys() == tg.dequantize(q).keys()


def test_permutation_packing_roundtrips():
    for n in (1, 2, 96, 8192):
        p = torch.randperm(n).numpy()
        packed = tg._pack_perm(p, n)
        assert len(packed) == (n * max(1, (n - 1).bit_length()) + 7) // 8
        assert (tg._unpack_perm(packed, n, n) == p).all()
    with pytest.raises(ValueError, match="bytes, expected"):
        tg._unpack_perm(packed[:-1], 8192, 8192)


@needs_zpaq
def test_pergroup_carries_a_pr549_payload():
    from conftest import perturbed_model, tiny
    raw = tg.serialize(tg.quantize_model(perturbed_model(tiny(), seed=3)))
    blob, codec, _ = tg.compress_payload(raw, "pergroup")
    assert codec == "pergroup" and tg.decompress_artifact(blob) == raw
