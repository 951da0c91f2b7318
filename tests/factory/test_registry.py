import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from factory import storage
from factory.registry import (
    ChecksumMismatch,
    NoCommittedVersion,
    RegistryError,
    TokenRegistry,
    UnknownConcept,
    UnknownVersion,
    VersionWriter,
)
from jobs.s3server import SeaweedS3
from schemas import TokenRecord

MakeToken = Callable[..., TokenRecord]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> TokenRegistry:
    """An empty registry in a local folder, and one in a fresh bucket of the real S3 server."""
    if request.param == "local":
        return TokenRegistry(str(tmp_path / "registry"))
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    return TokenRegistry(request.getfixturevalue("s3_bucket") + "/registry", server.s3_options)


def _begin(registry: TokenRegistry, run_id: str = "run-1") -> VersionWriter:
    return registry.begin(run_id, "fashion-mini", "fp-0123", config={"lr": 0.05})


def _commit_one(
    registry: TokenRegistry, make_token: MakeToken, run_id: str = "run-1", ids: tuple[str, ...] = ("a", "b")
) -> int:
    writer = _begin(registry, run_id)
    writer.write_shard("w0", [make_token(c, run_id=run_id) for c in ids])
    return writer.commit()


def test_round_trip(registry: TokenRegistry, make_token: MakeToken) -> None:
    w0 = [make_token("a"), make_token("b")]
    w1 = [make_token("c", parametrization="free", coefficients=None, basis_id=None)]
    writer = _begin(registry)
    writer.write_shard("w0", w0)
    writer.write_shard("w1", w1)
    assert writer.commit(report={"concepts_learned": 3}) == 1

    version = registry.open()
    assert version.version == 1
    assert sorted(version.concept_ids()) == ["a", "b", "c"]
    for want in w0 + w1:
        got = version.get(want.concept_id)
        exact = {"vector", "coefficients"}
        assert got.model_dump(exclude=exact) == want.model_dump(exclude=exact)
        np.testing.assert_allclose(got.vector, want.vector, rtol=1e-6)
    vectors = version.vectors(["c", "a"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 8)
    np.testing.assert_allclose(vectors[1], w0[0].vector, rtol=1e-6)
    assert version.vectors([]).shape == (0, 8)


def test_manifest_lists_every_file_with_checksums(registry: TokenRegistry, make_token: MakeToken) -> None:
    writer = _begin(registry)
    writer.write_shard("w0", [make_token("a"), make_token("b")])
    writer.write_shard("w1", [make_token("c")])
    writer.commit(report={"concepts_learned": 3})
    manifest = registry.open().manifest
    assert (manifest.run_id, manifest.backbone) == ("run-1", "fashion-mini")
    assert manifest.backbone_fingerprint == "fp-0123"
    assert manifest.n_tokens == 3
    assert manifest.config == {"lr": 0.05}
    assert manifest.report == {"concepts_learned": 3}
    assert [(f.path, f.rows) for f in manifest.files] == [("tokens-w0.parquet", 2), ("tokens-w1.parquet", 1)]
    for f in manifest.files:
        uri = storage.join(registry.version_uri(1), f.path)
        assert storage.sha256_of(uri, registry.s3) == f.sha256


def test_commit_removes_staging_and_versions_increase(registry: TokenRegistry, make_token: MakeToken) -> None:
    assert _commit_one(registry, make_token, "run-1") == 1
    assert _commit_one(registry, make_token, "run-2", ids=("c",)) == 2
    assert registry.versions() == [1, 2]
    assert registry.latest() == 2
    assert registry.open(1).concept_ids() == ["a", "b"]
    assert registry.open().concept_ids() == ["c"]
    assert storage.glob_files(storage.join(registry.root_uri, "_staging"), s3=registry.s3) == []


def test_empty_registry_has_no_version(registry: TokenRegistry) -> None:
    assert registry.versions() == []
    assert registry.latest() is None
    with pytest.raises(NoCommittedVersion):
        registry.open()


def test_staged_but_not_committed_is_invisible(registry: TokenRegistry, make_token: MakeToken) -> None:
    _begin(registry).write_shard("w0", [make_token("a")])
    assert registry.versions() == []
    assert registry.latest() is None
    with pytest.raises(NoCommittedVersion):
        registry.open()


def test_version_folder_without_manifest_is_invisible(registry: TokenRegistry, make_token: MakeToken) -> None:
    _commit_one(registry, make_token, "run-1")
    # A commit killed after copying its data but before writing the manifest:
    data = storage.read_bytes(storage.join(registry.version_uri(1), "tokens-w0.parquet"), registry.s3)
    storage.write_bytes(storage.join(registry.version_uri(2), "tokens-w0.parquet"), data, registry.s3)
    assert registry.versions() == [1]
    assert registry.latest() == 1
    assert registry.open().version == 1
    with pytest.raises(UnknownVersion, match="version 2 is not committed"):
        registry.open(2)


def test_a_folder_without_manifest_is_never_cleared_or_reused(
    registry: TokenRegistry,
    make_token: MakeToken,
) -> None:
    # Debris of an interrupted commit, or a commit still in flight in another process: either way not ours.
    storage.write_bytes(storage.join(registry.version_uri(1), "tokens-debris.parquet"), b"junk", registry.s3)
    assert _commit_one(registry, make_token) == 2
    assert storage.listdir(registry.version_uri(1), registry.s3) == ["tokens-debris.parquet"]
    version = registry.open()
    assert version.version == 2 and [f.path for f in version.manifest.files] == ["tokens-w0.parquet"]
    assert storage.listdir(registry.version_uri(2), registry.s3) == ["claim.json", "manifest.json", "tokens-w0.parquet"]


def test_a_folder_of_a_newer_format_is_left_alone(registry: TokenRegistry, make_token: MakeToken) -> None:
    newer = json.dumps({"format": "tokenfactory.registry/2", "version": 1}).encode()
    storage.write_bytes(storage.join(registry.version_uri(1), "manifest.json"), newer, registry.s3)
    assert _commit_one(registry, make_token) == 2
    assert storage.read_bytes(storage.join(registry.version_uri(1), "manifest.json"), registry.s3) == newer


def test_forced_interleaving_gives_each_commit_its_own_version(
    registry: TokenRegistry, make_token: MakeToken, monkeypatch
) -> None:
    # Both commits list the versions before either claims one: the old code told both "version 1".
    a, b = (registry.begin(run, "fashion-mini", "fp-0123") for run in ("run-a", "run-b"))
    a.write_shard("w0", [make_token(concept_id="sku-a", run_id="run-a")])
    b.write_shard("w0", [make_token(concept_id="sku-b", run_id="run-b")])
    listed = registry._version_dirs()
    monkeypatch.setattr(registry, "_version_dirs", lambda: listed)
    versions = [a.commit(), b.commit()]
    monkeypatch.undo()
    assert sorted(versions) == [1, 2]
    assert {registry.open(v).manifest.run_id: registry.open(v).concept_ids() for v in versions} == {
        "run-a": ["sku-a"],
        "run-b": ["sku-b"],
    }


def test_unparseable_manifest_is_invisible(registry: TokenRegistry, make_token: MakeToken) -> None:
    _commit_one(registry, make_token)
    truncated = b'{"format": "tokenf'
    storage.write_bytes(storage.join(registry.version_uri(2), "manifest.json"), truncated, registry.s3)
    assert registry.versions() == [1]
    assert registry.latest() == 1


def test_unknown_version(registry: TokenRegistry, make_token: MakeToken) -> None:
    _commit_one(registry, make_token)
    with pytest.raises(UnknownVersion, match=r"committed: \[1\]"):
        registry.open(7)


def test_corrupted_data_file_raises_checksum_mismatch(registry: TokenRegistry, make_token: MakeToken) -> None:
    _commit_one(registry, make_token)
    uri = storage.join(registry.version_uri(1), "tokens-w0.parquet")
    data = bytearray(storage.read_bytes(uri, registry.s3))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(uri, bytes(data), registry.s3)
    with pytest.raises(ChecksumMismatch, match="tokens-w0.parquet"):
        registry.open()
    with pytest.raises(ChecksumMismatch, match="tokens-w0.parquet"):
        registry.open(1, verify=False).verify()


def test_missing_data_file_raises_checksum_mismatch(registry: TokenRegistry, make_token: MakeToken) -> None:
    _commit_one(registry, make_token)
    storage.delete(storage.join(registry.version_uri(1), "tokens-w0.parquet"), s3=registry.s3)
    with pytest.raises(ChecksumMismatch, match="tokens-w0.parquet listed in the manifest is missing"):
        registry.open()


def test_unknown_concept_names_the_id_and_version(registry: TokenRegistry, make_token: MakeToken) -> None:
    _commit_one(registry, make_token)
    version = registry.open()
    with pytest.raises(UnknownConcept, match="'zzz' is not in registry version 1") as info:
        version.get("zzz")
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownConcept):
        version.vectors(["a", "zzz"])
    assert "a" in version and "zzz" not in version


def test_restart_with_same_run_id_sees_staged_concepts(
    registry: TokenRegistry,
    make_token: MakeToken,
) -> None:
    first = _begin(registry)
    first.write_shard("w0", [make_token("a"), make_token("b")])
    first.write_shard("w1", [make_token("c")])
    # The job dies here; its replacement begins the same run again.
    second = _begin(registry)
    assert second.staged_concept_ids() == {"a", "b", "c"}
    assert _begin(registry, "run-other").staged_concept_ids() == set()
    second.write_shard("w0-a1", [make_token("d")])
    assert second.commit() == 1
    assert sorted(registry.open().concept_ids()) == ["a", "b", "c", "d"]


def test_rewriting_a_shard_replaces_it(registry: TokenRegistry, make_token: MakeToken) -> None:
    writer = _begin(registry)
    writer.write_shard("w0", [make_token("a"), make_token("b")])
    writer.write_shard("w0", [make_token("a"), make_token("b")])
    assert writer.staged_concept_ids() == {"a", "b"}
    assert len(writer.staged_shards()) == 1
    writer.commit()
    assert registry.open().manifest.n_tokens == 2


def test_commit_refuses_duplicates_across_shards(registry: TokenRegistry, make_token: MakeToken) -> None:
    writer = _begin(registry)
    writer.write_shard("w0", [make_token("a"), make_token("b")])
    writer.write_shard("w1", [make_token("b")])
    with pytest.raises(RegistryError, match="'b' is staged twice, in tokens-w0.parquet and tokens-w1"):
        writer.commit()
    assert registry.versions() == []


def test_write_shard_refuses_duplicates_within_a_shard(
    registry: TokenRegistry,
    make_token: MakeToken,
) -> None:
    with pytest.raises(RegistryError, match="appears twice"):
        _begin(registry).write_shard("w0", [make_token("a"), make_token("a")])


def test_commit_refuses_empty_runs(registry: TokenRegistry) -> None:
    writer = _begin(registry)
    assert writer.write_shard("w0", []) is None
    with pytest.raises(RegistryError, match="nothing to commit"):
        writer.commit()
    assert registry.versions() == []


def test_write_shard_refuses_tokens_of_another_run_or_backbone(
    registry: TokenRegistry,
    make_token: MakeToken,
) -> None:
    writer = _begin(registry)
    with pytest.raises(RegistryError, match="belongs to run 'run-9'"):
        writer.write_shard("w0", [make_token("a", run_id="run-9")])
    with pytest.raises(RegistryError, match="backbone"):
        writer.write_shard("w0", [make_token("a", backbone_fingerprint="other")])


def test_bad_run_and_shard_names_are_refused(registry: TokenRegistry, make_token: MakeToken) -> None:
    with pytest.raises(ValueError, match="invalid id"):
        registry.begin("../escape", "fashion-mini", "fp-0123")
    with pytest.raises(RegistryError, match="bad shard name"):
        _begin(registry).write_shard("a/b", [make_token("a")])


def test_rerunning_a_committed_run_is_a_no_op(registry: TokenRegistry, make_token: MakeToken) -> None:
    assert registry.committed_version_for_run("run-1") is None
    assert _commit_one(registry, make_token) == 1
    assert registry.committed_version_for_run("run-1") == 1
    # The job died after the manifest but before staging was cleaned up, and is retried:
    writer = _begin(registry)
    writer.write_shard("w0", [make_token("a"), make_token("b")])
    assert writer.commit() == 1
    assert registry.versions() == [1]
    assert writer.staged_concept_ids() == set()


def test_new_tokens_under_a_committed_run_id_are_refused(
    registry: TokenRegistry,
    make_token: MakeToken,
) -> None:
    _commit_one(registry, make_token)
    writer = _begin(registry)
    writer.write_shard("w9", [make_token("new")])
    with pytest.raises(RegistryError, match="already committed as version 1"):
        writer.commit()


def test_export_textual_inversion(registry: TokenRegistry, make_token: MakeToken, tmp_path: Path) -> None:
    from safetensors.numpy import load

    _commit_one(registry, make_token)
    out = str(tmp_path / "a.safetensors")
    assert registry.export_textual_inversion("a", out) == "<concept:a>"
    tensors = load(storage.read_bytes(out))
    assert list(tensors) == ["<concept:a>"]
    assert tensors["<concept:a>"].shape == (1, 8)
    assert tensors["<concept:a>"].dtype == np.float32
    np.testing.assert_allclose(tensors["<concept:a>"][0], make_token("a").vector, rtol=1e-6)


def test_export_textual_inversion_with_custom_token_to_storage(
    registry: TokenRegistry,
    make_token: MakeToken,
) -> None:
    from safetensors.numpy import load

    _commit_one(registry, make_token)
    out = storage.join(registry.root_uri, "exports", "b.safetensors")
    registry.export_textual_inversion("b", out, token="<sku-b>", version=1)
    assert list(load(storage.read_bytes(out, registry.s3))) == ["<sku-b>"]


def test_exported_file_is_what_diffusers_load_textual_inversion_accepts(
    tmp_path: Path,
    make_token: MakeToken,
) -> None:
    """Run the exported state dict through the parsing steps of diffusers' ``load_textual_inversion``."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin as Loader
    from safetensors.torch import load_file

    registry = TokenRegistry(str(tmp_path / "registry"))
    _commit_one(registry, make_token)
    out = tmp_path / "a.safetensors"
    registry.export_textual_inversion("a", str(out))

    class _EmptyTokenizer:
        added_tokens_encoder: dict[str, int] = {}

        def get_vocab(self) -> dict[str, int]:
            return {}

    tokenizer = _EmptyTokenizer()
    tokens, embeddings = Loader._retrieve_tokens_and_embeddings([None], [load_file(out)], tokenizer)
    tokens, embeddings = Loader._extend_tokens_and_embeddings(tokens, embeddings, tokenizer)
    assert tokens == ["<concept:a>"]
    assert tuple(embeddings[0].shape) == (8,)
    np.testing.assert_allclose(embeddings[0].numpy(), make_token("a").vector, rtol=1e-6)


def _commit_many(root: str, s3, worker: str, n: int, start) -> list[int]:
    """A separate process committing ``n`` runs as fast as it can (after a shared start signal)."""
    from factory.registry import TokenRegistry
    from schemas import TokenRecord

    registry, versions = TokenRegistry(root, s3), []
    start.wait()
    for i in range(n):
        run = f"{worker}-{i}"
        writer = registry.begin(run, "fashion-mini", "fp-0123")
        writer.write_shard(
            "w0",
            [
                TokenRecord(
                    concept_id=f"sku-{run}",
                    parent="dress",
                    backbone="fashion-mini",
                    backbone_fingerprint="fp-0123",
                    dim=2,
                    vector=[0.5, float(i)],
                    parametrization="free",
                    run_id=run,
                )
            ],
        )
        versions.append(writer.commit())
    return versions


def test_two_processes_committing_30_times_each_lose_nothing(registry: TokenRegistry) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        start = manager.Event()
        jobs = [pool.apply_async(_commit_many, (registry.root_uri, registry.s3, w, 30, start)) for w in ("p", "q")]
        start.set()
        told = [v for j in jobs for v in j.get(timeout=240)]
    assert sorted(told) == list(range(1, 61))  # every commit told its own version
    assert registry.versions() == list(range(1, 61))
    runs = {registry.open(v).manifest.run_id: registry.open(v).concept_ids() for v in registry.versions()}
    assert runs == {f"{w}-{i}": [f"sku-{w}-{i}"] for w in ("p", "q") for i in range(30)}  # all readable, none lost
