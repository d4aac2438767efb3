"""Assemble a Parameter Golf record folder from a finished run.

    python3 tools/make_submission.py --log logs/RUN.txt --script train_gpt.py \\
        --submission-json submission.json --out records/NAME/ [--force] [--no-pack]

Writes into --out:
  train_gpt.py     the script, packed with tools/pack.py (copied as is if it is already packed, or with --no-pack)
  train.log        the run log, byte for byte
  submission.json  byte for byte, after the checks below
  README.md        a stub with the numbers from submission.json (fill in the method by hand)
  plot.png         train loss and val_bpb against step (tools/plot_log.py)

Checks (any failure is an error naming the field and both values; nothing is written):
  - the log has exactly one `final_score` line;
  - submission.json has every required field, and its val_bpb and val_loss equal the log's final_score to 8 decimals;
  - bytes_total <= 16,000,000 (decimal) and bytes_total == bytes_model + bytes_code;
  - bytes_code >= the size of the train_gpt.py being shipped (the claimed code size may not undercount what ships);
  - where the log has `Code size:` / `Serialized model ...:` / `Total submission size ...:` lines, they agree with
    submission.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pack  # noqa: E402
import plot_log  # noqa: E402

BYTES_LIMIT = 16_000_000
REQUIRED_FIELDS = ("author", "github_id", "name", "blurb", "date", "val_bpb", "val_loss", "bytes_total", "bytes_model",
                   "bytes_code", "steps", "train_seconds", "eval_seconds", "hardware", "seed", "compressor")
OUTPUT_FILES = ("train_gpt.py", "train.log", "submission.json", "README.md", "plot.png")


class SubmissionError(Exception):
    """A check failed; the message names the field and both values."""


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def shipped_script(script_bytes: bytes, do_pack: bool = True) -> bytes:
    """The bytes that ship as train_gpt.py: packed unless already packed or do_pack is False."""
    if not do_pack or pack.is_packed(script_bytes):
        return script_bytes
    return pack.pack_bytes(script_bytes).encode("ascii")


def check_submission(sub: dict, parsed_log: dict, shipped_code_bytes: int) -> None:
    """Raise SubmissionError if submission.json disagrees with the log, the byte cap, or the shipped code size."""
    missing = [k for k in REQUIRED_FIELDS if k not in sub]
    if missing:
        raise SubmissionError(f"submission.json is missing field(s): {', '.join(missing)}")
    n = parsed_log["final_score_count"]
    if n != 1:
        raise SubmissionError(f"log must contain exactly one final_score line, found {n}")
    fs = parsed_log["final_score"]
    for key in ("val_bpb", "val_loss"):
        try:
            claimed = f"{float(sub[key]):.8f}"
        except (TypeError, ValueError):
            raise SubmissionError(f"submission.json {key}={sub[key]!r} is not a number") from None
        logged = f"{fs[key]:.8f}"
        if claimed != logged:
            raise SubmissionError(f"submission.json {key}={claimed} does not match the log's final_score "
                                  f"{key}={logged} (compared to 8 decimals)")
    for key in ("bytes_total", "bytes_model", "bytes_code"):
        if not isinstance(sub[key], int) or isinstance(sub[key], bool):
            raise SubmissionError(f"submission.json {key}={sub[key]!r} is not an integer")
    total, model, code = sub["bytes_total"], sub["bytes_model"], sub["bytes_code"]
    if total > BYTES_LIMIT:
        raise SubmissionError(f"submission.json bytes_total={total:,} exceeds the limit {BYTES_LIMIT:,} "
                              f"(decimal bytes, not MiB) by {total - BYTES_LIMIT:,}")
    if total != model + code:
        raise SubmissionError(f"submission.json bytes_total={total} != bytes_model={model} + bytes_code={code} "
                              f"(= {model + code})")
    if shipped_code_bytes > code:
        raise SubmissionError(f"submission.json bytes_code={code} is smaller than the shipped train_gpt.py "
                              f"({shipped_code_bytes} bytes): ship the file the run measured")
    if shipped_code_bytes < code:
        _warn(f"shipped train_gpt.py is {shipped_code_bytes} bytes but bytes_code={code} "
              f"(conservative; run the packed file to claim {code - shipped_code_bytes} fewer bytes)")
    for key, log_key in (("bytes_code", "code_bytes"), ("bytes_model", "model_bytes"), ("bytes_total", "total_bytes")):
        logged = parsed_log[log_key]
        if logged is not None and logged != sub[key]:
            raise SubmissionError(f"submission.json {key}={sub[key]} does not match the log's {log_key}={logged}")


def readme_text(sub: dict, unpack_cmd: str) -> str:
    m = re.match(r"\s*(\d+)\s*[x\u00d7]", str(sub["hardware"]))
    nproc = int(m[1]) if m else 8

    def row(k, fmt="{}"):
        return f"| `{k}` | {fmt.format(sub[k])} |"

    return "\n".join([
        f"# {sub['name']}",
        "",
        f"{sub['blurb']}",
        "",
        f"**val_bpb {float(sub['val_bpb']):.8f}** · {sub['author']} (@{sub['github_id']}) · {sub['date']}",
        "",
        "| field | value |",
        "|---|---|",
        row("val_bpb", "{:.8f}"),
        row("val_loss", "{:.8f}"),
        f"| `bytes_total` | {sub['bytes_total']:,} (limit {BYTES_LIMIT:,}) |",
        row("bytes_model", "{:,}"),
        row("bytes_code", "{:,}"),
        row("steps"),
        row("train_seconds"),
        row("eval_seconds"),
        row("hardware"),
        row("seed"),
        row("compressor"),
        "",
        "## Method",
        "",
        "TODO: what changed relative to the baseline, and why it helps.",
        "",
        "## Files",
        "",
        "- `train_gpt.py`: the counted script (the file the run executed and measured). If packed, print its source with",
        f"  `{unpack_cmd}`",
        "- `train.log`: the full run log; its last lines carry the `final_score` claimed above.",
        "- `submission.json`: the metadata above.",
        "- `plot.png`: train loss and val_bpb against step.",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"SEED={sub['seed']} torchrun --standalone --nproc_per_node={nproc} train_gpt.py",
        "```",
        "",
    ])


def make_submission(log: str | Path, script: str | Path, submission_json: str | Path, out: str | Path,
                    force: bool = False, do_pack: bool = True) -> Path:
    """Check the inputs and write the record folder; returns its path. Raises SubmissionError on any failure."""
    log, script, submission_json, out = map(Path, (log, script, submission_json, out))
    if out.exists() and not out.is_dir():
        raise SubmissionError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SubmissionError(f"--out {out} is not empty (pass --force to overwrite)")

    log_bytes = log.read_bytes()
    log_text = log_bytes.decode("utf-8", errors="replace")
    parsed = plot_log.parse_log(log_text)
    sub_bytes = submission_json.read_bytes()
    try:
        sub = json.loads(sub_bytes)
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{submission_json} is not valid JSON: {e}") from None
    if not isinstance(sub, dict):
        raise SubmissionError(f"{submission_json} must hold a JSON object")

    script_bytes = script.read_bytes()
    code = shipped_script(script_bytes, do_pack)
    check_submission(sub, parsed, len(code))
    src = pack.unpack_bytes(code) if pack.is_packed(code) else code
    if code.decode("utf-8", "replace") not in log_text and src.decode("utf-8", "replace") not in log_text:
        _warn(f"{log} does not contain the shipped script's source (was the log made by this script?)")

    out.mkdir(parents=True, exist_ok=True)
    (out / "train_gpt.py").write_bytes(code)
    if log.resolve() != (out / "train.log").resolve():
        shutil.copyfile(log, out / "train.log")
    (out / "submission.json").write_bytes(sub_bytes)
    (out / "README.md").write_text(readme_text(sub, pack.unpack_command("train_gpt.py")), encoding="utf-8")
    plot_log.plot_log(parsed, out / "plot.png", title=str(sub["name"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Assemble a Parameter Golf record folder from a finished run.")
    p.add_argument("--log", required=True, help="the run log (logs/RUN.txt)")
    p.add_argument("--script", required=True, help="the training script (readable or already packed)")
    p.add_argument("--submission-json", required=True, help="submission.json written by the run")
    p.add_argument("--out", required=True, help="record folder to create (records/NAME/)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--no-pack", action="store_true", help="ship --script as is instead of packing it")
    a = p.parse_args(argv)
    try:
        out = make_submission(a.log, a.script, a.submission_json, a.out, force=a.force, do_pack=not a.no_pack)
    except SubmissionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in OUTPUT_FILES:
        print(f"{out / name}: {(out / name).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
