"""The one way tokenfactory touches paths: ``s3://bucket/key``, ``file:///abs/path`` or a plain path.

Everything goes through ``pyarrow.fs`` so that the same code reads a local test folder, a SeaweedFS
bucket on loopback and AWS S3. URIs keep their scheme on the way out (``glob_files`` on ``s3://b/p``
returns ``s3://...`` URIs), so callers never juggle filesystem objects themselves.

Error contract: every failure is a ``StorageError`` naming the URI; a missing object is
``NotFoundInStorage``, which is also a ``FileNotFoundError`` so ordinary ``except`` clauses work.

S3 has no folders, and pyarrow papers over that: deleting the last object under a prefix makes it write
an empty ``prefix/`` marker object, so an emptied "folder" still ``exists()`` and shows in ``listdir``.
``glob_files`` lists files only, so it is unaffected; code that needs "is there data here?" should use it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel

from factory.errors import TokenFactoryError


class StorageError(TokenFactoryError, OSError):
    """A storage operation failed; ``uri`` says on what."""

    http_status, code = 503, "store_unavailable"

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri

    def __str__(self) -> str:
        return str(self.args[0])


class NotFoundInStorage(StorageError, FileNotFoundError):
    """The object or file does not exist."""

    http_status, code = 404, "not_found"


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible store. Frozen, hence hashable: it is part of the filesystem cache key.

    ``endpoint`` may be ``host:port`` or a URL; a URL is split into ``endpoint`` and ``scheme``. With no
    endpoint, AWS is used; with no keys, pyarrow falls back to the AWS default credential chain (instance
    roles). Give a URL for plain-HTTP servers: a bare ``host:port`` keeps the default ``https``.
    """

    endpoint: str | None = None
    region: str = "us-east-1"
    access_key: str | None = None
    # Kept out of repr() so that options can be logged without leaking credentials.
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    scheme: str = "https"
    max_attempts: int = 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Options:
        """Read the usual AWS variables. pyarrow itself ignores ``AWS_ENDPOINT_URL``; we honour it here."""
        env = os.environ if environ is None else environ
        endpoint = env.get("TOKENFACTORY_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return cls(
            endpoint=endpoint or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
        )

    def __post_init__(self) -> None:
        # Normalise "http://host:port" into endpoint="host:port", scheme="http", so that two spellings of
        # the same server compare equal (and share one cached filesystem).
        if self.endpoint is not None and "://" in self.endpoint:
            parsed = urlparse(self.endpoint)
            object.__setattr__(self, "endpoint", parsed.netloc)
            object.__setattr__(self, "scheme", parsed.scheme)

    @property
    def endpoint_url(self) -> str | None:
        """The endpoint as a URL (what boto3's ``endpoint_url`` wants), or None for AWS."""
        return None if self.endpoint is None else f"{self.scheme}://{self.endpoint}"


@functools.lru_cache(maxsize=None)
def _s3_filesystem(options: S3Options) -> pafs.S3FileSystem:
    # One S3FileSystem per distinct endpoint/credentials: creating one sets up an AWS SDK client, which is
    # not free, and pyarrow's filesystems are thread-safe.
    return pafs.S3FileSystem(
        access_key=options.access_key,
        secret_key=options.secret_key,
        session_token=options.session_token,
        region=options.region,
        scheme=options.scheme,
        endpoint_override=options.endpoint,
        # Transient errors (throttling, 5xx, resets) are retried with the SDK's exponential backoff.
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
    )


_LOCAL = pafs.LocalFileSystem()


@dataclass(frozen=True)
class _Location:
    fs: pafs.FileSystem
    path: str  # the filesystem's own path: "bucket/key" on S3, "/abs/path" locally
    prefix: str  # what to put back in front of a path to make a URI of the same kind

    @property
    def is_s3(self) -> bool:
        return self.prefix == "s3://"

    def uri(self, path: str) -> str:
        return self.prefix + path


def _locate(uri: str, s3: S3Options | None) -> _Location:
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"not a URI: {uri!r}", uri=str(uri))
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"S3 URI without a bucket: {uri!r}", uri=uri)
        return _Location(_s3_filesystem(s3 or S3Options.from_env()), path, "s3://")
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URI with a remote host is not supported: {uri!r}", uri=uri)
        return _Location(_LOCAL, _local_path(parsed.path), "file://")
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r} (use s3://, file:// or a path)", uri=uri)
    return _Location(_LOCAL, _local_path(uri), "")


def _local_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def resolve(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for ``uri`` (for pyarrow/Ray Data APIs that take both).

    On S3 the path is ``bucket/key``; locally it is absolute. ``s3`` defaults to ``S3Options.from_env()``.
    """
    loc = _locate(uri, s3)
    return loc.fs, loc.path


def join(uri: str, *parts: str) -> str:
    """Append path components with ``/`` (URIs are always ``/``-separated, also for local paths)."""
    out = uri
    for part in parts:
        part = part.strip("/")
        if part:
            out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


@contextlib.contextmanager
def _translate(uri: str, action: str) -> Iterator[None]:
    """Turn pyarrow/OS errors into StorageError/NotFoundInStorage that name the URI."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise NotFoundInStorage(f"{action} {uri}: not found", uri=uri) from e
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"{action} {uri}: {e}", uri=uri) from e


def _info(loc: _Location, uri: str) -> pafs.FileInfo:
    with _translate(uri, "stat"):
        return loc.fs.get_file_info(loc.path)


@contextlib.contextmanager
def _open_file(loc: _Location, uri: str) -> Iterator[pa.NativeFile]:
    """Open a file for reading, telling "missing" from "is a folder".

    pyarrow's S3 filesystem reports a folder (a prefix) as a missing file, so the cause is only looked up
    when opening fails, which keeps the common path to a single request.
    """
    try:
        stream = loc.fs.open_input_stream(loc.path)
    except (FileNotFoundError, IsADirectoryError) as e:
        if _info(loc, uri).type == pafs.FileType.Directory:
            raise StorageError(f"read {uri}: is a directory, not a file", uri=uri) from e
        raise NotFoundInStorage(f"read {uri}: not found", uri=uri) from e
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"read {uri}: {e}", uri=uri) from e
    with _translate(uri, "read"), stream:
        yield stream


def read_bytes(uri: str, s3: S3Options | None = None, max_bytes: int | None = None) -> bytes:
    """The file's bytes; with ``max_bytes``, at most that many (a caller checking a size limit reads
    limit + 1 bytes and never more, however large the object)."""
    loc = _locate(uri, s3)
    with _open_file(loc, uri) as f:
        return f.read() if max_bytes is None else f.read(max_bytes)


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write ``data`` so that readers see either the old content or the new, never a partial file.

    Locally: write a hidden temporary file next to the target, then rename it (atomic on POSIX).
    On S3: a single upload; S3 makes an object visible only once the upload has completed.
    """
    loc = _locate(uri, s3)
    if loc.is_s3:
        with _translate(uri, "write"), loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    parent, name = posixpath.split(loc.path)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
    with _translate(uri, "write"):
        loc.fs.create_dir(parent, recursive=True)
        try:
            with loc.fs.open_output_stream(tmp) as f:
                f.write(data)
            loc.fs.move(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(OSError):
                loc.fs.delete_file(tmp)
            raise


@functools.lru_cache(maxsize=None)
def _boto3_client(options: S3Options):
    """A boto3 S3 client, for the calls pyarrow has no API for (conditional writes)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=options.endpoint_url,
        region_name=options.region,
        aws_access_key_id=options.access_key,
        aws_secret_access_key=options.secret_key,
        aws_session_token=options.session_token,
        config=Config(
            s3={"addressing_style": "path"} if options.endpoint else {},
            retries={"mode": "standard", "max_attempts": options.max_attempts},
        ),
    )


def create_exclusive(uri: str, data: bytes, s3: S3Options | None = None) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there yet; True if this call created it.

    The one primitive concurrent writers agree on a name with: locally ``O_CREAT | O_EXCL``; on S3 a
    conditional PUT (``If-None-Match: *``), which AWS S3 and SeaweedFS honour (412 when the key exists).
    A retried request may report a loss for a write that landed: callers put a nonce in ``data`` and
    read the object back when told False.
    """
    loc = _locate(uri, s3)
    if loc.is_s3:
        from botocore.exceptions import ClientError

        bucket, _, key = loc.path.partition("/")
        try:
            _boto3_client(s3 or S3Options.from_env()).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412):  # exists (412), or a concurrent conditional write won (409)
                return False
            raise StorageError(f"create {uri}: {e}", uri=uri) from e
        return True
    parent = posixpath.dirname(loc.path)
    with _translate(uri, "create"):
        os.makedirs(parent, exist_ok=True)
        try:
            fd = os.open(loc.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return True


def exists(uri: str, s3: S3Options | None = None) -> bool:
    """True for an existing file, and for a folder (on S3: a prefix that has objects under it)."""
    loc = _locate(uri, s3)
    return _info(loc, uri).type != pafs.FileType.NotFound


def is_file(uri: str, s3: S3Options | None = None) -> bool:
    loc = _locate(uri, s3)
    return _info(loc, uri).type == pafs.FileType.File


def listdir(uri: str, s3: S3Options | None = None) -> list[str]:
    """Sorted names (not URIs) of the direct children of a folder; a missing folder lists as empty,
    because on S3 an empty folder and a missing one are the same thing."""
    loc = _locate(uri, s3)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=False)
    with _translate(uri, "list"):
        infos = loc.fs.get_file_info(selector)
    return sorted(info.base_name for info in infos)


def glob_files(uri: str, pattern: str | None = None, s3: S3Options | None = None) -> list[str]:
    """Sorted URIs of every file below ``uri`` (recursively), optionally filtered by a shell pattern
    on the file name, e.g. ``"*.parquet"``. Directory entries are never returned."""
    loc = _locate(uri, s3)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=True)
    with _translate(uri, "list"):
        infos = loc.fs.get_file_info(selector)
    return sorted(
        loc.uri(info.path)
        for info in infos
        if info.type == pafs.FileType.File and (pattern is None or fnmatch.fnmatchcase(info.base_name, pattern))
    )


def delete(uri: str, missing_ok: bool = True, s3: S3Options | None = None) -> None:
    """Delete a file, or a folder with everything under it."""
    loc = _locate(uri, s3)
    if loc.is_s3 and "/" not in loc.path:
        # pyarrow's delete_dir on a bare bucket name deletes the bucket itself.
        raise StorageError(f"refusing to delete a whole bucket: {uri}", uri=uri)
    info = _info(loc, uri)
    with _translate(uri, "delete"):
        if info.type == pafs.FileType.NotFound:
            if not missing_ok:
                raise NotFoundInStorage(f"delete {uri}: not found", uri=uri)
        elif info.type == pafs.FileType.Directory:
            loc.fs.delete_dir(loc.path)
        else:
            loc.fs.delete_file(loc.path)


def read_json(uri: str, s3: S3Options | None = None) -> Any:
    data = read_bytes(uri, s3)
    try:
        return json.loads(data)
    except ValueError as e:
        raise StorageError(f"read {uri}: not valid JSON ({e})", uri=uri) from e


def write_json(uri: str, obj: Any, s3: S3Options | None = None) -> None:
    """Write JSON (pydantic models are dumped in JSON mode, so datetimes become ISO strings)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", s3)


def read_parquet(uri: str, s3: S3Options | None = None) -> pa.Table:
    data = read_bytes(uri, s3)
    with _translate(uri, "parse parquet"):
        return pq.read_table(pa.BufferReader(data))


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise a table to Parquet in memory (shared by write_parquet and callers that checksum)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_parquet(table: pa.Table, uri: str, s3: S3Options | None = None) -> None:
    """Write a table atomically (serialised in memory first, then ``write_bytes``)."""
    write_bytes(uri, parquet_bytes(table), s3)


def sha256_of(uri: str, s3: S3Options | None = None, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a stored file, streamed so large files are not held in memory."""
    loc = _locate(uri, s3)
    digest = hashlib.sha256()
    with _open_file(loc, uri) as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def absolute_uri(uri: str | None) -> str | None:
    """Local paths made absolute (Ray workers and replicas run elsewhere); URIs with a scheme are left alone."""
    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(uri)
