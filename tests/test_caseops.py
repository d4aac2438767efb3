"""data/caseops.py: the CaseOps transform is a bijection on any text; per-piece original byte counts."""
from __future__ import annotations

import importlib.util

import pytest
from hypothesis import given, settings, strategies as st

from conftest import CASEOPS_SP, ROOT

_spec = importlib.util.spec_from_file_location("caseops", ROOT / "data" / "caseops.py")
co = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(co)
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
