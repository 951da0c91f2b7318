"""The token registry: immutable, checksummed versions of learned tokens under one root URI.

Layout::

    <root>/versions/v000001/claim.json               created exclusively: the commit that owns the number
    <root>/versions/v000001/tokens-<shard>.parquet   data, one Parquet per shard (TokenRecord schema)
    <root>/versions/v000001/manifest.json            written LAST; lists every data file with its sha256
    <root>/_staging/<run_id>/tokens-<shard>.parquet  a run's shards before commit

A version is committed if and only if its manifest exists and parses. Everything else (a version folder
holding data but no manifest, a staging folder) is invisible to readers, so a job killed at any point
leaves the registry exactly as it was. Staging is keyed by run id: a restarted job with the same run id
sees what its previous attempt already staged (``staged_concept_ids``) and only learns the rest.

Concurrent commits are safe: a version number is claimed with a conditional create (``O_EXCL`` locally,
``If-None-Match: *`` on S3), a commit never deletes a folder it did not claim, and a run's staged shards
are removed only after its manifest has been read back.
"""

from __future__ import annotations

import hashlib
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from factory import storage
from factory.errors import TokenFactoryError
from factory.storage import NotFoundInStorage, S3Options
from factory.versioning import claim_next_version, version_numbers, version_uri
from schemas import RegistryFile, RegistryManifest, TokenRecord, from_arrow, to_arrow, validate_concept_id

STAGING_DIR = "_staging"
MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "tokens-*.parquet"
NOTE_GLOB = "note-*.json"  # what a run's workers report beside their tokens (skipped concepts, ...)


class RegistryError(TokenFactoryError):
    """Base class of registry errors."""

    http_status, code = 500, "registry_error"


class NoCommittedVersion(RegistryError):
    """The registry has no committed version yet."""

    http_status, code = 503, "no_committed_version"


class UnknownVersion(RegistryError):
    """The requested version is not committed (absent, or interrupted before its manifest)."""

    http_status, code = 404, "no_such_version"


class UnknownConcept(RegistryError, KeyError):
    """The concept has no token in this version."""

    http_status, code = 404, "unknown_concept"

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message, wrapping it in quotes.
        return str(self.args[0])


class ChecksumMismatch(RegistryError):
    """A data file differs from (or is missing compared to) what the manifest recorded."""

    http_status, code = 409, "version_unreadable"


def shard_file_name(shard_name: str) -> str:
    """``tokens-<shard>.parquet``; the shard name follows the id rules because it becomes a key."""
    try:
        validate_concept_id(shard_name)
    except ValueError as e:
        raise RegistryError(f"bad shard name: {e}") from None
    return f"tokens-{shard_name}.parquet"


def _table_from_bytes(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


class TokenRegistry:
    def __init__(self, root_uri: str, s3: S3Options | None = None) -> None:
        self.root_uri = root_uri.rstrip("/") or root_uri
        self.s3 = s3

    def __repr__(self) -> str:
        return f"TokenRegistry({self.root_uri!r})"

    # -- layout ---------------------------------------------------------------------------------------

    def version_uri(self, version: int) -> str:
        return version_uri(self.root_uri, version)

    def staging_uri(self, run_id: str) -> str:
        return storage.join(self.root_uri, STAGING_DIR, validate_concept_id(run_id))

    # -- reading --------------------------------------------------------------------------------------

    def _manifest(self, version: int) -> RegistryManifest | None:
        """The version's manifest, or None if the version is not committed.

        Only "absent" and "unparseable" mean uncommitted; any other storage error (network, permissions)
        propagates, so an outage is never mistaken for an empty registry.
        """
        try:
            data = storage.read_bytes(storage.join(self.version_uri(version), MANIFEST_NAME), self.s3)
        except NotFoundInStorage:
            return None
        try:
            manifest = RegistryManifest.model_validate_json(data)
        except ValueError:
            return None
        return manifest if manifest.version == version else None

    def _version_dirs(self) -> list[int]:
        return version_numbers(self.root_uri, self.s3)

    def versions(self) -> list[int]:
        """Committed versions, ascending."""
        return [v for v in self._version_dirs() if self._manifest(v) is not None]

    def latest(self) -> int | None:
        # Newest first, stopping at the first committed one: debris above it is skipped, not fatal.
        for v in reversed(self._version_dirs()):
            if self._manifest(v) is not None:
                return v
        return None

    def open(self, version: int | None = None, verify: bool = True) -> RegistryVersion:
        """Open a committed version (the latest if ``version`` is None), checking its files by default."""
        if version is None:
            version = self.latest()
            if version is None:
                raise NoCommittedVersion(f"registry {self.root_uri} has no committed version")
        manifest = self._manifest(version)
        if manifest is None:
            raise UnknownVersion(
                f"version {version} is not committed in registry {self.root_uri} "
                f"(committed: {self.versions() or 'none'})"
            )
        opened = RegistryVersion(self.version_uri(version), manifest, self.s3)
        if verify:
            opened.verify()
        return opened

    def newest_readable(self) -> tuple[RegistryVersion, dict[int, str]]:
        """The newest committed version whose files verify, and why each newer committed one was skipped.

        What a server starts on: a corrupt newest version must not keep it from serving the one before.
        """
        skipped: dict[int, str] = {}
        for v in reversed(self.versions()):
            try:
                return self.open(v), skipped
            except (RegistryError, storage.StorageError) as e:
                skipped[v] = str(e)
        raise NoCommittedVersion(
            f"no readable committed version in registry {self.root_uri}"
            + (f" (skipped: {skipped})" if skipped else "")
            + ": run `tokenfactory onboard` first"
        )

    def committed_version_for_run(self, run_id: str) -> int | None:
        """The version a run committed, if any: a rerun of a finished run id can then do nothing."""
        for v in reversed(self._version_dirs()):
            manifest = self._manifest(v)
            if manifest is not None and manifest.run_id == run_id:
                return v
        return None

    def staged(self, run_id: str) -> StagedRun:
        """What a run has staged so far, read-only (progress, resume, commit checks)."""
        return StagedRun(self, run_id)

    # -- writing --------------------------------------------------------------------------------------

    def begin(
        self,
        run_id: str,
        backbone: str,
        backbone_fingerprint: str,
        config: dict[str, Any] | None = None,
    ) -> VersionWriter:
        """Start (or resume) staging the tokens of a run."""
        return VersionWriter(self, run_id, backbone, backbone_fingerprint, config or {})

    # -- export ---------------------------------------------------------------------------------------

    def export_textual_inversion(
        self,
        concept_id: str,
        out_uri: str,
        token: str | None = None,
        version: int | None = None,
    ) -> str:
        """Write one token in the diffusers textual-inversion format; see `RegistryVersion.export_textual_inversion`."""
        return self.open(version).export_textual_inversion(concept_id, out_uri, token)


class RegistryVersion:
    """A committed, immutable version. Records are loaded lazily and cached."""

    def __init__(self, uri: str, manifest: RegistryManifest, s3: S3Options | None = None) -> None:
        self.uri = uri
        self.manifest = manifest
        self.s3 = s3
        self._bytes: dict[str, bytes] = {}  # file contents read by verify(), reused once by records()
        self._records: list[TokenRecord] | None = None
        self._by_id: dict[str, TokenRecord] = {}

    @property
    def version(self) -> int:
        return self.manifest.version

    def __repr__(self) -> str:
        return f"RegistryVersion({self.uri!r}, n_tokens={self.manifest.n_tokens})"

    def __len__(self) -> int:
        return self.manifest.n_tokens

    def _read(self, file: RegistryFile) -> bytes:
        try:
            return storage.read_bytes(storage.join(self.uri, file.path), self.s3)
        except NotFoundInStorage:
            raise ChecksumMismatch(
                f"version {self.version}: file {file.path} listed in the manifest is missing ({self.uri})"
            ) from None

    def verify(self) -> None:
        """Recompute every file's sha256 and compare with the manifest."""
        for file in self.manifest.files:
            data = self._bytes.get(file.path) or self._read(file)
            actual = hashlib.sha256(data).hexdigest()
            if actual != file.sha256 or len(data) != file.bytes:
                raise ChecksumMismatch(
                    f"version {self.version}: file {file.path} has sha256 {actual} ({len(data)} bytes), "
                    f"manifest says {file.sha256} ({file.bytes} bytes)"
                )
            if self._records is None:
                self._bytes[file.path] = data

    def records(self) -> list[TokenRecord]:
        if self._records is None:
            records: list[TokenRecord] = []
            for file in self.manifest.files:
                data = self._bytes.pop(file.path, None) or self._read(file)
                table = _table_from_bytes(data)
                if table.num_rows != file.rows:
                    raise ChecksumMismatch(
                        f"version {self.version}: file {file.path} has {table.num_rows} rows, manifest says {file.rows}"
                    )
                records.extend(from_arrow(table, TokenRecord))
            self._by_id = {r.concept_id: r for r in records}
            self._records = records
        return list(self._records)

    def concept_ids(self) -> list[str]:
        return [r.concept_id for r in self.records()]

    def __contains__(self, concept_id: object) -> bool:
        self.records()
        return concept_id in self._by_id

    def get(self, concept_id: str) -> TokenRecord:
        self.records()
        try:
            return self._by_id[concept_id]
        except KeyError:
            raise UnknownConcept(
                f"concept {concept_id!r} is not in registry version {self.version} ({self.uri})"
            ) from None

    def export_textual_inversion(self, concept_id: str, out_uri: str, token: str | None = None) -> str:
        """Write one token in the diffusers textual-inversion format and return the token string.

        The file is a safetensors dict with exactly one entry ``{token: float32 tensor [1, d]}``. diffusers'
        ``load_textual_inversion`` takes a one-key state dict as ``(token, embedding)`` and, for a 2-D
        embedding with one row, adds a single token whose input embedding is that row.
        """
        # torch is only needed here; keep the registry importable (and fast to import) without it.
        import torch
        from safetensors.torch import save

        record = self.get(concept_id)
        token = token or f"<concept:{concept_id}>"
        tensor = torch.tensor(record.vector, dtype=torch.float32).reshape(1, record.dim)
        storage.write_bytes(out_uri, save({token: tensor}), self.s3)
        return token

    def vectors(self, concept_ids: Sequence[str]) -> np.ndarray:
        """Stacked token vectors, float32 ``[len(concept_ids), dim]``, in the order asked."""
        records = [self.get(c) for c in concept_ids]
        dim = records[0].dim if records else self._dim()
        out = np.empty((len(records), dim), dtype=np.float32)
        for i, r in enumerate(records):
            out[i] = r.vector
        return out

    def _dim(self) -> int:
        records = self.records()
        return records[0].dim if records else 0


class StagedRun:
    """The shards a run has staged and not yet committed. Obtain it from ``TokenRegistry.staged``."""

    def __init__(self, registry: TokenRegistry, run_id: str) -> None:
        self.registry, self.run_id = registry, run_id
        self.uri = registry.staging_uri(run_id)  # validates run_id

    def shards(self) -> list[str]:
        """URIs of the shards staged so far (by any attempt with this run id)."""
        return storage.glob_files(self.uri, SHARD_GLOB, self.registry.s3)

    def concept_ids(self) -> set[str]:
        ids: set[str] = set()
        for uri in self.shards():
            ids.update(storage.read_parquet(uri, self.registry.s3).column("concept_id").to_pylist())
        return ids

    def records(self) -> list[TokenRecord]:
        """Every staged record (a resumed run stages new concepts under new shard names, never twice)."""
        return [
            r for uri in self.shards() for r in from_arrow(storage.read_parquet(uri, self.registry.s3), TokenRecord)
        ]

    def notes(self) -> list[Any]:
        """Every note staged with `VersionWriter.write_note`, in name order (dropped with the staging area)."""
        return [
            storage.read_json(uri, self.registry.s3)
            for uri in storage.glob_files(self.uri, NOTE_GLOB, self.registry.s3)
        ]


class VersionWriter:
    """Stages one run's shards and commits them as the next version. Obtain it from ``TokenRegistry.begin``.

    Shard names must be unique per piece of work: writing a shard name again replaces that shard (which
    makes a retried write idempotent), so a restarted job should name its new shards differently
    (e.g. ``w0-a1``) rather than reuse ``w0`` for other concepts.
    """

    def __init__(
        self,
        registry: TokenRegistry,
        run_id: str,
        backbone: str,
        backbone_fingerprint: str,
        config: dict[str, Any],
    ) -> None:
        self.registry = registry
        self.run_id = run_id
        self.backbone = backbone
        self.backbone_fingerprint = backbone_fingerprint
        self.config = config
        self.staging_uri = registry.staging_uri(run_id)  # validates run_id

    @property
    def _s3(self) -> S3Options | None:
        return self.registry.s3

    def staged_shards(self) -> list[str]:
        """URIs of the shards staged so far (by this attempt or an earlier one with the same run id)."""
        return self.registry.staged(self.run_id).shards()

    def staged_concept_ids(self) -> set[str]:
        return self.registry.staged(self.run_id).concept_ids()

    def _check(self, records: Sequence[TokenRecord]) -> None:
        seen: set[str] = set()
        for r in records:
            if (r.run_id, r.backbone, r.backbone_fingerprint) != (
                self.run_id,
                self.backbone,
                self.backbone_fingerprint,
            ):
                raise RegistryError(
                    f"token {r.concept_id!r} belongs to run {r.run_id!r} / backbone {r.backbone!r} "
                    f"({r.backbone_fingerprint}), but this writer stages run {self.run_id!r} / "
                    f"backbone {self.backbone!r} ({self.backbone_fingerprint})"
                )
            if r.concept_id in seen:
                raise RegistryError(f"concept {r.concept_id!r} appears twice in one shard")
            seen.add(r.concept_id)
        dims = {r.dim for r in records}
        if len(dims) > 1:
            raise RegistryError(f"tokens of different dimensions in one run: {sorted(dims)}")

    def write_shard(self, shard_name: str, records: Iterable[TokenRecord]) -> str | None:
        """Stage one shard (atomically) and return its URI; an empty shard writes nothing."""
        records = list(records)
        name = shard_file_name(shard_name)
        if not records:
            return None
        self._check(records)
        uri = storage.join(self.staging_uri, name)
        storage.write_parquet(to_arrow(records, TokenRecord), uri, self._s3)
        return uri

    def write_note(self, name: str, note: Any) -> str:
        """Stage a JSON note beside the tokens (e.g. a worker's skipped concepts); writing a name again
        replaces it. Notes are for the run's report: `commit` does not publish them."""
        try:
            validate_concept_id(name)
        except ValueError as e:
            raise RegistryError(f"bad note name: {e}") from None
        uri = storage.join(self.staging_uri, f"note-{name}.json")
        storage.write_json(uri, note, self._s3)
        return uri

    def abort(self) -> None:
        """Drop everything staged for this run."""
        storage.delete(self.staging_uri, s3=self._s3)

    def commit(self, report: dict[str, Any] | None = None) -> int:
        """Publish the staged shards as the next version and return its number.

        Idempotent: if this run id was already committed (e.g. the job died after the manifest was written
        but before staging was cleaned up) and nothing new is staged, the existing version is returned.
        """
        shards = self.staged_shards()
        contents = {uri: storage.read_bytes(uri, self._s3) for uri in shards}
        records_by_shard = {uri: from_arrow(_table_from_bytes(data), TokenRecord) for uri, data in contents.items()}
        staged_ids = {r.concept_id for recs in records_by_shard.values() for r in recs}

        done = self.registry.committed_version_for_run(self.run_id)
        if done is not None:
            committed_ids = set(self.registry.open(done, verify=False).concept_ids())
            if not staged_ids <= committed_ids:
                raise RegistryError(
                    f"run {self.run_id!r} was already committed as version {done}; "
                    f"{len(staged_ids - committed_ids)} newly staged tokens need a new run id"
                )
            self.abort()
            return done

        if not staged_ids:
            raise RegistryError(f"nothing to commit: run {self.run_id!r} has no staged tokens")
        owner: dict[str, str] = {}
        for uri, recs in records_by_shard.items():
            for r in recs:
                if r.concept_id in owner:
                    raise RegistryError(
                        f"concept {r.concept_id!r} is staged twice, in "
                        f"{posixpath.basename(owner[r.concept_id])} and {posixpath.basename(uri)}; "
                        f"refusing to commit run {self.run_id!r}"
                    )
                owner[r.concept_id] = uri
        all_records = [r for recs in records_by_shard.values() for r in recs]
        # Shards were checked when written, but perhaps by an earlier attempt with other settings.
        self._check(all_records)

        nonce = uuid.uuid4().hex
        version = self._claim(nonce)
        version_uri = self.registry.version_uri(version)
        files = []
        for uri, data in contents.items():
            name = posixpath.basename(uri)
            storage.write_bytes(storage.join(version_uri, name), data, self._s3)
            files.append(
                RegistryFile(
                    path=name,
                    sha256=hashlib.sha256(data).hexdigest(),
                    bytes=len(data),
                    rows=len(records_by_shard[uri]),
                )
            )
        manifest = RegistryManifest(
            version=version,
            run_id=self.run_id,
            backbone=self.backbone,
            backbone_fingerprint=self.backbone_fingerprint,
            n_tokens=len(all_records),
            files=files,
            config=self.config,
            report=report,
            claim=nonce,
        )
        storage.write_json(storage.join(version_uri, MANIFEST_NAME), manifest, self._s3)
        written = self.registry._manifest(version)
        if written is None or written.claim != nonce:  # confirmed before the staged tokens are dropped
            raise RegistryError(
                f"version {version} of {self.registry.root_uri} does not hold run {self.run_id!r}'s "
                f"manifest after the commit; its staged tokens are kept: rerun to commit them"
            )
        self.abort()
        return version

    def _claim(self, nonce: str) -> int:
        """The next free version number, claimed atomically (`factory.versioning.claim_next_version`)."""
        return claim_next_version(self.registry.root_uri, {"run_id": self.run_id, "nonce": nonce}, self._s3)
