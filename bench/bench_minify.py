"""python-minifier in front of the LZMA code wrapper: shipped bytes saved, and whether the packed script still runs.

    pip install python-minifier && python3 bench/bench_minify.py

For each option set: the minified source's size, the packed (pack_source, no lc/pb search) size, the bytes saved
against packing the source as it is; with --check, the packed minified script is fingerprinted on the tiny pr549
config (tests/fingerprint.py) and compared to the committed fingerprint: training losses and the int6 payload.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

OPTIONS = {  # python_minifier.minify keyword sets; none renames globals (the tests import names from the module)
    "keep docstrings and asserts": dict(remove_literal_statements=False, rename_locals=False, hoist_literals=False,
                                        remove_annotations=False),
    "the record's flags (drop docstrings and asserts)": dict(remove_literal_statements=True, rename_locals=False,
                                                             hoist_literals=False, remove_asserts=True),
    "+ rename locals": dict(remove_literal_statements=True, rename_locals=True, hoist_literals=False,
                            remove_asserts=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fingerprint each packed minified script (slow)")
    args = ap.parse_args()
    import python_minifier
    src = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    base = len(tg.pack_source(src.encode(), search=False))
    print(f"raw {len(src)} B, packed as it is {base} B")
    with tempfile.TemporaryDirectory() as d:
        def fp(script: Path) -> dict:  # on this machine: exact floats differ across CPU types
            out = Path(d) / "fp.json"
            subprocess.run([sys.executable, str(ROOT / "tests" / "fingerprint.py"), str(script), str(out)],
                           check=True, capture_output=True, cwd=ROOT / "tests")
            return json.loads(out.read_text())
        want = fp(ROOT / "tests" / "fingerprints" / "seed_train_gpt.py") if args.check else None
        for label, kw in OPTIONS.items():
            t0 = time.perf_counter()
            mini = python_minifier.minify(src, **kw)
            packed = tg.pack_source(mini.encode(), search=False)
            line = (f"{label}: minified {len(mini)} B, packed {len(packed)} B, saved {base - len(packed)} B, "
                    f"{time.perf_counter() - t0:.1f} s")
            if args.check:
                script = Path(d) / "packed.py"
                script.write_bytes(packed)
                line += f", fingerprint identical: {fp(script) == want}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
