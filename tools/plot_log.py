"""Parse a Parameter Golf training log and plot it: train loss, validation, the pass's running bpb, the ablation.

    python3 tools/plot_log.py logs/RUN.txt [--out plot.png]

The *_RE constants are the log grammar: the lines train_gpt.py prints that tools read. Each is anchored (^...$)
and strict about the number formats the script prints (.4f / .8f / .0f ms), so tests can use them to check that
train_gpt.py's lines stay byte-compatible: `TRAIN_RE.fullmatch(line)`. A float field also accepts nan/inf/-inf,
which is what a diverged run prints. Lines that match nothing (the logged source code, nvidia-smi, ...) are ignored
by parse_log; the `hparams k:v k:v ...` line is split by parse_hparams. `plot_log.py` exits 2 on a log with no line
it recognises.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def _f(decimals: int) -> str:
    return rf"(?:-?\d+\.\d{{{decimals}}}|-?inf|nan)"


_F4, _F8, _F2, _MS = _f(4), _f(8), _f(2), r"-?\d+"

# step:{step}/{iterations} train_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{ms:.2f}ms
TRAIN_RE = re.compile(
    rf"^step:(?P<step>\d+)/(?P<iterations>\d+) train_loss:(?P<train_loss>{_F4}) "
    rf"train_time:(?P<train_time_ms>{_MS})ms step_avg:(?P<step_avg_ms>{_F2})ms$"
)
# step:{step}/{iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} train_time:{ms:.0f}ms step_avg:{ms:.2f}ms
VAL_RE = re.compile(
    rf"^step:(?P<step>\d+)/(?P<iterations>\d+) val_loss:(?P<val_loss>{_F4}) val_bpb:(?P<val_bpb>{_F4}) "
    rf"train_time:(?P<train_time_ms>{_MS})ms step_avg:(?P<step_avg_ms>{_F2})ms$"
)
# final_int8_zlib_roundtrip val_loss:{vl:.4f} val_bpb:{vb:.4f} eval_time:{ms:.0f}ms
ROUNDTRIP_RE = re.compile(
    rf"^final_int8_zlib_roundtrip val_loss:(?P<val_loss>{_F4}) val_bpb:(?P<val_bpb>{_F4}) "
    rf"eval_time:(?P<eval_time_ms>{_MS})ms$"
)
# final_int8_zlib_roundtrip_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}
ROUNDTRIP_EXACT_RE = re.compile(
    rf"^final_int8_zlib_roundtrip_exact val_loss:(?P<val_loss>{_F8}) val_bpb:(?P<val_bpb>{_F8})$"
)
# final_score val_loss:{vl:.8f} val_bpb:{vb:.8f} eval_time:{ms:.0f}ms   (the number we claim; exactly once per log)
FINAL_SCORE_RE = re.compile(
    rf"^final_score val_loss:(?P<val_loss>{_F8}) val_bpb:(?P<val_bpb>{_F8}) eval_time:(?P<eval_time_ms>{_MS})ms$"
)
# {stage} val_loss:{vl:.8f} val_bpb:{vb:.8f} eval_time:{ms:.0f}ms   (timed_eval; pre_quant, int6_roundtrip, ...)
STAGE_RE = re.compile(
    rf"^(?P<stage>[A-Za-z_]\w*) val_loss:(?P<val_loss>{_F8}) val_bpb:(?P<val_bpb>{_F8}) "
    rf"eval_time:(?P<eval_time_ms>{_MS})ms$"
)
# stopping_early: wallclock_cap train_time:{ms:.0f}ms step:{step}/{iterations}
STOPPING_EARLY_RE = re.compile(
    rf"^stopping_early: wallclock_cap train_time:(?P<train_time_ms>{_MS})ms step:(?P<step>\d+)/(?P<iterations>\d+)$"
)
# Serialized model int6+{compressor}: {n} bytes   /   Code size: {n} bytes   /   Total submission size int6+{c}: {n} bytes
MODEL_BYTES_RE = re.compile(r"^Serialized model (?P<format>\S+): (?P<bytes>\d+) bytes$")
CODE_BYTES_RE = re.compile(r"^Code size: (?P<bytes>\d+) bytes$")
TOTAL_BYTES_RE = re.compile(r"^Total submission size (?P<format>\S+): (?P<bytes>\d+) bytes$")
# artifact sha256:{hex} bytes:{n} path:{path}   (the file the score was measured on)
ARTIFACT_RE = re.compile(r"^artifact sha256:(?P<sha256>[0-9a-f]{64}) bytes:(?P<bytes>\d+) path:(?P<path>.+)$")
# eval_only artifact:{path}   (a run that scored a saved artifact without training)
EVAL_ONLY_RE = re.compile(r"^eval_only artifact:(?P<path>.+)$")
# warmdown:start step:{step} lr_mult:{mult:.4f}   (the first step whose LR multiplier is below 1)
WARMDOWN_RE = re.compile(rf"^warmdown:start step:(?P<step>\d+) lr_mult:(?P<lr_mult>{_F4})$")
# qat:on step:{step} lr_mult:{mult:.4f} fake_quant_elements:{n} bank_elements:{n}
QAT_RE = re.compile(rf"^qat:on step:(?P<step>\d+) lr_mult:(?P<lr_mult>{_F4}) fake_quant_elements:\d+ bank_elements:\d+$")
# {label} chunk:{c}/{n} elapsed:{s:.1f}s eta:{s:.1f}s rank0_bpb {track}:{bpb:.4f} {track}:{bpb:.4f} ...
_TRACK = rf"[A-Za-z_][\w+]*:{_f(4)}"
PASS_RE = re.compile(
    rf"^(?P<label>[A-Za-z_]\w*) chunk:(?P<chunk>\d+)/(?P<n_chunks>\d+) elapsed:(?P<elapsed_s>{_f(1)})s "
    rf"eta:(?P<eta_s>{_f(1)})s rank0_bpb (?P<tracks>{_TRACK}(?: {_TRACK})*)$"
)
# ablation track:{track} val_loss:{vl:.8f} val_bpb:{vb:.8f}   (every track of the pass, in pool order)
ABLATION_RE = re.compile(rf"^ablation track:(?P<track>[A-Za-z_][\w+]*) val_loss:(?P<val_loss>{_F8}) val_bpb:(?P<val_bpb>{_F8})$")
# hparams {k}:{v} {k}:{v} ...   (every Hyperparameters field, str(v); values may be empty)
HPARAMS_RE = re.compile(r"^hparams (?P<fields>[A-Za-z_]\w*:.*)$")
_HPARAM_KEY_RE = re.compile(r"^[A-Za-z_]\w*:")

_INT_FIELDS = {"step", "iterations", "bytes", "chunk", "n_chunks"}
_STR_FIELDS = {"stage", "format", "sha256", "path", "label", "track", "tracks"}


def _fields(m: re.Match) -> dict:
    out = {}
    for k, v in m.groupdict().items():
        if k in _STR_FIELDS:
            out[k] = v
        elif k in _INT_FIELDS:
            out[k] = int(v)
        else:
            out[k] = float(v)
    return out


def parse_hparams(fields: str) -> dict[str, str]:
    """`k:v k:v ...` -> {k: v} (strings, as logged). A space-separated piece that is not `name:` continues the
    previous value, so a path with a space survives; a repeated key is an error (the line is then not one config)."""
    out: dict[str, str] = {}
    key = None
    for piece in fields.split(" "):
        if _HPARAM_KEY_RE.match(piece):
            key, value = piece.split(":", 1)
            if key in out:
                raise ValueError(f"hparams line repeats the field {key!r}")
            out[key] = value
        elif key is None:
            raise ValueError(f"hparams line does not start with name:value: {fields[:60]!r}")
        else:
            out[key] += " " + piece
    return out


def parse_log(text: str) -> dict:
    """Parse a log's text. Returns a dict:

    train: [ {step, iterations, train_loss, train_time_ms, step_avg_ms}, ... ]   (in log order)
    val:   [ {step, iterations, val_loss, val_bpb, train_time_ms, step_avg_ms}, ... ]
    stages: {stage: {stage, val_loss, val_bpb, eval_time_ms}}   (every timed_eval line, last one per label wins;
            includes final_score)
    roundtrip / roundtrip_exact / final_score: the last such line's fields, or None
    final_score_count: how many final_score lines there are (a valid log has exactly 1)
    stopping_early: {train_time_ms, step, iterations} or None
    model_bytes / code_bytes / total_bytes: ints from the size lines, or None
    artifact: {sha256, bytes, path} from the last `artifact` line, or None; eval_only: its artifact path, or None
    hparams: {field: value as logged} from the last hparams line, or None; hparams_count: how many there are
    warmdown_step / qat_step: the step of the warmdown:start / qat:on line, or None
    passes: {label: [ {chunk, n_chunks, elapsed_s, eta_s, bpb: {track: running bpb}}, ... ]}   (progress lines)
    ablation: {track: {val_loss, val_bpb}}   (in log order: neural, +bias, +n-gram, mixture)
    """
    d: dict = dict(train=[], val=[], stages={}, roundtrip=None, roundtrip_exact=None, final_score=None,
                   final_score_count=0, stopping_early=None, model_bytes=None, code_bytes=None, total_bytes=None,
                   artifact=None, eval_only=None, hparams=None, hparams_count=0, warmdown_step=None,
                   qat_step=None, passes={}, ablation={})
    for line in text.splitlines():
        line = line.rstrip("\r")
        if not line or line[0] in " \t":
            continue
        if m := TRAIN_RE.match(line):
            d["train"].append(_fields(m))
        elif m := VAL_RE.match(line):
            d["val"].append(_fields(m))
        elif m := ROUNDTRIP_RE.match(line):
            d["roundtrip"] = _fields(m)
        elif m := ROUNDTRIP_EXACT_RE.match(line):
            d["roundtrip_exact"] = _fields(m)
        elif m := STAGE_RE.match(line):
            f = _fields(m)
            d["stages"][f["stage"]] = f
            if FINAL_SCORE_RE.match(line):
                del f["stage"]
                d["final_score"] = f
                d["final_score_count"] += 1
        elif m := STOPPING_EARLY_RE.match(line):
            d["stopping_early"] = _fields(m)
        elif m := MODEL_BYTES_RE.match(line):
            d["model_bytes"] = int(m["bytes"])
        elif m := CODE_BYTES_RE.match(line):
            d["code_bytes"] = int(m["bytes"])
        elif m := TOTAL_BYTES_RE.match(line):
            d["total_bytes"] = int(m["bytes"])
        elif m := ARTIFACT_RE.match(line):
            d["artifact"] = _fields(m)
        elif m := EVAL_ONLY_RE.match(line):
            d["eval_only"] = m["path"]
        elif m := WARMDOWN_RE.match(line):
            d["warmdown_step"] = int(m["step"])
        elif m := QAT_RE.match(line):
            d["qat_step"] = int(m["step"])
        elif m := PASS_RE.match(line):
            f = {k: v for k, v in _fields(m).items() if k not in ("label", "tracks")}
            f["bpb"] = {k: float(v) for k, v in (t.rsplit(":", 1) for t in m["tracks"].split(" "))}
            d["passes"].setdefault(m["label"], []).append(f)
        elif m := ABLATION_RE.match(line):
            f = _fields(m)
            d["ablation"][f.pop("track")] = f
        elif m := HPARAMS_RE.match(line):
            d["hparams"] = parse_hparams(m["fields"])
            d["hparams_count"] += 1
    return d


def recognised_anything(parsed: dict) -> bool:
    """Whether parse_log found any line of the grammar (False for an empty or foreign file)."""
    return any(v is not None and v != [] and v != {} for k, v in parsed.items() if not k.endswith("_count"))


def _panel_train(ax, parsed: dict) -> None:
    tr = parsed["train"]
    ax.plot([p["step"] for p in tr], [p["train_loss"] for p in tr], lw=1, color="tab:blue", label="train_loss")
    for key, name, color in (("warmdown_step", "warmdown start", "tab:green"), ("qat_step", "QAT on", "tab:purple")):
        if parsed.get(key) is not None:
            ax.axvline(parsed[key], color=color, ls="--", lw=1, label=f"{name} (step {parsed[key]})")
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title="train loss")
    ax.legend(loc="upper right")


def _panel_val(ax, parsed: dict) -> None:
    va = parsed["val"]
    ax.plot([p["step"] for p in va], [p["val_bpb"] for p in va], "o-", ms=3, color="tab:orange", label="val_bpb")
    ax.set(xlabel="step", ylabel="val_bpb (bits/byte)", title="validation during training")
    ax.legend(loc="upper right")


def _panel_pass(ax, label: str, points: list[dict]) -> None:
    """Running bpb of every track over the chunks: the gaps are what each adaptive component adds."""
    for track in points[-1]["bpb"]:
        pts = [p for p in points if track in p["bpb"]]
        ax.plot([p["chunk"] for p in pts], [p["bpb"][track] for p in pts], ".-", ms=3, lw=1, label=track)
    ax.set(xlabel=f"chunk (of {points[-1]['n_chunks']})", ylabel="running bpb (rank 0)", title=f"{label}: running bpb")
    ax.legend(loc="upper right", fontsize=8)


def _bars(parsed: dict) -> list[tuple[str, float, str]]:
    """(name, bpb, colour): the ablation in pool order, then the plain-scoring diagnostics beside it."""
    bars = [(k, v["val_bpb"], "tab:blue") for k, v in parsed["ablation"].items()]
    if not bars and parsed["final_score"]:
        bars.append(("final_score", parsed["final_score"]["val_bpb"], "tab:red"))
    diag = {k: v["val_bpb"] for k, v in parsed["stages"].items() if k != "final_score"}
    rt = parsed["roundtrip_exact"] or parsed["roundtrip"]
    if rt:
        diag["final_int8_zlib_roundtrip"] = rt["val_bpb"]
    return bars + [(k, v, "tab:gray") for k, v in diag.items()]


def _panel_bars(ax, bars: list[tuple[str, float, str]]) -> None:
    names, vals, colors = zip(*bars)
    ax.bar(range(len(bars)), vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
    lo, hi = min(vals), max(vals)
    ax.set_ylim(lo - 0.6 * (hi - lo) - 1e-3, hi + 0.3 * (hi - lo) + 1e-3)  # zoom: the differences are small
    ax.set_xticks(range(len(bars)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="bpb", title="ablation (blue) and diagnostics (gray)")


def plan_panels(parsed: dict) -> list[tuple[str, object]]:
    """[(name, draw(ax))]: only the panels the log has data for (no empty validation panel)."""
    panels = []
    if parsed["train"]:
        panels.append(("train", lambda ax: _panel_train(ax, parsed)))
    if parsed["val"]:
        panels.append(("val", lambda ax: _panel_val(ax, parsed)))
    for label, points in parsed.get("passes", {}).items():
        panels.append((f"pass:{label}", lambda ax, label=label, points=points: _panel_pass(ax, label, points)))
    bars = _bars(parsed)
    if bars:
        panels.append(("bars", lambda ax: _panel_bars(ax, bars)))
    return panels


def plot_log(parsed: dict, out_path: str | Path, title: str = "") -> Path:
    """One panel per thing the log holds: train loss (warmdown start and QAT on marked), the validation curve,
    each pass's running bpb per track over its chunks, the ablation bars with the diagnostics; write a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [draw for _, draw in plan_panels(parsed)]
    n = max(len(panels), 1)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), dpi=100, squeeze=False)
    flat = axes.ravel()
    for ax, draw in zip(flat, panels):
        draw(ax)
        ax.grid(alpha=0.3)
    if not panels:
        flat[0].text(0.5, 0.5, "no train, val or eval lines", ha="center", va="center", transform=flat[0].transAxes)
    for ax in flat[len(panels) or 1:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, format="png")
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot train loss and val_bpb from a Parameter Golf log.")
    p.add_argument("log")
    p.add_argument("--out", help="PNG path (default: LOG with .png suffix)")
    a = p.parse_args(argv)
    log = Path(a.log)
    try:
        d = parse_log(log.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError) as e:
        print(f"error: {log}: {e}", file=sys.stderr)
        return 2
    if not recognised_anything(d):
        print(f"error: {log}: no line of a train_gpt.py log (step, val, final_score, sizes, hparams); nothing to plot",
              file=sys.stderr)
        return 2
    out = plot_log(d, a.out or log.with_suffix(".png"), title=log.name)
    fs = d["final_score"]
    print(f"train points: {len(d['train'])}  val points: {len(d['val'])}  "
          f"final_score val_bpb: {fs['val_bpb']:.8f}" if fs else "final_score: none")
    if d["final_score_count"] > 1:
        print(f"warning: {d['final_score_count']} final_score lines (expected exactly 1)", file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
