"""The frontier model (section 5) at tiny sizes on CPU: the record's parameter count, the virtual layer order of the
depth recurrence, causality with every lever on, one forward for loss and logits, document masking (a packed row
scores as its documents one by one), the gates' and lanes' wiring and init, and the optimizer's grouping."""
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import perturbed_model

V, BOS = 64, tg.BOS_ID
# Every lever on: loop layers 1-2 run 3 times (10 virtual layers: encoder 5, decoder 5), lanes from layer 4, gated
# BOS-masked smear, head gates, skip gates, XSA everywhere, document masking; plus the seed's bigram and VE.
FRONTIER = dict(vocab_size=V, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, gate_dims=4,
                loop_start=1, loop_end=2, num_loops=2, parallel_start_layer=4, xsa_last_n=6, bigram_vocab_size=48,
                bigram_dim=8, ve_dim=8, ve_layers="2,5", train_seq_len=32, train_batch_tokens=256, eval_seq_len=32,
                eval_stride=16, torch_compile="0")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def frontier(**kw) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**FRONTIER, **kw})


def perturbed(h):
    """Every parameter nudged off its init (zero projections and gates would hide most paths)."""
    return perturbed_model(h, scale=0.1)


def docs_row(lengths, seed=0) -> torch.Tensor:
    """One row of documents [BOS, ids...] of the given lengths (ids never BOS)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.cat((torch.tensor([BOS]), torch.randint(2, V, (n - 1,), generator=g))) for n in lengths])


def test_default_config_has_the_record_parameter_count():
    """35,945,671 as the 04-27 record logs: banks 31,719,424, tied embedding 4,194,304, 31,943 scalars and gates."""
    with torch.device("meta"):
        model = tg.build_model(tg.Hyperparameters())
    named = dict(model.named_parameters())
    assert sum(p.numel() for p in named.values()) == 35_945_671
    assert sum(named[n].numel() for n in tg.BANK_NAMES) == 31_719_424 and named["tok_emb.weight"].numel() == 4_194_304
    assert model.looping is True and model.skip_weights.shape == model.skip_gates.shape == (8, 512)


def test_virtual_layer_order():
    h = tg.Hyperparameters()
    assert tg.virtual_layers(h, True) == (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10)
    assert tg.virtual_layers(h, False) == tuple(range(11))
    assert tg.virtual_layers(tg.Hyperparameters(**tg.PR549), True) == tuple(range(11))  # the seed: no loop


def test_lanes_must_start_in_the_decoder_past_the_loop():
    for bad in (3, 4, 5):  # 3: inside the plain encoder (11 // 2 = 5 layers); 5: the loop's last layer
        with pytest.raises(ValueError, match="PARALLEL_START_LAYER"):
            tg.Hyperparameters(parallel_start_layer=bad)
    assert tg.Hyperparameters(parallel_start_layer=5, num_loops=0).parallel_start_layer == 5


def test_init_follows_the_record():
    model = tg.build_model(tg.Hyperparameters(**{**FRONTIER, "bigram_vocab_size": 0, "ve_layers": ""}))
    for blk in model.blocks:
        assert torch.all(blk.q_gain == 5.0) and torch.all(blk.attn_gate == 0) and blk.attn_gate.shape == (4, 4)
        assert torch.all(blk.resid_mix[0] == 1) and torch.all(blk.resid_mix[1] == 0)
    assert torch.all(model.parallel_resid_lambdas == 1.1) and model.parallel_resid_lambdas.shape == (6, 2)
    assert torch.all(model.parallel_post_lambdas == 1) and model.parallel_post_lambdas.shape == (6, 2, 2)
    assert torch.all(model.skip_gates == 0) and torch.all(model.skip_weights == 1)
    assert model.smear_lambda.item() == 0 and torch.all(model.smear_w == 0)
    assert torch.all(model.qo_bank[6:] == 0) and torch.all(model.mlp_down_bank == 0)
    ids = docs_row([9, 7, 16]).view(1, -1)
    emb = F.embedding(ids, model.tok_emb.weight)
    assert torch.equal(model._embed(ids, {"tok_emb.weight": model.tok_emb.weight}), tg.rms_norm(emb))  # smear: identity


def test_every_new_parameter_is_an_adamw_scalar():
    model = tg.build_model(frontier())
    opt = tg.Optimizers(frontier(), model, tg.Runtime.local())
    scalar = {id(p) for p in opt.adam.param_groups[1]["params"]}
    new = ["smear_w", "smear_lambda", "skip_gates", "parallel_resid_lambdas", "parallel_post_lambdas",
           *(f"blocks.{i}.attn_gate" for i in range(6))]
    named = dict(model.named_parameters())
    assert all(id(named[n]) in scalar for n in new)
    assert "smear" not in named  # the seed's fixed smear is off


@pytest.mark.parametrize("qat", [False, True])
def test_causal_with_every_lever_on(qat):
    model = perturbed(frontier())
    T = 32
    ids = torch.stack((docs_row([10, 6, 16], 1), docs_row([20, 12], 2)))
    with torch.no_grad():
        base = model(ids, qat=qat)
        for t in (0, 1, 9, 10, 11, 20, T - 1):
            ids2 = ids.clone()
            ids2[0, t] = 2 + (ids[0, t] + 17) % (V - 2)  # any other non-BOS token
            diff = (model(ids2, qat=qat) - base).abs().amax(-1)
            assert torch.all(diff[0, :t] <= 1e-6), f"logits before {t} changed: {diff[0, :t]}"
            assert diff[0, t].item() > 1e-4 and diff[1].max().item() <= 1e-6


def test_one_forward_for_loss_and_logits():
    """The training loss is the cross-entropy of the scoring logits, bit for bit (one head, one softcap)."""
    model = perturbed(frontier())
    ids = torch.stack((docs_row([12, 20], 3), docs_row([32], 4)))
    tgt = torch.roll(ids, -1, 1)
    with torch.no_grad():
        for qat in (False, True):
            logits = model(ids, qat=qat)
            assert torch.equal(model(ids, tgt, qat), F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1)))
            assert logits.abs().max() <= model.softcap


def test_looping_switches_the_order_and_shares_the_weights():
    """Flipping model.looping alone changes the forward; the loop reuses the physical layers' weights (the GPTQ
    taps see layers 1 and 2 three times per site when looped, once otherwise) and the loss trains them."""
    model = perturbed(frontier())
    ids = docs_row([12, 20], 5).view(1, -1)
    calls = {True: [], False: []}
    out = {}
    with torch.no_grad():
        for flag in (True, False):
            model.looping = flag
            model.tap = lambda site, i, x: calls[flag].append((site, i))
            out[flag] = model(ids)
    model.tap = None
    assert (out[True] - out[False]).abs().max() > 1e-3
    for part, reps in ((calls[True], 3), (calls[False], 1)):
        for site in ("attn_in", "attn_out", "mlp_in", "mlp_act"):
            assert [i for s, i in part if s == site] == [0] + [1, 2] * reps + [3, 4, 5]
    model.looping = True
    model(ids, torch.roll(ids, -1, 1)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.numel() > 1)


def test_skip_lands_on_lane_zero_only():
    """At the first parallel layer (physical 4, virtual position 8, skip 3) the MLP lane reads the stream before
    the skip: changing skip 3 moves that layer's attention input, not its MLP input, and then the next layer's."""
    model = perturbed(frontier())
    ids = docs_row([14, 18], 6).view(1, -1)
    seen = {}

    def run():
        seen.clear()
        model.tap = lambda site, i, x: seen.setdefault((site, i), []).append(x.clone())
        with torch.no_grad():
            model(ids)
        model.tap = None
        return {k: v[-1] for k, v in seen.items()}

    before = run()
    with torch.no_grad():
        model.skip_weights[3].mul_(3.0)
    after = run()
    assert torch.equal(before[("mlp_in", 4)], after[("mlp_in", 4)])
    assert not torch.allclose(before[("attn_in", 4)], after[("attn_in", 4)])
    assert not torch.allclose(before[("mlp_in", 5)], after[("mlp_in", 5)])
    assert torch.equal(before[("attn_in", 3)], after[("attn_in", 3)])  # position 7 runs before skip 3


def test_smear_never_mixes_into_a_bos():
    model = perturbed(frontier())
    w = {"tok_emb.weight": model.tok_emb.weight, "bigram.embed.weight": model.bigram.embed.weight}
    ids = docs_row([8, 8, 16], 7).view(1, -1)
    ids2 = ids.clone()
    ids2[0, 7] = 2 + (ids[0, 7] + 5) % (V - 2)  # the token before the BOS at position 8
    model.bigram = None  # the seed's bigram hash reads the previous token by design; the smear is what is tested
    with torch.no_grad():
        a, b = model._embed(ids, w), model._embed(ids2, w)
        assert torch.equal(a[0, 8], b[0, 8]) and not torch.equal(a[0, 7], b[0, 7])
        model.smear_bos_mask = False
        assert not torch.equal(model._embed(ids, w)[0, 8], model._embed(ids2, w)[0, 8])


def test_packed_documents_score_as_documents_alone():
    """Document masking: each document of a packed row gets the per-token losses it gets scored alone (row start
    at its BOS), so attention and the smear never cross a BOS. Without the mask they differ."""
    lengths = [9, 5, 11, 7]
    h = frontier(bigram_vocab_size=0)  # the bigram hash crosses documents by design (off in the frontier)
    model = perturbed(h)
    row = docs_row(lengths, 8)
    tgt = torch.roll(row, -1)
    with torch.no_grad():
        packed = F.cross_entropy(model(row.view(1, -1))[0], tgt, reduction="none")
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        alone = torch.cat([F.cross_entropy(model(row[s:s + n].view(1, -1))[0], tgt[s:s + n], reduction="none")
                           for s, n in zip(starts, lengths)])
        torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-5)
        model.doc_mask = False
        unmasked = F.cross_entropy(model(row.view(1, -1))[0], tgt, reduction="none")
    assert (unmasked - alone)[lengths[0]:].abs().max() > 1e-3


def test_pr549_builds_none_of_the_frontier_parameters():
    with torch.device("meta"):
        model = tg.build_model(tg.Hyperparameters(**tg.PR549))
    names = set(dict(model.named_parameters()))
    assert "smear" in names and model.skip_weights.shape == (5, 512)
    assert not any(k in n for n in names for k in ("smear_w", "smear_lambda", "skip_gates", "parallel", "attn_gate"))


def test_forward_traces_as_one_graph_in_both_loop_states():
    """torch.compile(fullgraph=True) traces the whole forward (layer list, lanes, gates, the document layout) with
    no graph break, looped and plain: the training loop's switch only picks the other warmed graph."""
    import torch._dynamo
    torch._dynamo.reset()
    model = perturbed(frontier(num_layers=4, loop_end=1, parallel_start_layer=3, xsa_last_n=4, ve_layers="3"))
    ids = torch.stack((docs_row([10, 6, 16], 1), docs_row([20, 12], 2)))
    with torch._dynamo.config.patch(disable=False), torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        for flag in (True, False):
            model.looping = flag
            assert torch.equal(compiled(ids), model(ids))
        assert torch.equal(compiled(ids, qat=True), model(ids, qat=True))  # fake quantization on the SDClip grid
        layout = torch.compile(lambda s: tg.doc_layout("fa3", s), backend="eager", fullgraph=True)(ids == BOS)
    torch._dynamo.reset()
    assert torch.equal(layout[0], tg.doc_layout("fa3", ids == BOS)[0])


def test_smear_off_is_the_plain_normed_embedding():
    model = perturbed(frontier(smear_gate="off", bigram_vocab_size=0))
    names = set(dict(model.named_parameters()))
    assert not names & {"smear", "smear_w", "smear_lambda"}
    ids = docs_row([9, 7], 9).view(1, -1)
    w = {"tok_emb.weight": model.tok_emb.weight}
    assert torch.equal(model._embed(ids, w), tg.rms_norm(F.embedding(ids, model.tok_emb.weight)))
