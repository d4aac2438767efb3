"""Shared fixtures: a tiny CPU config, synthetic challenge-format shards encoded with the real sp1024 tokenizer."""
import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: test_kernels runs it on CPU tensors

import socket
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "bench")]  # the script, then its tools and benchmarks
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

# The tokenizers the repository ships (the challenge's sp1024 and sp8192, and the CaseOps sp8192).
TOKENIZERS = ROOT / "data" / "tokenizers"
REAL_SP = TOKENIZERS / "fineweb_1024_bpe.model"
SP8192 = TOKENIZERS / "fineweb_8192_bpe.model"
CASEOPS_SP = TOKENIZERS / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"

# The pr549 stack at a tiny size (these tests pin the seed's mechanisms; the frontier's have their own tests). Every
# pr549 value is spelled out, so the tests that pass TINY to a subprocess through env vars get the same config.
TINY = dict({k: v for k, v in tg.PR549.items() if k not in ("preset", "data_path", "tokenizer_path")}, vocab_size=1024, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
            bigram_vocab_size=64, bigram_dim=8, xsa_last_n=1, ve_dim=8, ve_layers="1", rope_dims=4,
            train_seq_len=32, eval_seq_len=32, eval_stride=8, eval_batch_seqs=8, train_batch_tokens=512,
            iterations=4, warmup_steps=0, warmdown_iters=2, max_wallclock_seconds=0.0, val_loss_every=0,
            train_log_every=1, torch_compile="0", ema_decay=0.0, ttt_chunk_tokens=256, ttt_batch_seqs=4,
            ttt_epochs=1, ngram_table_bits=12, compressor="lzma", sliding_diagnostic=True)


def tiny(**kw) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **kw})


def _documents():
    """Deterministic English-ish documents available offline: stdlib module docstrings."""
    import json, collections, argparse, dataclasses, functools, itertools, pathlib, random, statistics, textwrap
    for mod in (json, collections, argparse, dataclasses, functools, itertools, pathlib, random, statistics, textwrap):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80:
                yield doc


@pytest.fixture(scope="session")
def sp():
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(REAL_SP))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, sp):
    """data_path with 2 train shards and 1 val shard, documents = [BOS] + encode(text)."""
    root = tmp_path_factory.mktemp("data")
    docs = [[tg.BOS_ID] + sp.encode(d) for d in _documents()]
    val = np.concatenate(docs[:12])
    train = np.concatenate(docs[12:] * 3)
    half = len(train) // 2
    for split, index, tokens in (("train", 0, train[:half]), ("train", 1, train[half:]), ("val", 0, val)):
        tg.write_shard(root / tg.SHARD_NAME.format(split=split, index=index), tokens)
    return dict(data_path=str(root), tokenizer_path=str(REAL_SP))


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is much faster and keeps reductions stable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed_model(h, seed=0, scale=0.05):
    """A tiny model with every parameter nudged off its init, so that no score is a symmetric special case."""
    torch.manual_seed(seed)
    model = tg.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def env(dataset):
    """(tiny config, its validation tokens, its byte counter) for the evaluation tests."""
    h = tiny(**dataset)
    return h, tg.load_val_tokens(h.val_files, h.eval_seq_len), tg.load_byte_counter(h)


def _rank_main(rank, world, port, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rt = tg.init_runtime()
    try:
        worker(rank, rt, *args)
        # Every rank reaches here before any tears gloo down: a rank that closed its pairs while a peer was still
        # mid-collective aborted that peer ("terminate called without an active exception") in one CI run.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def spawn_ranks(world: int, worker, *args) -> None:
    """Runs worker(rank, rt, *args) on `world` gloo ranks through train_gpt's own init_runtime (env://)."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, worker, args), nprocs=world, join=True)
