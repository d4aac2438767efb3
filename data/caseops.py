"""CaseOps: a lossless case transform that lets a lowercase tokenizer see every word once (stdlib only).

    encode("The NASA Launch")  == "\\ue001the \\ue002nasa \\ue001launch"
    decode(encode(text)) == text   for every Unicode string

Maximal runs of ASCII letters are lowered and their case is written as operator characters from the Unicode
private-use area, each a reserved piece (ids 4-7) of the CaseOps SentencePiece model:

    TITLE   U+E001  the run's first letter is uppercase (alone, or before the mixed-case marks below)
    ALLCAPS U+E002  the whole run (>= 2 letters) is uppercase
    CAPNEXT U+E003  the next letter is uppercase (the later capitals of a mixed-case run: "iPhone" -> i<C>phone)
    ESC     U+E004  the next character is a literal U+E001..U+E004 of the source text

Digits, punctuation and non-ASCII characters end a run and pass through unchanged ("NAÏVE" -> <A>naÏ<A>ve).
`decode` rejects every string that `encode` cannot produce (a misplaced marker, an uppercase ASCII letter, a
non-canonical marking such as ALLCAPS on one letter), so the two are inverse bijections.

`original_byte_counts` gives, per tokenizer piece of a transformed document, the UTF-8 bytes of the original text
that the piece stands for: operators 0, an escaped operator its 3 bytes, the space marker U+2581 one byte, a
byte-fallback piece its byte. It runs the decoder's state machine, so a piece's count never depends on guessing.
"""
from __future__ import annotations

import re

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}
SPACE_MARK = "\u2581"  # SentencePiece's surface form of a space
_MARKED = re.compile("[A-Za-z]+|[\ue001-\ue004]")  # what encode rewrites; everything else passes through


def _is_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _encode_run(word: str) -> str:
    if word.islower():
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + word.lower()
    head = TITLE + word[0].lower() if word[0].isupper() else word[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def encode(text: str) -> str:
    """The CaseOps transform of any text."""
    return _MARKED.sub(lambda m: ESC + m[0] if m[0] in OPERATORS else _encode_run(m[0]), text)


class Decoder:
    """The decoder's state machine, one character at a time: feed(ch) returns the original text ch stands for
    ("" for an operator) and raises ValueError on a marker in a place the encoder never puts one."""

    def __init__(self):
        self.pending, self.caps, self.in_word = None, False, False

    def feed(self, ch: str) -> str:
        pending = self.pending
        if pending == ESC:
            if ch not in OPERATORS:
                raise ValueError(f"ESC must be followed by one of U+E001..U+E004, got {ch!r}")
            self.pending, self.caps, self.in_word = None, False, False
            return ch
        if ch in OPERATORS:
            if pending is not None:
                raise ValueError(f"{NAMES[pending]} followed by {NAMES[ch]}")
            if ch in (TITLE, ALLCAPS) and self.in_word:
                raise ValueError(f"{NAMES[ch]} inside a word (it must start a run of ASCII letters)")
            if ch == CAPNEXT and (not self.in_word or self.caps):
                raise ValueError("CAPNEXT outside a mixed-case word")
            self.pending = ch
            return ""
        if _is_letter(ch):
            self.caps = self.caps or pending == ALLCAPS
            self.pending, self.in_word = None, True
            return ch.upper() if pending is not None or self.caps else ch
        if pending is not None:
            raise ValueError(f"{NAMES[pending]} must be followed by an ASCII letter, got {ch!r}")
        self.caps = self.in_word = False
        return ch

    def finish(self) -> None:
        if self.pending is not None:
            raise ValueError(f"text ends after {NAMES[self.pending]}")


def decode(text: str) -> str:
    """The inverse of encode; ValueError (naming the position) for any string encode cannot produce."""
    dec, out = Decoder(), []
    for i, ch in enumerate(text):
        try:
            out.append(dec.feed(ch))
        except ValueError as e:
            raise ValueError(f"CaseOps decode at character {i}: {e}") from None
    try:
        dec.finish()
    except ValueError as e:
        raise ValueError(f"CaseOps decode at the end: {e}") from None
    result = "".join(out)
    if encode(result) != text:  # uppercase letters in the input, ALLCAPS on one letter, CAPNEXT where TITLE belongs...
        at = next(i for i, (a, b) in enumerate(zip(encode(result) + "\0", text + "\0")) if a != b)
        raise ValueError(f"CaseOps decode at character {at}: not the canonical encoding of its decoded text")
    return result


def original_byte_counts(pieces) -> list[int]:
    """Original UTF-8 bytes per piece of ONE transformed document (no BOS): str pieces are surfaces (U+2581 = a
    space, 1 byte), bytes objects are byte-fallback pieces (their length), None is a control piece (0).

    The counts sum to len(decode(surface text).encode()). A document must end outside a marker (ValueError)."""
    dec, counts = Decoder(), []
    for piece in pieces:
        if piece is None:
            counts.append(0)
        elif isinstance(piece, bytes):
            for b in piece:  # an ASCII byte is that character; any other byte is part of a non-ASCII one
                dec.feed(chr(b) if b < 0x80 else "\x80")
            counts.append(len(piece))
        else:
            counts.append(sum(len(dec.feed(" " if c == SPACE_MARK else c).encode("utf-8")) for c in piece))
    dec.finish()
    return counts


def normalized(sp, text: str) -> str:
    """The text as SentencePiece model `sp` normalizes it (NFKC, whitespace runs -> one space, stripped): what
    the builders transform, so the original bytes are the normalized bytes a plain tokenizer's LUT counts."""
    return sp.normalize(text).replace(SPACE_MARK, " ")


def piece_surfaces(sp) -> list:
    """Per id of SentencePiece model `sp`, what original_byte_counts reads: the piece string, the byte of a
    byte-fallback piece, None for a control or unknown piece."""
    return [None if sp.is_control(i) or sp.is_unknown(i) else bytes([int(sp.id_to_piece(i)[3:5], 16)])
            if sp.is_byte(i) else sp.id_to_piece(i) for i in range(sp.vocab_size())]
