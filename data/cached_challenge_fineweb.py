#!/usr/bin/env python3
"""Download the challenge's pre-tokenized FineWeb export from the Hugging Face hub.

    python3 data/cached_challenge_fineweb.py [--variant sp1024] [--train-shards 80]

Fetches, from the dataset repo willdepueoai/parameter-golf under the remote root `datasets/`
(override with MATCHED_FINEWEB_REPO_ID and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX):

    datasets/manifest.json                                   -> data/manifest.json
    datasets/datasets/fineweb10B_sp1024/fineweb_val_*.bin     -> data/datasets/fineweb10B_sp1024/  (all val shards)
    datasets/datasets/fineweb10B_sp1024/fineweb_train_*.bin   -> the first --train-shards train shards
    datasets/<tokenizer model_path/vocab_path from manifest>  -> data/tokenizers/fineweb_1024_bpe.{model,vocab}

Files already present with the right size are skipped. Each shard is 100M tokens (~200 MB); the
default 80 train shards are 8B tokens (~16 GB). All path and manifest logic lives in pure functions
(plan_downloads, expected_sizes, ...) and the network access in one injectable downloader, so the
logic is testable offline.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402  (shard names and header size; importing it does no work)

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT_PREFIX = "datasets"
DATA_DIR = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"

Downloader = Callable[[str, Path], None]  # (remote path inside the repo, local destination) -> None


def repo_id() -> str:
    return os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID)


def remote_root_prefix() -> str:
    return os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT_PREFIX)


def dataset_dir_for_variant(variant: str) -> str:
    """'sp1024' -> 'fineweb10B_sp1024', 'byte260' -> 'fineweb10B_byte260'."""
    if variant == "byte260" or re.fullmatch(r"sp[1-9][0-9]*", variant):
        return f"fineweb10B_{variant}"
    raise ValueError(f"unknown variant {variant!r} (expected spN such as sp1024, or byte260)")


def remote_path(prefix: str, relative: str) -> str:
    """Path inside the HF repo of a file that is `relative` to the export root."""
    return f"{prefix.strip('/')}/{relative}" if prefix.strip("/") else relative


def local_path(relative: str, data_dir: Path = DATA_DIR) -> Path:
    """Local destination of a file that is `relative` to the export root; it must stay inside data_dir."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"manifest path {relative!r} must be a relative path inside the export")
    return Path(data_dir) / rel


def dataset_entry(manifest: dict, variant: str) -> dict:
    name = dataset_dir_for_variant(variant)
    for entry in manifest.get("datasets", []):
        if entry.get("name") == name:
            return entry
    names = [e.get("name") for e in manifest.get("datasets", [])]
    raise ValueError(f"dataset {name} is not in the manifest (it has: {', '.join(map(str, names)) or 'none'})")


def tokenizer_files(manifest: dict, variant: str) -> list[str]:
    """Export-relative tokenizer paths (model_path, vocab_path, path) named by the variant's tokenizer entry."""
    tok_name = dataset_entry(manifest, variant).get("tokenizer_name")
    entry = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
    if entry is None:
        raise ValueError(f"tokenizer {tok_name!r} is not in the manifest")
    paths = [str(entry[key]) for key in ("model_path", "vocab_path", "path") if entry.get(key)]
    if not paths:
        raise ValueError(f"tokenizer {tok_name!r} names no files (model_path/vocab_path/path)")
    return paths


def check_train_shards(train_shards) -> None:
    """--train-shards must be a count; checked before any download so a typo fails at once, not after retries."""
    if not isinstance(train_shards, int) or isinstance(train_shards, bool) or train_shards < 0:
        raise ValueError(f"--train-shards must be a non-negative integer, got {train_shards!r}")


def shard_counts(manifest: dict, variant: str) -> tuple[int, int]:
    """(files_val, files_train) from the variant's manifest stats."""
    stats = dataset_entry(manifest, variant).get("stats") or {}
    try:
        return int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("manifest stats lack files_val/files_train") from None


def plan_downloads(manifest: dict, variant: str, train_shards: int, *,
                   remote_root: str = DEFAULT_REMOTE_ROOT_PREFIX, data_dir: Path = DATA_DIR) -> list[tuple[str, Path]]:
    """(remote_path, local_path) for all val shards, the first train_shards train shards and the tokenizer files.

    The manifest itself is not in the plan: it is fetched first, to make the plan.
    """
    check_train_shards(train_shards)
    files_val, files_train = shard_counts(manifest, variant)
    if train_shards > files_train:
        raise ValueError(f"--train-shards {train_shards} is more than the {files_train} train shards "
                         f"that {dataset_dir_for_variant(variant)} has in the manifest (stats.files_train)")
    ds = f"datasets/{dataset_dir_for_variant(variant)}"
    rels = [f"{ds}/" + tg.SHARD_NAME.format(split="val", index=i) for i in range(files_val)]
    rels += [f"{ds}/" + tg.SHARD_NAME.format(split="train", index=i) for i in range(train_shards)]
    rels += tokenizer_files(manifest, variant)
    return [(remote_path(remote_root, rel), local_path(rel, data_dir)) for rel in rels]


def expected_sizes(manifest: dict, variant: str) -> dict[str, int]:
    """{shard file name: bytes} derived from shard_size and the token totals; {} if the manifest can't say.

    The export fills every shard to shard_size tokens except the last one of each split.
    """
    stats = dataset_entry(manifest, variant).get("stats") or {}
    shard_size = manifest.get("shard_size")
    sizes = {}
    for split in ("val", "train"):
        files, tokens = stats.get(f"files_{split}"), stats.get(f"tokens_{split}")
        if not shard_size or files is None or tokens is None or -(-tokens // shard_size) != files:
            return {}
        for i in range(files):
            n = min(shard_size, tokens - i * shard_size)
            sizes[tg.SHARD_NAME.format(split=split, index=i)] = 4 * tg.SHARD_HEADER_INTS + 2 * n
    return sizes


def is_present(path: Path, expected: int | None) -> bool:
    """A file counts as downloaded if it exists, is non-empty and has the expected size when known."""
    return path.is_file() and path.stat().st_size > 0 and (expected is None or path.stat().st_size == expected)


def hf_downloader(repo: str) -> Downloader:
    """A downloader backed by huggingface_hub (imported lazily so this module imports without it)."""

    def download(remote: str, local: Path) -> None:
        from huggingface_hub import hf_hub_download

        parent, _, name = remote.rpartition("/")
        cached = Path(hf_hub_download(repo_id=repo, filename=name, subfolder=parent or None, repo_type="dataset"))
        source = cached.resolve(strict=True)  # the HF cache holds symlinks to blobs; copy the blob itself
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".part")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, local)

    return download


def fetch(variant: str = "sp1024", train_shards: int = 80, *, data_dir: Path = DATA_DIR,
          downloader: Downloader | None = None, remote_root: str | None = None, repo: str | None = None) -> dict:
    """Download the manifest, then every planned file not already present. Returns counts and paths."""
    dataset_dir_for_variant(variant)  # fail fast on bad arguments, before any download (offline retries take ~24 s)
    check_train_shards(train_shards)
    data_dir = Path(data_dir)
    remote_root = remote_root_prefix() if remote_root is None else remote_root
    downloader = downloader or hf_downloader(repo or repo_id())

    manifest_file = data_dir / MANIFEST_NAME
    downloaded = skipped = 0
    if is_present(manifest_file, None):
        skipped += 1
    else:
        downloader(remote_path(remote_root, MANIFEST_NAME), manifest_file)
        downloaded += 1
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))

    plan = plan_downloads(manifest, variant, train_shards, remote_root=remote_root, data_dir=data_dir)
    sizes = expected_sizes(manifest, variant)
    for remote, local in plan:
        expected = sizes.get(local.name)
        if is_present(local, expected):
            skipped += 1
            continue
        print(f"downloading {remote} -> {local}", flush=True)
        downloader(remote, local)
        if not is_present(local, expected):
            raise RuntimeError(f"{local} has {local.stat().st_size if local.exists() else 'no'} bytes after download,"
                               f" expected {expected}")
        downloaded += 1
    print(f"done: {downloaded} downloaded, {skipped} already present, in {data_dir}", flush=True)
    return {"downloaded": downloaded, "skipped": skipped, "plan": plan, "manifest": manifest}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download the challenge FineWeb export from Hugging Face.")
    p.add_argument("--variant", default="sp1024", help="tokenizer variant: spN (sp1024) or byte260")
    p.add_argument("--train-shards", type=int, default=80, help="train shards to fetch (100M tokens each)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="local data root (default: this data/ folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fetch(args.variant, args.train_shards, data_dir=Path(args.data_dir))
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
