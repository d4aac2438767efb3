#!/usr/bin/env python3
"""Download the challenge's pre-tokenized FineWeb export from the Hugging Face hub.

    python3 data/cached_challenge_fineweb.py [--variant sp1024|sp8192|sp8192-caseops] [--train-shards 80]
    python3 data/cached_challenge_fineweb.py --variant sp8192-caseops --from-docs docs_selected.jsonl

Fetches, from the dataset repo willdepueoai/parameter-golf under the remote root `datasets/`
(override with MATCHED_FINEWEB_REPO_ID and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX):

    datasets/manifest.json                                   -> data/manifest.json
    datasets/datasets/fineweb10B_sp1024/fineweb_val_*.bin     -> data/datasets/fineweb10B_sp1024/  (all val shards)
    datasets/datasets/fineweb10B_sp1024/fineweb_train_*.bin   -> the first --train-shards train shards
    datasets/<tokenizer model_path/vocab_path from manifest>  -> data/tokenizers/fineweb_1024_bpe.{model,vocab}

--variant sp8192 comes from kevclark/parameter-golf and sp8192-caseops (with the val byte sidecar
fineweb_val_bytes_*.bin, stored locally in datasets/fineweb10B_sp8192_caseops/) from the canonical CaseOps export
romeerp/parameter-golf-caseops-v1; each export's manifest is kept in its own local file. --from-docs builds a
variant from the challenge's documents with the shipped tokenizer instead (first 50,000 documents = val).

Files already present with the right size are skipped, the tokenizers shipped in data/tokenizers/ included.
Each shard is 100M tokens (~200 MB); the default 80 train shards are 8B tokens (~16 GB). All path and manifest
logic lives in pure functions (plan_downloads, expected_sizes, ...) and the network access in one injectable
downloader, so the logic is testable offline.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # build_offline_corpus and caseops, for --from-docs

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT_PREFIX = "datasets"
DATA_DIR = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
# Variants that live in other exports (same layout): variant -> (repo, dataset dir in that export, local dir).
# sp8192: Kevin Clark's export of the challenge documents; sp8192-caseops: the canonical CaseOps export (the
# 04-18 record's), whose val split has the byte sidecar fineweb_val_bytes_*.bin beside its val shards.
VARIANT_EXPORTS = {
    "sp8192": ("kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb10B_sp8192"),
    "sp8192-caseops": ("romeerp/parameter-golf-caseops-v1", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                       "fineweb10B_sp8192_caseops"),
}
CASEOPS_VARIANTS = {"sp8192-caseops"}
# The tokenizers the repository ships in data/tokenizers/, by size: present with this size means already there.
SHIPPED_TOKENIZER_BYTES = {"fineweb_1024_bpe.model": 253847, "fineweb_8192_bpe.model": 370917,
                           "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model": 366510}
CANONICAL_VAL_DOCS = 50_000  # the challenge's validation set: the first 50,000 documents of docs_selected.jsonl

Downloader = Callable[[str, Path], None]  # (remote path inside the repo, local destination) -> None


def repo_id(variant: str = "sp1024") -> str:
    """MATCHED_FINEWEB_REPO_ID if set, else the export that holds the variant."""
    return os.environ.get("MATCHED_FINEWEB_REPO_ID", VARIANT_EXPORTS.get(variant, (DEFAULT_REPO_ID,))[0])


def manifest_name(repo: str) -> str:
    """Each export's manifest keeps its own local file, so fetching sp1024 then sp8192 never mixes them."""
    return MANIFEST_NAME if repo == DEFAULT_REPO_ID else f"manifest.{repo.replace('/', '--')}.json"


def remote_root_prefix() -> str:
    return os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT_PREFIX)


def dataset_dir_for_variant(variant: str, remote: bool = False) -> str:
    """'sp1024' -> 'fineweb10B_sp1024', 'byte260' -> 'fineweb10B_byte260'; sp8192-caseops -> the local
    'fineweb10B_sp8192_caseops' (remote=True: the export's own name)."""
    if variant in VARIANT_EXPORTS:
        return VARIANT_EXPORTS[variant][1 if remote else 2]
    if variant == "byte260" or re.fullmatch(r"sp[1-9][0-9]*", variant):
        return f"fineweb10B_{variant}"
    raise ValueError(f"unknown variant {variant!r} (expected spN such as sp1024, sp8192-caseops, or byte260)")


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
    name = dataset_dir_for_variant(variant, remote=True)
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
    names = [tg.SHARD_NAME.format(split="val", index=i) for i in range(files_val)]
    if variant in CASEOPS_VARIANTS:  # BPB counts original bytes from the sidecar: one per val shard
        names += [tg.SIDECAR_PREFIX + f"{i:06d}.bin" for i in range(files_val)]
    names += [tg.SHARD_NAME.format(split="train", index=i) for i in range(train_shards)]
    remote_ds, local_ds = (f"datasets/{dataset_dir_for_variant(variant, r)}" for r in (True, False))
    plan = [(remote_path(remote_root, f"{remote_ds}/{n}"), local_path(f"{local_ds}/{n}", data_dir)) for n in names]
    tokenizers = tokenizer_files(manifest, variant)
    return plan + [(remote_path(remote_root, rel), local_path(rel, data_dir)) for rel in tokenizers]


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
            if split == "val":  # a val shard's byte sidecar has its size
                sizes[tg.SIDECAR_PREFIX + f"{i:06d}.bin"] = 4 * tg.SHARD_HEADER_INTS + 2 * n
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
    data_dir, repo = Path(data_dir), repo or repo_id(variant)
    remote_root = remote_root_prefix() if remote_root is None else remote_root
    downloader = downloader or hf_downloader(repo)

    manifest_file = data_dir / manifest_name(repo)
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
        expected = sizes.get(local.name, SHIPPED_TOKENIZER_BYTES.get(local.name))  # a shipped one: skipped, kept
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


def check_val_docs(val_docs, allow_other: bool) -> None:
    """The FineWeb validation set is the first 50,000 documents. Another count is refused unless asked for: a
    smaller one puts the rest of the canonical val set into train (issue #2127: a 10,000 default leaked 80 %)."""
    if not isinstance(val_docs, int) or isinstance(val_docs, bool) or val_docs <= 0:
        raise ValueError(f"--val-docs must be a positive integer, got {val_docs!r}")
    if val_docs != CANONICAL_VAL_DOCS and not allow_other:
        raise ValueError(f"--val-docs {val_docs}: the FineWeb validation set is the first {CANONICAL_VAL_DOCS:,} "
                         f"documents; fewer would train on the rest of it (issue #2127: 10,000 leaked 80 % of val "
                         f"into train). Pass --allow-other-val-docs to build another split anyway")


def _texts(docs_jsonl: Path):
    with open(docs_jsonl, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                yield json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{docs_jsonl}:{line_no}: not a JSON object with a \"text\" field") from None


def build_from_docs(docs_jsonl, variant: str = "sp8192-caseops", train_shards: int = 80, *,
                    val_docs: int = CANONICAL_VAL_DOCS, allow_other_val_docs: bool = False,
                    shard_tokens: int = 10**8, data_dir: Path = DATA_DIR) -> dict:
    """Tokenize docs_selected.jsonl with the variant's shipped tokenizer into data/datasets/<variant dir>/, as
    the challenge's export does: the first val_docs documents are val (never in train), then train shards until
    train_shards are full. CaseOps: normalized, transformed text and the val byte sidecar."""
    import build_offline_corpus as boc  # the stand-in's writer: one shard/sidecar writer for both tools
    import sentencepiece as spm

    check_val_docs(val_docs, allow_other_val_docs)
    check_train_shards(train_shards)
    if variant not in boc.VARIANTS:
        raise ValueError(f"--from-docs builds {', '.join(boc.VARIANTS)} (a shipped tokenizer), not {variant!r}")
    docs_jsonl, data_dir = Path(docs_jsonl), Path(data_dir)
    if not docs_jsonl.is_file():
        raise ValueError(f"--from-docs {docs_jsonl}: no such file")
    n_docs = sum(1 for _ in open(docs_jsonl, "rb"))
    if n_docs <= val_docs:
        raise ValueError(f"--from-docs {docs_jsonl} has {n_docs} documents: none left for train after "
                         f"{val_docs} val documents")
    ds_dir = data_dir / "datasets" / dataset_dir_for_variant(variant)
    if ds_dir.exists() and any(ds_dir.iterdir()):
        raise ValueError(f"{ds_dir} is not empty; move it away first (stale shards would mix into the new set)")
    stem = boc.VARIANTS[variant][2]
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizers" / f"{stem}.model"))
    result = boc.write_dataset(sp, _texts(docs_jsonl), val_docs, ds_dir, shard_tokens, boc.VARIANTS[variant][3],
                               max_train_shards=train_shards)
    print(f"done: {ds_dir} {json.dumps(result['stats'])} val_bytes:{result['val_normalized_bytes']}", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download the challenge FineWeb export from Hugging Face.")
    p.add_argument("--variant", default="sp1024",
                   help="spN (sp1024; sp8192 from kevclark/parameter-golf), sp8192-caseops (with the val byte "
                        "sidecar, from romeerp/parameter-golf-caseops-v1) or byte260")
    p.add_argument("--train-shards", type=int, default=80, help="train shards to fetch or build (100M tokens each)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="local data root (default: this data/ folder)")
    p.add_argument("--from-docs", default=None, metavar="DOCS_JSONL",
                   help="build the variant locally from docs_selected.jsonl with the shipped tokenizer instead")
    p.add_argument("--val-docs", type=int, default=CANONICAL_VAL_DOCS, help="--from-docs: validation documents")
    p.add_argument("--allow-other-val-docs", action="store_true",
                   help=f"--from-docs: accept a --val-docs other than {CANONICAL_VAL_DOCS:,} (not the FineWeb val set)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.from_docs:
            build_from_docs(args.from_docs, args.variant, args.train_shards, val_docs=args.val_docs,
                            allow_other_val_docs=args.allow_other_val_docs, data_dir=Path(args.data_dir))
        else:
            fetch(args.variant, args.train_shards, data_dir=Path(args.data_dir))
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
