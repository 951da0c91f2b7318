"""The node-local copy of checkpoints that live on S3, and content fingerprints of checkpoint folders.

Libraries load checkpoints from local folders (and memory-map them), so an ``s3://`` weights ROOT is
mirrored once per node into ``$TOKENFACTORY_CACHE`` (default ``~/.cache/tokenfactory``). Every Ray Data
actor, Train worker and Serve replica of a node asks for the same ROOT at once: a file lock makes one of
them download while the others wait, files land under temporary names and are renamed when complete, and
a manifest written last records each file's size and sha256. A later call re-lists the prefix and only
downloads what changed, so a partial or stale mirror is repaired, never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from factory import storage

MANIFEST = ".tokenfactory-mirror.json"
_CHUNK = 8 << 20


def cache_root() -> Path:
    return Path(os.environ.get("TOKENFACTORY_CACHE", Path.home() / ".cache" / "tokenfactory"))


def local_root(uri: str, s3=None) -> Path:
    """A local folder holding ``uri``: the folder itself, or the node's mirror of an ``s3://`` prefix."""
    if uri.startswith("s3://"):
        return mirror(uri, s3)
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"weights folder not found: {uri}")
    return path


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remote_files(uri: str, s3) -> dict[str, int]:
    fs, base = storage.resolve(uri, s3)
    base = base.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
    files = {i.path[len(base) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}
    if not files:
        raise FileNotFoundError(f"no files under {uri}")
    return files


def _download(uri: str, target: Path, s3) -> str:
    """Stream one object to ``target`` (via a temporary name); returns its sha256."""
    fs, path = storage.resolve(uri, s3)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def mirror(uri: str, s3=None) -> Path:
    """Mirror every file under the ``s3://`` prefix ``uri`` into the node's cache; returns the folder."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    dest = cache_root() / "mirror" / key
    with _locked(dest.with_name(key + ".lock")):
        remote = _remote_files(uri, s3)
        manifest = dest / MANIFEST
        known = json.loads(manifest.read_text())["files"] if manifest.exists() else {}
        files = {}
        for rel, size in sorted(remote.items()):
            local = dest / rel
            entry = known.get(rel)
            if entry and entry["size"] == size and local.exists() and local.stat().st_size == size:
                files[rel] = entry
                continue
            files[rel] = {"size": size, "sha256": _download(storage.join(uri, rel), local, s3)}
        if files != known:
            tmp = manifest.with_name(f".tmp-{uuid.uuid4().hex}")
            tmp.write_text(json.dumps({"uri": uri, "files": files}, indent=1, sort_keys=True))
            os.replace(tmp, manifest)
    return dest


def file_sha256(path: Path) -> str:
    """sha256 of a local file, remembered per (path, size, mtime) in the cache so a reload costs nothing."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_root() / "sha256" / key
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".tmp-{uuid.uuid4().hex}")
    tmp.write_text(digest.hexdigest())
    os.replace(tmp, memo)
    return digest.hexdigest()


def fingerprint_of(root: Path) -> str:
    """sha256 over the relative path and content hash of every file of a checkpoint folder."""
    manifest = root / MANIFEST
    if manifest.exists():  # a mirror: its files were hashed while they were downloaded
        hashes = {rel: e["sha256"] for rel, e in json.loads(manifest.read_text())["files"].items()}
    else:
        hashes = {
            str(p.relative_to(root)): file_sha256(p)
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
