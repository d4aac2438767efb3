"""Assemble a Parameter Golf record folder from a finished run.

    python3 tools/make_submission.py --log logs/RUN.txt --script train_gpt.py \\
        --submission-json submission.json --out records/NAME/ [--artifact final_model.int6.ptz] [--force] [--no-pack]

Writes into --out:
  train_gpt.py     the script, packed with tools/pack.py (copied as is if it is already packed, or with --no-pack)
  train.log        the run log, byte for byte
  submission.json  byte for byte, after the checks below
  README.md        a stub with the numbers from submission.json (fill in the method by hand)
  plot.png         train loss and val_bpb against step (tools/plot_log.py)
The artifact is checked, not copied. For a record (3 seeds and the significance test) run tools/significance.py
on the folder afterwards.

Checks (any failure is an error naming the field and both values; nothing is written):
  - submission.json is strict JSON (no NaN/Infinity, no repeated key) holding an object with every required field;
    it is not a validation-subset run (`"val_subset": true`); `"eval_only": true` is fine;
  - the log has exactly one `final_score` line with finite numbers, and submission.json's val_bpb and val_loss are
    finite numbers equal to it to 8 decimals;
  - the log's hparams line has the run_id and seed of submission.json;
  - the artifact (--artifact, default final_model.int6.ptz beside submission.json) has submission.json's
    artifact_sha256 and bytes_model, and so does the log's `artifact sha256:... bytes:...` line where there is one;
  - bytes_total <= 16,000,000 (decimal) and bytes_total == bytes_model + bytes_code;
  - bytes_code >= the size of the train_gpt.py being shipped (the claimed code size may not undercount what ships);
  - where the log has `Code size:` / `Serialized model ...:` / `Total submission size ...:` lines, they agree with
    submission.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pack  # noqa: E402
import plot_log  # noqa: E402

BYTES_LIMIT = 16_000_000
ARTIFACT_NAME = "final_model.int6.ptz"  # what train_gpt.py writes beside submission.json
REQUIRED_FIELDS = ("author", "github_id", "name", "blurb", "date", "val_bpb", "val_loss", "bytes_total", "bytes_model",
                   "bytes_code", "steps", "train_seconds", "eval_seconds", "hardware", "seed", "compressor", "run_id",
                   "artifact_sha256")
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


def _reject_constant(name: str):
    raise SubmissionError(f"{name} is not strict JSON (JSON has no NaN or Infinity)")


def _no_repeated_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if dupes := sorted({k for k in keys if keys.count(k) > 1}):
        raise SubmissionError(f"repeats the key(s) {', '.join(dupes)} (a reader would see only the last)")
    return dict(pairs)


def load_submission_json(path: str | Path) -> tuple[bytes, dict]:
    """(bytes, object) of a strict-JSON submission.json: Python's json module alone would accept NaN, Infinity
    and repeated keys."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        sub = json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{path} is not valid JSON: {e}") from None
    except SubmissionError as e:
        raise SubmissionError(f"{path}: {e}") from None
    if not isinstance(sub, dict):
        raise SubmissionError(f"{path} must hold a JSON object")
    return raw, sub


def check_scores(sub: dict, parsed_log: dict) -> None:
    """One finite final_score in the log, and submission.json's val_bpb/val_loss equal to it to 8 decimals."""
    n = parsed_log["final_score_count"]
    if n != 1:
        raise SubmissionError(f"log must contain exactly one final_score line, found {n}")
    fs = parsed_log["final_score"]
    for key in ("val_bpb", "val_loss"):
        if not math.isfinite(fs[key]):
            raise SubmissionError(f"the log's final_score {key}={fs[key]} is not finite (a diverged run)")
        v = sub[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise SubmissionError(f"submission.json {key}={v!r} is not a number")
        if not math.isfinite(v):
            raise SubmissionError(f"submission.json {key}={v!r} is not finite")
        claimed, logged = f"{v:.8f}", f"{fs[key]:.8f}"
        if claimed != logged:
            raise SubmissionError(f"submission.json {key}={claimed} does not match the log's final_score "
                                  f"{key}={logged} (compared to 8 decimals)")


def check_identity(sub: dict, parsed_log: dict) -> None:
    """The log is the run that wrote submission.json: same run_id and seed on its hparams line."""
    if parsed_log["hparams_count"] != 1:
        raise SubmissionError(f"log must contain exactly one hparams line (it names the run_id), "
                              f"found {parsed_log['hparams_count']}")
    hp = parsed_log["hparams"]
    if not isinstance(sub["run_id"], str) or not sub["run_id"]:
        raise SubmissionError(f"submission.json run_id={sub['run_id']!r} must be a non-empty string")
    for key in ("run_id", "seed"):
        if hp.get(key) != str(sub[key]):
            raise SubmissionError(f"submission.json {key}={sub[key]} does not match the log's hparams "
                                  f"{key}:{hp.get(key, '<absent>')}")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_artifact(sub: dict, parsed_log: dict, artifact: Path) -> None:
    """The artifact file is the one the run measured: its sha256 and size equal submission.json's and the log's."""
    if not artifact.is_file():
        raise SubmissionError(f"artifact {artifact} not found (pass --artifact PATH)")
    size, digest = artifact.stat().st_size, sha256_file(artifact)
    if size != sub["bytes_model"]:
        raise SubmissionError(f"artifact {artifact} is {size} bytes but submission.json bytes_model="
                              f"{sub['bytes_model']}")
    if digest != sub["artifact_sha256"]:
        raise SubmissionError(f"artifact {artifact} has sha256 {digest} but submission.json artifact_sha256="
                              f"{sub['artifact_sha256']}")
    logged = parsed_log["artifact"]
    if logged is not None and (logged["sha256"], logged["bytes"]) != (digest, size):
        raise SubmissionError(f"the log's artifact line sha256:{logged['sha256']} bytes:{logged['bytes']} does not "
                              f"match artifact {artifact} sha256:{digest} bytes:{size}")


def check_bytes(sub: dict, parsed_log: dict, shipped_code_bytes: int) -> None:
    """The byte cap, the byte sum, the shipped code size, and the log's size lines."""
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


def check_submission(sub: dict, parsed_log: dict, shipped_code_bytes: int, artifact: Path) -> None:
    """Raise SubmissionError if submission.json is not a full-validation run, or disagrees with the log, the
    artifact, the byte cap, or the shipped code size. (eval_only runs are fine: they score a saved artifact.)"""
    if sub.get("val_subset", False) is not False:
        raise SubmissionError(f"not a submission: the score uses a validation subset "
                              f"(submission.json val_subset={sub['val_subset']!r})")
    missing = [k for k in REQUIRED_FIELDS if k not in sub]
    if missing:
        raise SubmissionError(f"submission.json is missing field(s): {', '.join(missing)}")
    check_scores(sub, parsed_log)
    check_identity(sub, parsed_log)
    check_bytes(sub, parsed_log, shipped_code_bytes)
    check_artifact(sub, parsed_log, artifact)


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


def parse_log_file(log: Path) -> tuple[bytes, str, dict]:
    """(bytes, text, parse_log(text)) of a run log; a malformed hparams line is a SubmissionError."""
    log_bytes = log.read_bytes()
    log_text = log_bytes.decode("utf-8", errors="replace")
    try:
        return log_bytes, log_text, plot_log.parse_log(log_text)
    except ValueError as e:
        raise SubmissionError(f"{log}: {e}") from None


def make_submission(log: str | Path, script: str | Path, submission_json: str | Path, out: str | Path,
                    force: bool = False, do_pack: bool = True, artifact: str | Path | None = None) -> Path:
    """Check the inputs and write the record folder; returns its path. Raises SubmissionError on any failure.
    artifact defaults to final_model.int6.ptz beside submission_json."""
    log, script, submission_json, out = map(Path, (log, script, submission_json, out))
    artifact = Path(artifact) if artifact is not None else submission_json.parent / ARTIFACT_NAME
    if out.exists() and not out.is_dir():
        raise SubmissionError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SubmissionError(f"--out {out} is not empty (pass --force to overwrite)")

    _, log_text, parsed = parse_log_file(log)
    sub_bytes, sub = load_submission_json(submission_json)

    script_bytes = script.read_bytes()
    code = shipped_script(script_bytes, do_pack)
    check_submission(sub, parsed, len(code), artifact)
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
    p.add_argument("--artifact", help=f"the run's model artifact (default: {ARTIFACT_NAME} beside --submission-json)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--no-pack", action="store_true", help="ship --script as is instead of packing it")
    a = p.parse_args(argv)
    try:
        out = make_submission(a.log, a.script, a.submission_json, a.out, force=a.force, do_pack=not a.no_pack,
                              artifact=a.artifact)
    except (SubmissionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in OUTPUT_FILES:
        print(f"{out / name}: {(out / name).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
