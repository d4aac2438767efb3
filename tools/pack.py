"""Pack a Python script into a small self-contained wrapper (LZMA + base85).

    python3 tools/pack.py SRC.py OUT.py          # write OUT.py, print raw and packed byte counts
    python3 tools/pack.py --unpack OUT.py SRC.py  # recover the source, byte for byte

OUT.py is one ASCII line:

    exec(compile(__import__("lzma").decompress(__import__("base64").b85decode("...")ARGS),__file__,"exec"))

- compile(..., __file__, "exec") gives every code object the wrapper's real path as co_filename, so tracebacks
  name the shipped file with the original line numbers, and Numba's @njit(cache=True) finds a source file to key
  its cache on (a plain exec of a string has co_filename "<string>" and Numba refuses to cache).
- exec runs in the wrapper's own globals, so __name__ == "__main__" works when run as a script, and importing the
  wrapper as a module defines exactly the original's top-level names (no helper names: __import__ is used inline).
- The source is stored byte-identical (comments, docstrings, encoding); unpack(pack_source(s)) == s.
- Limits of the wrapper: anything that reads source text at runtime (inspect.getsource, Triton's @triton.jit) sees
  the wrapper, and traceback *lines* show the wrapper's text (file names and line numbers are right).

Several LZMA containers are tried at the strongest preset (xz without check, legacy .lzma "alone", raw LZMA2) over
a small grid of literal/position bits; the shortest complete wrapper wins. Output is deterministic for a given
liblzma.
"""

from __future__ import annotations

import argparse
import base64
import lzma
import re
import sys
from pathlib import Path

PRESET = 9 | lzma.PRESET_EXTREME
_RAW_LZMA2_DEFAULT_DICT = 8 << 20  # what {"id": FILTER_LZMA2} decodes with (preset 6)
_TEMPLATE = 'exec(compile(__import__("lzma").decompress(__import__("base64").b85decode("{data}"){args}),__file__,"exec"))\n'
_WRAPPER_RE = re.compile(
    r'^exec\(compile\(__import__\("lzma"\)\.decompress\(__import__\("base64"\)\.b85decode\("(?P<data>[^"]*)"\)'
    r'(?P<args>[^)]*)\),__file__,"exec"\)\)\r?\n?$'
)


def _dict_size(n: int) -> int:
    size = 4096
    while size < n:
        size *= 2
    return size


def _candidates(data: bytes, search: bool):
    """Yield (compressed_bytes, wrapper_decompress_args) for each container/option combination."""
    dict_size = _dict_size(len(data))
    grid = [(lc, pb) for lc in range(5) for pb in range(3)] if search else [(3, 0)]
    raw_args = ",3,None,[{%s}]" % ('"id":33' if dict_size <= _RAW_LZMA2_DEFAULT_DICT else '"id":33,"dict_size":%d' % dict_size)
    assert lzma.FORMAT_RAW == 3 and lzma.FILTER_LZMA2 == 33  # spelled numerically in the wrapper to save bytes
    for lc, pb in grid:
        opts = dict(preset=PRESET, lc=lc, lp=0, pb=pb, dict_size=dict_size)
        yield lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=[dict(id=lzma.FILTER_LZMA2, **opts)]), ""
        yield lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[dict(id=lzma.FILTER_LZMA1, **opts)]), ""
        yield lzma.compress(data, format=lzma.FORMAT_RAW, filters=[dict(id=lzma.FILTER_LZMA2, **opts)]), raw_args


def pack_bytes(data: bytes, search: bool = True) -> str:
    """Return the wrapper text (ASCII) for the raw source bytes `data`."""
    best = None
    for blob, args in _candidates(data, search):
        text = _TEMPLATE.format(data=base64.b85encode(blob).decode("ascii"), args=args)
        if best is None or len(text) < len(best):
            best = text
    if unpack_bytes(best) != data:  # never ship a wrapper we cannot read back exactly
        raise RuntimeError("pack round-trip failed")
    return best


def pack_source(src_text: str | bytes, search: bool = True) -> str:
    """Return the packed wrapper text for a script's source (str is encoded as UTF-8; bytes are kept as is)."""
    data = src_text.encode("utf-8") if isinstance(src_text, str) else bytes(src_text)
    return pack_bytes(data, search=search)


def is_packed(text: str | bytes) -> bool:
    """True if `text` is a wrapper written by this tool."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return False
    return _WRAPPER_RE.match(text) is not None


def unpack_bytes(packed_text: str | bytes) -> bytes:
    """Return the exact source bytes held by a wrapper."""
    if isinstance(packed_text, bytes):
        packed_text = packed_text.decode("ascii")
    m = _WRAPPER_RE.match(packed_text)
    if m is None:
        raise ValueError("not a packed file written by tools/pack.py")
    blob = base64.b85decode(m["data"])
    args = m["args"]
    if not args:
        return lzma.decompress(blob)
    am = re.fullmatch(r',3,None,\[\{"id":33(?:,"dict_size":(\d+))?\}\]', args)
    if am is None:
        raise ValueError(f"unknown decompress arguments in wrapper: {args!r}")
    filt = {"id": lzma.FILTER_LZMA2}
    if am[1]:
        filt["dict_size"] = int(am[1])
    return lzma.decompress(blob, lzma.FORMAT_RAW, None, [filt])


def unpack(packed_text: str | bytes) -> str:
    """Return the source text held by a wrapper (decoded as UTF-8; use unpack_bytes for other encodings)."""
    return unpack_bytes(packed_text).decode("utf-8")


def unpack_command(path: str = "train_gpt.py") -> str:
    """A stdlib-only shell one-liner that prints the source inside packed file `path` (for record READMEs).

    It evaluates the wrapper's own decompress expression instead of exec'ing it."""
    return f"python3 -c 'import sys;s=open(sys.argv[1]).read();sys.stdout.buffer.write(eval(s[13:s.rindex(\",__file__\")]))' {path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="input file (the readable script, or the packed file with --unpack)")
    p.add_argument("out", help="output file")
    p.add_argument("--unpack", action="store_true", help="recover the source from a packed file")
    p.add_argument("--fast", action="store_true", help="skip the lc/pb search (a few dozen bytes larger)")
    a = p.parse_args(argv)
    data = Path(a.src).read_bytes()
    if a.unpack:
        src = unpack_bytes(data)
        Path(a.out).write_bytes(src)
        print(f"packed: {len(data)} bytes -> raw: {len(src)} bytes ({a.out})")
        return 0
    try:
        compile(data, a.src, "exec")
    except SyntaxError as e:
        print(f"warning: {a.src} does not compile: {e}", file=sys.stderr)
    packed = pack_bytes(data, search=not a.fast).encode("ascii")
    Path(a.out).write_bytes(packed)
    print(f"raw: {len(data)} bytes")
    print(f"packed: {len(packed)} bytes ({len(packed) / max(len(data), 1):.1%}) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
