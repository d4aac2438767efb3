#!/usr/bin/env python3
"""The model's val_bpb against the classic compressors on the same val text (CPU only).

    python3 bench/bench_compressors.py [--data-path DIR] [--tokenizer PATH] [--log LOG ...] [--json OUT] [--no-install]

Text: the val span train_gpt scores (tg.load_val_tokens at the cpu preset's eval_seq_len, targets val[1:]), split
at BOS (and at any other zero-byte boundary token such as <unk>, which BPB counts as no bytes), each document
decoded with sentencepiece, documents concatenated with no separator. Its UTF-8 byte count must equal the sum of
tg.token_bytes over the scored targets (the BPB denominator); the script checks this and stops if it does not hold.
The compressors thus get no document boundaries, while the model pays for them in the NLL of each BOS target (zero
bytes): a small handicap for the model, not for the compressors.

Codecs, at the settings of the CLI flags they stand for: gzip -9, bzip2 -9, xz -9e (stdlib gzip/bz2/lzma), zstd
--ultra -22 (zstandard package, level 22, checksum and content size on as the CLI writes them), zpaq -m5 (the PyPI
`zpaq` package: libzpaq in process at level 5, one thread; a context-mixing compressor), and 7z PPMd through
the 7z CLI (`7z a -t7z -m0=PPMd -mx=9`, the order and model memory 7z chose are printed, memN meaning 2^N bytes;
installed with `apt-get install -y p7zip-full` when missing and running as root, else skipped with a note).
Python's gzip is zlib's deflate encoder, not GNU gzip's, and the zstandard package bundles its own libzstd: their
sizes can differ from the CLIs' by a few hundred bytes. Every blob is decompressed and compared with the text.
bpb = 8 * compressed bytes / text bytes. Defaults: the PRESET=cpu data and tokenizer paths.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import train_gpt as tg  # noqa: E402

FINAL_SCORE = re.compile(r"^final_score val_loss:(\S+) val_bpb:(\S+)", re.M)
VAL_TOKENS = re.compile(r"\bval_tokens:(\d+)")


# ----------------------------------------------------------------------------- the text BPB counts

def scored_text(val, sp, luts) -> tuple[bytes, int]:
    """(UTF-8 text of the scored targets, sum of token_bytes over them); raises if the two byte counts differ."""
    v = val.numpy().astype(np.int64)
    n_bytes = int(tg.token_bytes(val[:-1].long(), val[1:].long(), luts).sum())
    # Cut before every boundary token (BOS, unknown, ...): it adds no bytes and the next piece's leading space is
    # dropped, as sp.decode drops it at a segment's start (decode would render <unk> as " \u2047 "). Each segment
    # starts with a boundary or with val[0], not a target either: decode what follows.
    segments = np.split(v, np.flatnonzero(luts[2].numpy()[v]))
    text = "".join(sp.decode(s[1:].tolist()) for s in segments if s.size > 1).encode("utf-8")
    if len(text) != n_bytes:
        raise ValueError(f"decoded val text has {len(text)} UTF-8 bytes but token_bytes counts {n_bytes}: "
                         "the compressors would not see the bytes BPB counts")
    return text, n_bytes


def load_val_text(data_path: str, tokenizer: str) -> dict:
    import sentencepiece as spm
    h = tg.Hyperparameters.from_env({"PRESET": "cpu"})
    if not Path(data_path).is_dir():
        raise FileNotFoundError(f"data path {data_path} is not a folder (--data-path)")
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer} does not exist (--tokenizer)")
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    luts = tg.build_bpb_luts(sp, sp.vocab_size())
    pattern = tg.Hyperparameters(data_path=data_path).val_files
    val = tg.load_val_tokens(pattern, h.eval_seq_len)
    text, n_bytes = scored_text(val, sp, luts)
    return dict(text=text, token_bytes=n_bytes, targets=val.numel() - 1, eval_seq_len=h.eval_seq_len,
                val_files=pattern, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- codecs

@dataclass
class Codec:
    name: str
    settings: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]
    detail: Callable[[], str] = lambda: ""  # settings known only after compressing (7z's PPMd order, memory)


def _zstd_codec() -> Codec | None:
    try:
        import zstandard
    except ImportError:
        return None
    # Level 22 is an ultra level in the library; the CLI writes a checksum and the content size by default.
    comp = zstandard.ZstdCompressor(level=22, write_checksum=True, write_content_size=True)
    return Codec("zstd", "zstandard level=22 (= zstd --ultra -22), checksum",
                 comp.compress, lambda b: zstandard.ZstdDecompressor().decompress(b))


class SevenZipPPMd:
    """7z PPMd via the CLI; the archive (headers included) is the size recorded."""

    def __init__(self, exe: str):
        self.exe, self.method = exe, "?"

    def _run(self, *args, cwd) -> bytes:
        r = subprocess.run([self.exe, *args], cwd=cwd, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"{self.exe} {' '.join(args)} failed: {r.stderr.decode(errors='replace')[-400:]}")
        return r.stdout

    def compress(self, data: bytes) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "val.txt").write_bytes(data)
            self._run("a", "-bd", "-t7z", "-m0=PPMd", "-mx=9", "out.7z", "val.txt", cwd=d)
            listing = self._run("l", "-slt", "out.7z", cwd=d).decode(errors="replace")
            # The archive's line says "PPMD"; the file's, last, has the order and memory (mem26 = 2^26 bytes).
            methods = [ln.split("=", 1)[1].strip() for ln in listing.splitlines() if ln.startswith("Method =")]
            self.method = methods[-1] if methods else "?"
            return Path(d, "out.7z").read_bytes()

    def decompress(self, blob: bytes) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "out.7z").write_bytes(blob)
            return self._run("e", "-so", "out.7z", cwd=d)


def _zpaq_codec() -> Codec | None:
    """ZPAQ at its strongest method through the PyPI package (libzpaq in process): level 5 (= zpaq -m5), one thread
    (one block: the best ratio, and deterministic)."""
    try:
        import zpaq
    except ImportError:
        return None
    return Codec("zpaq", "zpaq package level=5 (= zpaq -m5), threads=1",
                 lambda b: zpaq.compress(b, level=5, threads=1), zpaq.decompress)


def find_7z(install: bool) -> tuple[str | None, str]:
    """(path of 7z or None, note); installs p7zip-full with apt-get when allowed, missing and running as root."""
    exe = shutil.which("7z")
    if exe or not install:
        return exe, "" if exe else "7z not found (Debian package p7zip-full)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "7z not found and not root (or no apt-get): install p7zip-full to add 7z PPMd"
    r = subprocess.run(["apt-get", "install", "-y", "-q", "p7zip-full"], capture_output=True, text=True)
    exe = shutil.which("7z")
    return exe, "" if exe else f"apt-get install p7zip-full failed (rc {r.returncode}): {r.stderr.strip()[-200:]}"


def available_codecs(install_7z: bool = False) -> tuple[list[Codec], list[str]]:
    codecs = [
        Codec("gzip", "zlib deflate level 9 (gzip -9), mtime 0, no name", lambda b: gzip.compress(b, 9, mtime=0),
              gzip.decompress),
        Codec("bzip2", "bz2 level 9 (= bzip2 -9)", lambda b: bz2.compress(b, 9), bz2.decompress),
        Codec("xz", "lzma xz preset 9|EXTREME (= xz -9e), crc64",
              lambda b: lzma.compress(b, lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    ]
    notes = []
    zstd = _zstd_codec()
    if zstd:
        codecs.append(zstd)
    else:
        notes.append("zstandard not installed: zstd skipped")
    zp = _zpaq_codec()
    if zp:
        codecs.append(zp)
    else:
        notes.append("zpaq not installed (pip install zpaq): zpaq skipped")
    exe, note = find_7z(install_7z)
    if exe:
        sz = SevenZipPPMd(exe)
        codecs.append(Codec("7z PPMd", "7z a -t7z -m0=PPMd -mx=9", sz.compress, sz.decompress,
                            lambda: f" -> {sz.method}"))
    else:
        notes.append(note)
    return codecs, notes


def measure(codec: Codec, text: bytes, n_bytes: int) -> dict:
    t0 = time.perf_counter()
    blob = codec.compress(text)
    seconds = time.perf_counter() - t0
    if codec.decompress(blob) != text:
        raise RuntimeError(f"{codec.name}: decompressed output differs from the input text")
    return dict(name=codec.name, settings=codec.settings + codec.detail(), bytes=len(blob), bpb=8 * len(blob) / n_bytes,
                seconds=seconds)


# ----------------------------------------------------------------------------- run logs

def parse_final_score(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run log {path} does not exist (--log)")
    text = path.read_text(errors="replace")
    scores = FINAL_SCORE.findall(text)
    if not scores:
        raise ValueError(f"run log {path} has no 'final_score val_loss:X val_bpb:Y' line (unfinished run?)")
    loss, bpb = scores[-1]
    tokens = VAL_TOKENS.findall(text)
    return dict(log=str(path), val_loss=float(loss), val_bpb=float(bpb),
                val_tokens=int(tokens[-1]) if tokens else None)


# ----------------------------------------------------------------------------- report

def span_notes(val: dict, runs: list[dict]) -> list[str]:
    """A log whose val_tokens differs from our target count scored another val span (e.g. an older stand-in)."""
    return [f"{r['log']} scored val_tokens:{r['val_tokens']}, this text covers {val['targets']} targets: "
            "not the same val span, so its bpb is not exactly comparable"
            for r in runs if r["val_tokens"] is not None and r["val_tokens"] != val["targets"]]


def report(val: dict, rows: list[dict], runs: list[dict], notes: list[str]) -> str:
    out = [f"val text: {val['val_files']} ({val['targets']} scored targets, eval_seq_len {val['eval_seq_len']}), "
           f"tokenizer {val['tokenizer']}",
           f"text bytes (UTF-8 of the decoded documents, no separator): {len(val['text'])}; "
           f"sum of tg.token_bytes over the scored targets: {val['token_bytes']}",
           "", f"{'compressor':<22} {'settings':<58} {'bytes':>10} {'bpb':>8} {'CPU s':>7}"]
    for r in rows:
        out.append(f"{r['name']:<22} {r['settings']:<58} {r['bytes']:>10} {r['bpb']:>8.5f} {r['seconds']:>7.2f}")
    for r in runs:
        out.append(f"{'run ' + Path(r['log']).name:<22} {'final_score val_bpb':<58} {'':>10} {r['val_bpb']:>8.5f}")
    everything = [(r["bpb"], r["name"]) for r in rows] + [(r["val_bpb"], "run " + Path(r["log"]).name) for r in runs]
    if everything:
        best = min(everything)
        out += ["", f"lowest bpb: {best[1]} ({best[0]:.5f})"]
    out += [f"note: {n}" for n in notes]
    out.append("CPU seconds are single compress calls on a shared machine (indicative only).")
    return "\n".join(out)


def main(argv=None) -> int:
    h = tg.Hyperparameters.from_env({"PRESET": "cpu"})
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-path", default=str(ROOT / h.data_path), help="folder with fineweb_val_*.bin")
    ap.add_argument("--tokenizer", default=str(ROOT / h.tokenizer_path), help="sentencepiece .model")
    ap.add_argument("--log", nargs="*", default=[], help="run logs with a final_score line")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--no-install", action="store_true", help="skip 7z when missing rather than apt-get it")
    args = ap.parse_args(argv)
    runs = [parse_final_score(p) for p in args.log]  # bad logs fail before the slow part
    val = load_val_text(args.data_path, args.tokenizer)
    codecs, notes = available_codecs(install_7z=not args.no_install)
    rows = [measure(c, val["text"], val["token_bytes"]) for c in codecs]
    notes += span_notes(val, runs)
    print(report(val, rows, runs, notes))
    if args.json:
        meta = {k: v for k, v in val.items() if k != "text"}
        Path(args.json).write_text(json.dumps(dict(val=dict(meta, text_bytes=len(val["text"])), compressors=rows,
                                                   runs=runs, notes=notes), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
