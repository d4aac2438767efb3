"""Pack a Python script into a small self-contained wrapper (LZMA + base85).

    python3 tools/pack.py SRC.py OUT.py          # write OUT.py, print raw and packed byte counts
    python3 tools/pack.py --unpack OUT.py SRC.py  # recover the source, byte for byte

OUT.py is one ASCII line:

    exec(compile(__import__("lzma").decompress(__import__("base64").b85decode("...")),__file__,"exec"))

- compile(..., __file__, "exec") gives every code object the wrapper's real path as co_filename, so tracebacks
  name the shipped file with the original line numbers, and Numba's @njit(cache=True) finds a source file to key
  its cache on (a plain exec of a string has co_filename "<string>" and Numba refuses to cache).
- exec runs in the wrapper's own globals, so __name__ == "__main__" works when run as a script, and importing the
  wrapper as a module defines exactly the original's top-level names (no helper names: __import__ is used inline).
- The source is stored byte-identical (comments, docstrings, encoding); unpack(pack_source(s)) == s.
- Limits of the wrapper: anything that reads source text at runtime (inspect.getsource, Triton's @triton.jit) sees
  the wrapper, and traceback *lines* show the wrapper's text (file names and line numbers are right).

The packing itself is train_gpt.pack_source (the run counts its own shipped bytes with it); this tool is its CLI.
The legacy .lzma ("alone") container is used at the strongest preset (xz and raw LZMA2 were never shorter), over a
small grid of literal/position bits; the shortest wins. Output is deterministic for a given liblzma.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def _bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def pack_bytes(data: bytes, search: bool = True) -> str:
    """Return the wrapper text (ASCII) for the raw source bytes `data`."""
    return tg.pack_source(bytes(data), search=search).decode("ascii")


def pack_source(src_text: str | bytes, search: bool = True) -> str:
    """Return the packed wrapper text for a script's source (str is encoded as UTF-8; bytes are kept as is)."""
    return pack_bytes(_bytes(src_text), search=search)


def is_packed(text: str | bytes) -> bool:
    """True if `text` is a wrapper written by this tool."""
    return tg.PACK_RE.match(_bytes(text)) is not None


def unpack_bytes(packed_text: str | bytes) -> bytes:
    """Return the exact source bytes held by a wrapper."""
    return tg.unpack_source(_bytes(packed_text))


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
