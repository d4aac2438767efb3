"""data/caseops.py: the CaseOps transform is a bijection on any text; per-piece original byte counts; train_gpt's BPB
bytes from the val byte sidecar and its start-up checks."""
from __future__ import annotations

import importlib.util
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import train_gpt as tg
from conftest import CASEOPS_SP, ROOT, SP8192, _documents, perturbed_model, tiny


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


co, boc = _load("caseops"), _load("build_offline_corpus")
T, A, C, E = co.TITLE, co.ALLCAPS, co.CAPNEXT, co.ESC

# Letters of both cases weigh most; then the operators themselves, non-ASCII letters whose case ends a run, digits,
# punctuation, whitespace and the space marker.
ALPHABET = st.one_of(
    st.sampled_from("aAbBzZqQiIxX"), st.sampled_from(co.OPERATORS), st.sampled_from("ÏïßẞΣσςéÉ東\u2581"),
    st.sampled_from("0123456789 .,'-\n\t"), st.characters())
TEXTS = st.text(ALPHABET, max_size=60)


@pytest.mark.parametrize("text, encoded", [
    ("The NASA Launch", f"{T}the {A}nasa {T}launch"),
    ("iPhone OpenAI", f"i{C}phone {T}open{C}a{C}i"),
    ("McDonald's USA-based ABC123DEF", f"{T}mc{C}donald's {A}usa-based {A}abc123{A}def"),
    ("NAÏVE", f"{A}naÏ{A}ve"),
    ("I A a", f"{T}i {T}a a"),
    (f"x{T}y{E}", f"x{E}{T}y{E}{E}"),
    ("", ""),
])
def test_spec_examples(text, encoded):
    assert co.encode(text) == encoded
    assert co.decode(encoded) == text


@settings(max_examples=400, deadline=None)
@given(TEXTS)
def test_round_trip_on_any_text(text):
    encoded = co.encode(text)
    assert co.decode(encoded) == text
    assert not any("A" <= ch <= "Z" for ch in encoded)  # the tokenizer only ever sees lowercase ASCII letters
    assert encoded.replace(T, "").replace(A, "").replace(C, "").replace(E, "").lower() == \
        "".join(ch for ch in text if ch not in co.OPERATORS).lower()


@settings(max_examples=400, deadline=None)
@given(TEXTS)
def test_decode_accepts_exactly_the_encodings(text):
    """decode(s) either raises or returns the one text whose encoding is s: no two strings decode alike."""
    try:
        decoded = co.decode(text)
    except ValueError:
        return
    assert co.encode(decoded) == text


@pytest.mark.parametrize("bad, message", [
    (f"{T}", "ends after TITLE"),
    (f"{T}1", "TITLE must be followed by an ASCII letter"),
    (f"a{T}b", "TITLE inside a word"),
    (f"a{A}b", "ALLCAPS inside a word"),
    (f"{C}a", "CAPNEXT outside a mixed-case word"),
    (f"{A}ab{C}c", "CAPNEXT outside a mixed-case word"),
    (f"{E}a", "ESC must be followed by one of"),
    (f"{T}{A}a", "TITLE followed by ALLCAPS"),
    ("Abc", "not the canonical encoding"),  # an uppercase letter: "Abc" is spelled T+abc
    (f"{A}a", "not the canonical encoding"),  # ALLCAPS on one letter: "A" is spelled T+a
    (f"{T}a{C}b", "not the canonical encoding"),  # "AB" is spelled A+ab
])
def test_decode_rejects_misplaced_markers(bad, message):
    with pytest.raises(ValueError, match=message):
        co.decode(bad)


@pytest.fixture(scope="module")
def caseops_sp():
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(CASEOPS_SP))


def test_shipped_tokenizer_reserves_the_operators(caseops_sp):
    assert [caseops_sp.id_to_piece(i) for i in range(4, 8)] == list(co.OPERATORS)
    assert caseops_sp.encode(co.encode("Hello World"), out_type=str) == [T, "hello", "\u2581", T, "world"]


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_piece_byte_counts_sum_to_the_normalized_original(caseops_sp, text):
    """Tokenize the transform of SentencePiece-normalized text (what the builders do): the counts sum to that
    text's UTF-8 bytes, with the operators, NFKC, whitespace, byte fallback and escapes all in play."""
    norm = co.normalized(caseops_sp, text)
    ids = caseops_sp.encode(co.encode(norm))
    surfaces = co.piece_surfaces(caseops_sp)
    counts = co.original_byte_counts([surfaces[i] for i in ids])
    assert sum(counts) == len(norm.encode("utf-8"))
    assert all(n >= 0 for n in counts) and len(counts) == len(ids)


def test_piece_byte_counts_worked_example(caseops_sp):
    surfaces = co.piece_surfaces(caseops_sp)
    ids = caseops_sp.encode(co.encode("Hello World Ï"))
    pieces = [surfaces[i] for i in ids]
    assert pieces[:5] == [T, "hello", "\u2581", T, "world"]
    assert co.original_byte_counts(pieces)[:5] == [0, 5, 1, 0, 5]
    assert sum(co.original_byte_counts(pieces)) == len("Hello World Ï".encode())
    assert co.original_byte_counts([E, T, "a"]) == [0, 3, 1]  # an escaped operator is its own 3 bytes
    assert co.original_byte_counts([None, "\u2581x", b"\xc3", b"\x8f"]) == [0, 2, 1, 1]
    with pytest.raises(ValueError, match="ends after ESC"):
        co.original_byte_counts(["a", E])


# ------------------------------------------------------------------ train_gpt: BPB bytes from the val byte sidecar
VAL_DOCS, SHARD_TOKENS = 12, 1500  # several val shards, so the sidecar's alignment is checked shard by shard


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, caseops_sp):
    """The same documents and split as a CaseOps dataset (with sidecar) and a plain sp8192 one."""
    import sentencepiece as spm
    root, docs = tmp_path_factory.mktemp("caseops_data"), list(_documents())
    plain = spm.SentencePieceProcessor(model_file=str(SP8192))
    out = {}
    for name, sp, tok, use in (("caseops", caseops_sp, CASEOPS_SP, True), ("plain", plain, SP8192, False)):
        res = boc.write_dataset(sp, docs, VAL_DOCS, root / name, SHARD_TOKENS, use_caseops=use)
        out[name] = dict(h=tiny(data_path=str(root / name), tokenizer_path=str(tok), vocab_size=8192), **res)
    norm = [co.normalized(caseops_sp, d) for d in docs[:VAL_DOCS]]
    out["norm_bytes"] = sum(len(t.encode()) for t in norm)
    return out


def _all_targets_bytes(h):
    val = tg.load_val_tokens(h.val_files, 1)
    counter = tg.load_byte_counter(h, val.numel())
    return int(counter(torch.arange(val.numel() - 1), val[:-1].long(), val[1:].long()).sum()), counter


def test_sidecar_sits_beside_the_val_shards_and_no_glob_takes_it(corpora):
    h = corpora["caseops"]["h"]
    shards = tg.shard_files(h.val_files)
    sides = sorted(Path(h.data_path).glob(tg.SIDECAR_GLOB))
    assert len(shards) == len(sides) >= 2 and not any("bytes" in f for f in shards)
    assert [tg.shard_num_tokens(f) for f in shards] == [tg.shard_num_tokens(f) for f in sides]
    shutil.copy(tg.shard_files(h.train_files)[0], Path(h.data_path) / "fineweb_train_bytes_000000.bin")
    try:
        assert not any("bytes" in f for f in tg.TokenStream(h.train_files).files)
    finally:
        (Path(h.data_path) / "fineweb_train_bytes_000000.bin").unlink()


def test_sidecar_bytes_equal_the_plain_tokenizers_lut_bytes(corpora):
    """Over every val target, CaseOps's sidecar and plain sp8192's LUT count the same original (normalized) bytes."""
    caseops_total, counter = _all_targets_bytes(corpora["caseops"]["h"])
    plain_total, plain = _all_targets_bytes(corpora["plain"]["h"])
    assert (counter.source, plain.source) == ("sidecar", "lut")
    assert caseops_total == plain_total == corpora["norm_bytes"] == corpora["caseops"]["val_normalized_bytes"]


def test_run_pass_counts_sidecar_bytes_and_val_max_tokens_cuts_them(corpora):
    h = corpora["caseops"]["h"]
    val = tg.load_val_tokens(h.val_files, h.eval_seq_len)
    counter = tg.load_byte_counter(h, val.numel())
    assert counter.sidecar.numel() == val.numel()
    r = tg.run_pass(tg.EvalContext(h, tg.Runtime.local(), val, counter), tg.FixedScorer(perturbed_model(h)),
                    stride=h.eval_seq_len)
    assert r.tokens == val.numel() - 1 and r.bytes == int(counter.sidecar[1:].sum())
    assert r.val_bpb == pytest.approx(r.val_loss / math.log(2) * r.tokens / r.bytes, rel=1e-12)
    sub = tg.load_val_tokens(h.val_files, h.eval_seq_len, max_tokens=64)
    cut = tg.load_byte_counter(h, sub.numel())
    assert cut.sidecar.numel() == sub.numel() == 65 and torch.equal(cut.sidecar, counter.sidecar[:65])


def _copy(corpora, name, tmp_path):
    h = corpora[name]["h"]
    shutil.copytree(h.data_path, tmp_path / name)
    return tg.Hyperparameters(**{**tg.asdict(h), "data_path": str(tmp_path / name)}), tmp_path / name


def test_start_up_errors_name_the_file(corpora, tmp_path):
    h, d = _copy(corpora, "caseops", tmp_path)
    side = d / "fineweb_val_bytes_000001.bin"
    good = tg.load_shard(side)
    tg.write_shard(side, good[:-1])
    with pytest.raises(ValueError, match=rf"val byte sidecar {re.escape(str(side))} has {len(good) - 1} values but "
                                         rf"its val shard .*fineweb_val_000001.bin has {len(good)} tokens"):
        tg.load_byte_counter(h)
    side.unlink()
    with pytest.raises(FileNotFoundError, match=rf"val byte sidecar {re.escape(str(side))} is missing"):
        tg.load_byte_counter(h)
    tg.write_shard(side, good)
    tg.write_shard(d / "fineweb_val_bytes_000099.bin", good)
    with pytest.raises(ValueError, match="fineweb_val_bytes_000099.bin has no val shard"):
        tg.load_byte_counter(h)


def test_tokenizer_and_dataset_must_agree_on_caseops(corpora):
    caseops_h, plain_h = corpora["caseops"]["h"], corpora["plain"]["h"]
    wrong = tg.Hyperparameters(**{**tg.asdict(caseops_h), "tokenizer_path": str(SP8192)})
    with pytest.raises(ValueError, match=rf"DATA_PATH={re.escape(caseops_h.data_path)} has a val byte sidecar .* "
                                         rf"TOKENIZER_PATH={re.escape(str(SP8192))} lacks the CaseOps operators"):
        tg.load_byte_counter(wrong)
    wrong = tg.Hyperparameters(**{**tg.asdict(plain_h), "tokenizer_path": str(CASEOPS_SP)})
    with pytest.raises(ValueError, match=rf"TOKENIZER_PATH={re.escape(str(CASEOPS_SP))} is a CaseOps tokenizer but "
                                         rf"DATA_PATH={re.escape(plain_h.data_path)} has no val byte sidecar"):
        tg.load_byte_counter(wrong)
    wrong = tg.Hyperparameters(**{**tg.asdict(caseops_h), "vocab_size": 1024})
    with pytest.raises(ValueError, match=rf"VOCAB_SIZE=1024 but {re.escape(str(CASEOPS_SP))} has 8192 pieces"):
        tg.load_byte_counter(wrong)
