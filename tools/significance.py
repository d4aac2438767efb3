"""Seeds and significance for a record: the logs of N seeds of one config -> per-seed scores, mean and std, and
one-sided t-tests on val_loss (nats); with --out, written into the record folder's submission.json.

    python3 tools/significance.py --logs runs/s1/logs/A.txt runs/s2/logs/B.txt runs/s3/logs/C.txt \\
        --record-loss 1.89020000 [--baseline OLD1.txt OLD2.txt OLD3.txt] [--margin 0.005] [--alpha 0.01] \\
        [--out records/NAME/]

The challenge's rule: a new record beats the current one by >= 0.005 nats at p < 0.01. Two tests, each one-sided
("less"), on the final_score val_loss of each log:
  record:   one-sample t-test (scipy.stats.ttest_1samp) that mean(val_loss) < --record-loss - margin; df = N - 1
  baseline: Welch's t-test (scipy.stats.ttest_ind, equal_var=False) that mean(val_loss) < mean(baseline) - margin,
            i.e. mean(val_loss + margin) < mean(baseline); df by Welch-Satterthwaite
Each needs >= 2 logs per group (a sample std). A test "passes" when p < alpha.

The logs of a group must be one config: the same hparams line apart from IGNORED_FIELDS (per-run identity and where
the files went) and the same logged script source; otherwise the differing fields are named, with each log's value.
The seeds must differ (repeated seeds are not independent samples).

--out records/NAME/ (a folder made by tools/make_submission.py from one of the seeds) gains the fields "seeds",
"val_loss_mean", "val_bpb_mean", "val_loss_std", "val_bpb_std" (sample std, ddof=1) and "significance" in its
submission.json, a copy of each seed's log as train_seed<SEED>.log, and a "## Seeds and significance" section in
README.md. Its train.log must be one of --logs, byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_submission as ms  # noqa: E402

# hparams fields that may differ between the seeds of one config: identity of the run and where its files went.
IGNORED_FIELDS = ("seed", "run_id", "author", "github_id", "out_dir")
MARGIN_NATS = 0.005
ALPHA = 0.01
SOURCE_FIELD = "source_sha256"  # the logged train_gpt.py source, compared like an hparams field
SOURCE_END = "=" * 100  # train_gpt.py logs its source, then this line
README_SECTION = "## Seeds and significance"


class SignificanceError(Exception):
    """Bad input: the message names the log, field and values."""


@dataclass(frozen=True)
class SeedRun:
    path: Path
    seed: int
    run_id: str
    val_loss: float
    val_bpb: float
    config: dict  # hparams minus IGNORED_FIELDS, plus SOURCE_FIELD


def logged_source_sha256(text: str) -> str | None:
    """sha256 of the script source at the top of the log (everything before the first SOURCE_END line), or None."""
    lines = text.split("\n")
    if SOURCE_END not in lines:
        return None
    src = "\n".join(lines[:lines.index(SOURCE_END)])
    return hashlib.sha256(src.encode("utf-8")).hexdigest()


def load_run(path: str | Path) -> SeedRun:
    """One seed's log -> its seed, run_id, finite final_score and config. SignificanceError names the log."""
    path = Path(path)
    try:
        _, text, parsed = ms.parse_log_file(path)
    except (OSError, ms.SubmissionError) as e:
        raise SignificanceError(str(e)) from None
    if parsed["final_score_count"] != 1:
        raise SignificanceError(f"{path}: needs exactly one final_score line, found {parsed['final_score_count']}")
    fs = parsed["final_score"]
    if not (math.isfinite(fs["val_loss"]) and math.isfinite(fs["val_bpb"])):
        raise SignificanceError(f"{path}: final_score val_loss:{fs['val_loss']} val_bpb:{fs['val_bpb']} is not finite")
    if parsed["hparams_count"] != 1:
        raise SignificanceError(f"{path}: needs exactly one hparams line, found {parsed['hparams_count']}")
    hp = parsed["hparams"]
    try:
        seed = int(hp["seed"])
    except (KeyError, ValueError):
        raise SignificanceError(f"{path}: hparams seed:{hp.get('seed', '<absent>')} is not an integer") from None
    config = {k: v for k, v in hp.items() if k not in IGNORED_FIELDS}
    config[SOURCE_FIELD] = logged_source_sha256(text) or "<no logged source>"
    return SeedRun(path, seed, hp.get("run_id", ""), fs["val_loss"], fs["val_bpb"], config)


def check_one_config(runs: list[SeedRun], group: str) -> None:
    """Refuse a group whose logs differ in anything but IGNORED_FIELDS, or repeat a seed."""
    fields = sorted(set().union(*(r.config for r in runs)))
    differ = [f for f in fields if len({r.config.get(f, "<absent>") for r in runs}) > 1]
    if differ:
        rows = [f"  {f}: " + "  ".join(f"{r.path}={r.config.get(f, '<absent>')!r}" for r in runs) for f in differ]
        raise SignificanceError(f"the {group} logs are not one config (ignoring {', '.join(IGNORED_FIELDS)}); "
                                f"they differ in {', '.join(differ)}:\n" + "\n".join(rows))
    seeds = [r.seed for r in runs]
    if dupes := sorted({s for s in seeds if seeds.count(s) > 1}):
        raise SignificanceError(f"the {group} logs repeat seed(s) {dupes}: "
                                + ", ".join(str(r.path) for r in runs if r.seed in dupes))


def summary(runs: list[SeedRun]) -> dict:
    """Per-seed scores and their mean and sample std (ddof=1; None for a single log)."""
    out: dict = {"seeds": [dict(seed=r.seed, run_id=r.run_id, val_loss=r.val_loss, val_bpb=r.val_bpb) for r in runs]}
    for key in ("val_loss", "val_bpb"):
        x = np.array([getattr(r, key) for r in runs], dtype=np.float64)
        out[f"{key}_mean"] = float(x.mean())
        out[f"{key}_std"] = float(x.std(ddof=1)) if len(x) > 1 else None
    return out


def _check_sample(losses: list[float], group: str) -> None:
    if len(losses) < 2:
        raise SignificanceError(f"a t-test needs at least 2 {group} logs (a sample std), got {len(losses)}")


def record_test(losses: list[float], record_loss: float, margin: float = MARGIN_NATS, alpha: float = ALPHA) -> dict:
    """One-sided one-sample t-test: mean(losses) < record_loss - margin."""
    _check_sample(losses, "seed")
    if len(set(losses)) == 1:
        raise SignificanceError(f"all {len(losses)} seeds have val_loss {losses[0]}: no spread, no t-test "
                                f"(did SEED change anything?)")
    threshold = record_loss - margin
    r = stats.ttest_1samp(losses, popmean=threshold, alternative="less")
    return dict(test="one-sample t-test, one-sided: mean val_loss < record_val_loss - margin (scipy.stats.ttest_1samp)",
                record_val_loss=record_loss, threshold=threshold, t=float(r.statistic), df=float(r.df),
                p=float(r.pvalue), passes=bool(r.pvalue < alpha))


def welch_test(losses: list[float], baseline: list[float], margin: float = MARGIN_NATS, alpha: float = ALPHA) -> dict:
    """One-sided Welch test: mean(losses) < mean(baseline) - margin (as mean(losses + margin) < mean(baseline))."""
    _check_sample(losses, "seed")
    _check_sample(baseline, "baseline")
    if len(set(losses)) == 1 and len(set(baseline)) == 1:
        raise SignificanceError("both groups have zero spread in val_loss: no Welch test")
    r = stats.ttest_ind(np.add(losses, margin), baseline, equal_var=False, alternative="less")
    return dict(test="Welch t-test, one-sided: mean val_loss < mean baseline val_loss - margin "
                     "(scipy.stats.ttest_ind, equal_var=False)",
                baseline_val_loss_mean=float(np.mean(baseline)), t=float(r.statistic), df=float(r.df),
                p=float(r.pvalue), passes=bool(r.pvalue < alpha))


def analyse(logs: list, record_loss: float | None = None, baseline: list | None = None,
            margin: float = MARGIN_NATS, alpha: float = ALPHA) -> dict:
    """The fields written into submission.json (see the module docstring)."""
    if not logs:
        raise SignificanceError("no seed logs given")
    if not (0 < alpha < 1) or not (math.isfinite(margin) and margin >= 0):
        raise SignificanceError(f"--alpha {alpha} must lie in (0, 1) and --margin {margin} must be >= 0 nats")
    runs = [load_run(p) for p in logs]
    check_one_config(runs, "seed")
    out = summary(runs)
    losses = [r.val_loss for r in runs]
    sig: dict = dict(margin_nats=margin, alpha=alpha, ignored_fields=list(IGNORED_FIELDS))
    if record_loss is not None:
        if not math.isfinite(record_loss):
            raise SignificanceError(f"--record-loss {record_loss} is not finite")
        sig["record"] = record_test(losses, record_loss, margin, alpha)
    if baseline:
        base = [load_run(p) for p in baseline]
        check_one_config(base, "baseline")
        if shared := sorted({r.run_id for r in runs} & {r.run_id for r in base} - {""}):
            raise SignificanceError(f"run_id(s) {shared} are in both --logs and --baseline")
        sig["baseline"] = welch_test(losses, [r.val_loss for r in base], margin, alpha)
        sig["baseline"]["seeds"] = summary(base)["seeds"]
    out["significance"] = sig
    return out


def _mean_std(result: dict, key: str) -> str:
    std = result[f"{key}_std"]
    return f"{result[f'{key}_mean']:.8f} ± " + ("n/a" if std is None else f"{std:.8f}")


def _verdict(t: dict, alpha: float) -> str:
    verdict = "passes" if t["passes"] else "fails"
    return f"t = {t['t']:.4f}, df = {t['df']:.2f}, p = {t['p']:.3g} ({verdict} p < {alpha})"


def readme_section(result: dict) -> str:
    """Markdown: the per-seed table, mean ± std, and each test's t, df, p."""
    rows = [f"| {s['seed']} | `{s['run_id']}` | {s['val_loss']:.8f} | {s['val_bpb']:.8f} |" for s in result["seeds"]]
    lines = [README_SECTION, "", "| seed | run_id | val_loss (nats) | val_bpb |", "|---|---|---|---|", *rows,
             f"| mean ± std (ddof=1) | | {_mean_std(result, 'val_loss')} | {_mean_std(result, 'val_bpb')} |", ""]
    sig = result["significance"]
    m = sig["margin_nats"]
    if t := sig.get("record"):
        lines.append(f"- record: mean val_loss < {t['record_val_loss']:.8f} - {m} = {t['threshold']:.8f} nats, "
                     f"one-sided one-sample t-test (scipy.stats.ttest_1samp): {_verdict(t, sig['alpha'])}")
    if t := sig.get("baseline"):
        lines.append(f"- baseline: mean val_loss < baseline mean {t['baseline_val_loss_mean']:.8f} - {m} nats "
                     f"({len(t['seeds'])} logs), one-sided Welch t-test (scipy.stats.ttest_ind, equal_var=False): "
                     f"{_verdict(t, sig['alpha'])}")
    lines.append("")
    return "\n".join(lines)


def _with_section(readme: str, section: str) -> str:
    """README text with the section replaced (up to the next `## ` heading) or appended."""
    lines = readme.split("\n")
    if README_SECTION not in lines:
        return readme.rstrip("\n") + "\n\n" + section
    i = lines.index(README_SECTION)
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return "\n".join(lines[:i]) + "\n" + section + ("\n" + "\n".join(lines[j:]) if j < len(lines) else "")


def write_into(folder: str | Path, logs: list, result: dict) -> Path:
    """Update a make_submission folder: submission.json fields, train_seed<SEED>.log copies, README section."""
    folder = Path(folder)
    sj = folder / "submission.json"
    try:
        _, sub = ms.load_submission_json(sj)
        train_log = (folder / "train.log").read_bytes()
    except (OSError, ms.SubmissionError) as e:
        raise SignificanceError(f"{folder} is not a record folder from tools/make_submission.py: {e}") from None
    if not any(Path(p).read_bytes() == train_log for p in logs):
        raise SignificanceError(f"{folder / 'train.log'} is none of the --logs: the headline run must be one of "
                                f"the seeds")
    for p, s in zip(logs, result["seeds"]):
        s["log"] = f"train_seed{s['seed']}.log"
        shutil.copyfile(p, folder / s["log"])
    sub.update(result)
    tmp = sj.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sub, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(sj)
    readme = folder / "README.md"
    old = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    readme.write_text(_with_section(old, readme_section(result)), encoding="utf-8")
    return sj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Per-seed scores, mean/std and significance tests for a record.")
    p.add_argument("--logs", nargs="+", required=True, help="the logs of the N seeds of one config")
    p.add_argument("--record-loss", type=float, help="the current record's val_loss in nats")
    p.add_argument("--baseline", nargs="+", help="logs of the baseline's seeds (Welch's test)")
    p.add_argument("--margin", type=float, default=MARGIN_NATS, help="required improvement in nats [0.005]")
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level [0.01]")
    p.add_argument("--out", help="record folder (from make_submission.py) whose submission.json to update")
    a = p.parse_args(argv)
    try:
        result = analyse(a.logs, a.record_loss, a.baseline, a.margin, a.alpha)
        if a.out:
            write_into(a.out, a.logs, result)
    except SignificanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(readme_section(result), end="")
    if a.out:
        print(f"wrote {Path(a.out) / 'submission.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
