"""`ttt data prepare`: tokenisation (bytes, or a tokenizer.json) into the reference Zarr v3 layout.

Layout (shared with the paper's released Llama-3 datasets): `<root>/train` and
`<root>/val` are flat 1-D token arrays, Blosc-zstd compressed; documents are separated
by BOS. We also write `<root>/meta.json` (fingerprint, counts, BOS id, vocab).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from ttt.data.tokenizer import TextTokenizer, byte_tokenizer
from ttt.errors import UserError
from ttt.paths import cache_root

VAL_PERCENT = 5  # documents whose path hash falls below this go to val
CHUNK_TOKENS = 1 << 20
ENCODE_BATCH = 256  # files handed to the tokenizer at once (it encodes a batch in parallel)
META = "meta.json"
TOKENIZER = "tokenizer.json"  # a copy of the tokenizer, inside the dataset


def stdlib_files() -> list[Path]:
    """The interpreter's own standard-library sources (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    )


def pydocs_root() -> Path:
    """The reStructuredText sources of this interpreter's documentation, as Debian's
    `python3-doc` installs them: prose (tutorials, HOWTOs, library reference) with
    examples, a corpus unlike source code."""
    return Path(f"/usr/share/doc/python3.{sys.version_info.minor}/html/_sources")


def pydocs_files() -> list[Path]:
    root = pydocs_root()
    if not root.is_dir():
        raise UserError(
            f"data.source=pydocs: needs the Python documentation of Debian's python3-doc "
            f"({root} is missing; apt-get install python3-doc)"
        )
    return sorted(p for p in root.rglob("*.rst.txt") if p.is_file())


# Corpora this project builds itself, by name, from what the machine has installed.
BUILTIN = ("stdlib", "pydocs")


def resolve_files(source: str) -> tuple[list[Path], Path | None]:
    """(files, root for relative names) for `stdlib`, `pydocs`, a directory, or a glob."""
    if source == "stdlib":
        return stdlib_files(), Path(sysconfig.get_paths()["stdlib"])
    if source == "pydocs":
        return pydocs_files(), pydocs_root()
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()), path
    files = sorted(Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(
            f"--source={source!r}: matches no file (use stdlib, pydocs, a directory or a glob)"
        )
    return files, None


def _name(path: Path, root: Path | None) -> str:
    return str(path.relative_to(root)) if root is not None else str(path)


def is_val(name: str) -> bool:
    """Deterministic split by document name, independent of file order and machine."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def fingerprint(files: Iterable[Path], root: Path | None, tokenizer: str = "bytes") -> str:
    h = hashlib.sha256(b"" if tokenizer == "bytes" else tokenizer.encode() + b"\0")
    for p in files:
        h.update(_name(p, root).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def write_tokens(root: Path, split: str, tokens: np.ndarray, bos_id: int) -> None:
    import zarr  # deferred: zarr loads only when a dataset is written
    from zarr.codecs import BloscCodec  # deferred: with zarr

    zarr.create_array(
        store=str(root / split),
        data=tokens,
        chunks=(min(CHUNK_TOKENS, max(len(tokens), 1)),),
        compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")],
        attributes={"bos_id": bos_id},
        zarr_format=3,
        overwrite=True,
    )


def read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare(
    source: str,
    out: Path,
    force: bool = False,
    progress: bool = True,
    tokenizer: TextTokenizer | None = None,
) -> dict:
    """Tokenise `source` into `out` (bytes unless a `tokenizer` is given); a no-op when
    `out` already holds the same content tokenised the same way."""

    tok = tokenizer or byte_tokenizer()
    files, root = resolve_files(source)
    if not files:
        raise UserError(f"--source={source!r}: holds no file")
    fp = fingerprint(files, root, tok.digest)
    meta = read_meta(out)
    if not force and meta is not None and meta.get("fingerprint") == fp:
        return meta
    if not force and meta is not None and meta.get("tokenizer_digest", tok.digest) != tok.digest:
        raise UserError(
            f"--out={str(out)!r}: holds a dataset of another tokenizer ({meta.get('tokenizer')}); "
            "runs trained on it would read the new ids wrongly: choose a new --out, or --force"
        )
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    bar = tqdm(
        total=len(files),
        desc=f"tokenising {source}",
        unit="file",
        disable=not progress,
        file=sys.stderr,
    )
    for start in range(0, len(files), ENCODE_BATCH):
        batch = files[start : start + ENCODE_BATCH]
        for p, ids in zip(batch, tok.encode_batch([p.read_bytes() for p in batch]), strict=True):
            split = "val" if is_val(_name(p, root)) else "train"
            parts[split].append(np.concatenate([[tok.bos_id], ids]).astype(tok.dtype))
            docs[split] += 1
        bar.update(len(batch))
    bar.close()
    if sum(len(a) for split in parts.values() for a in split) == len(files):
        raise UserError(f"--source={source!r}: its {len(files)} file(s) hold no text")
    if docs["val"] == 0 or docs["train"] == 0:  # tiny sources: move one document over
        src, dst = ("train", "val") if docs["val"] == 0 else ("val", "train")
        if docs[src] < 2:
            raise UserError(f"--source={source!r}: needs at least 2 documents, found {len(files)}")
        parts[dst].append(parts[src].pop())
        docs[src], docs[dst] = docs[src] - 1, docs[dst] + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a killed prepare never leaves half a dataset
    # that a later run would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    if tok.name != "bytes":  # kept beside the tokens, as a model keeps its tokenizer
        shutil.copyfile(tok.name, tmp / TOKENIZER)
    meta = {
        "source": source if source in BUILTIN else str(Path(source).absolute()),
        "fingerprint": fp,
        "tokenizer": "bytes" if tok.name == "bytes" else TOKENIZER,
        "tokenizer_digest": tok.digest,
        "bos_id": tok.bos_id,
        "vocab_size": tok.vocab_size,
        "documents": docs,
        "tokens": {},
    }
    for split, arrays in parts.items():
        tokens = np.concatenate(arrays)
        write_tokens(tmp, split, tokens, tok.bos_id)
        meta["tokens"][split] = int(len(tokens))
    (tmp / META).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def builtin_dataset(source: str = "stdlib", cache_dir: str = "", progress: bool = False) -> Path:
    """A built-in corpus (`BUILTIN`), prepared on first use; concurrent trials wait on one
    lock. Named by the interpreter's version, whose sources (or docs) it holds."""

    root = cache_root(cache_dir)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = root / f"{source}-py{version}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{source}-py{version}.lock")):
        if read_meta(out) is None:
            prepare(source, out, progress=progress)
    return out
