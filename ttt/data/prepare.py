"""`ttt data prepare`: byte-level tokenisation into the reference Zarr v3 layout.

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

from ttt.errors import UserError
from ttt.paths import cache_root

BOS = 256  # byte-level vocab: 0..255 are bytes, then the specials
PAD = 257
BYTE_VOCAB = 258
VAL_PERCENT = 5  # documents whose path hash falls below this go to val
CHUNK_TOKENS = 1 << 20
META = "meta.json"


def stdlib_files() -> list[Path]:
    """The interpreter's own standard-library sources (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    )


def resolve_files(source: str) -> tuple[list[Path], Path | None]:
    """(files, root for relative names) for `stdlib`, a directory, or a glob."""
    if source == "stdlib":
        return stdlib_files(), Path(sysconfig.get_paths()["stdlib"])
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()), path
    files = sorted(Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"--source={source!r}: matches no file (use stdlib, a directory or a glob)")
    return files, None


def _name(path: Path, root: Path | None) -> str:
    return str(path.relative_to(root)) if root is not None else str(path)


def is_val(name: str) -> bool:
    """Deterministic split by document name, independent of file order and machine."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def fingerprint(files: Iterable[Path], root: Path | None) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(_name(p, root).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def write_tokens(root: Path, split: str, tokens: np.ndarray, bos_id: int) -> None:
    import zarr
    from zarr.codecs import BloscCodec

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


def prepare(source: str, out: Path, force: bool = False, progress: bool = True) -> dict:
    """Tokenise `source` into `out`; a no-op when `out` already holds the same content."""
    from tqdm import tqdm

    files, root = resolve_files(source)
    if not files:
        raise UserError(f"--source={source!r}: holds no file")
    fp = fingerprint(files, root)
    meta = read_meta(out)
    if not force and meta is not None and meta.get("fingerprint") == fp:
        return meta
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    for p in tqdm(
        files, desc=f"tokenising {source}", unit="file", disable=not progress, file=sys.stderr
    ):
        split = "val" if is_val(_name(p, root)) else "train"
        data = np.frombuffer(p.read_bytes(), np.uint8).astype(np.uint16)
        parts[split].append(np.concatenate([[BOS], data]).astype(np.uint16))
        docs[split] += 1
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
    meta = {
        "source": source,
        "fingerprint": fp,
        "tokenizer": "bytes",
        "bos_id": BOS,
        "vocab_size": BYTE_VOCAB,
        "documents": docs,
        "tokens": {},
    }
    for split, arrays in parts.items():
        tokens = np.concatenate(arrays)
        write_tokens(tmp, split, tokens, BOS)
        meta["tokens"][split] = int(len(tokens))
    (tmp / META).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def stdlib_dataset(cache_dir: str = "", progress: bool = False) -> Path:
    """The built-in corpus, prepared on first use; concurrent trials wait on one lock."""
    from filelock import FileLock

    root = cache_root(cache_dir)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = root / f"stdlib-py{version}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"stdlib-py{version}.lock")):
        if read_meta(out) is None:
            prepare("stdlib", out, progress=progress)
    return out
