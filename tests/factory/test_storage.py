import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from factory import storage
from factory.storage import NotFoundInStorage, S3Options, StorageError
from jobs.s3server import SeaweedS3


@pytest.fixture(params=["path", "file-uri", pytest.param("s3", marks=pytest.mark.s3)])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, S3Options | None]:
    """A writable root URI of each kind, with the S3 options to reach it."""
    if request.param == "path":
        return str(tmp_path), None
    if request.param == "file-uri":
        return f"file://{tmp_path}", None
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    return request.getfixturevalue("s3_bucket") + "/root", server.s3_options


def test_bytes_round_trip(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    uri = storage.join(root, "a", "b", "blob.bin")
    storage.write_bytes(uri, b"\x00payload\xff", s3)
    assert storage.read_bytes(uri, s3) == b"\x00payload\xff"
    assert storage.exists(uri, s3)
    assert storage.is_file(uri, s3)


def test_overwrite_replaces_content(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    uri = storage.join(root, "x.txt")
    storage.write_bytes(uri, b"old", s3)
    storage.write_bytes(uri, b"new", s3)
    assert storage.read_bytes(uri, s3) == b"new"


def test_json_round_trip(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    obj = {"name": "x", "n": 3, "nested": {"values": [1.5, None, "z"]}}
    storage.write_json(storage.join(root, "m.json"), obj, s3)
    assert storage.read_json(storage.join(root, "m.json"), s3) == obj


def test_parquet_round_trip(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    table = pa.table({"id": ["a", "b"], "v": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))})
    storage.write_parquet(table, storage.join(root, "t.parquet"), s3)
    assert storage.read_parquet(storage.join(root, "t.parquet"), s3).equals(table)


def test_missing_key_raises_not_found_naming_the_uri(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    uri = storage.join(root, "nope", "missing.bin")
    with pytest.raises(NotFoundInStorage, match="missing.bin") as info:
        storage.read_bytes(uri, s3)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, StorageError)
    assert info.value.uri == uri
    assert not storage.exists(uri, s3)


def test_reading_a_folder_is_a_storage_error(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    storage.write_bytes(storage.join(root, "d", "f"), b"1", s3)
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_bytes(storage.join(root, "d"), s3)


def test_glob_files_lists_recursively_with_uris_of_the_same_kind(
    place: tuple[str, S3Options | None],
) -> None:
    root, s3 = place
    for name in ["a.parquet", "sub/b.parquet", "sub/deeper/c.parquet", "sub/notes.txt"]:
        storage.write_bytes(storage.join(root, name), b"x", s3)
    assert storage.glob_files(root, "*.parquet", s3) == [
        storage.join(root, "a.parquet"),
        storage.join(root, "sub/b.parquet"),
        storage.join(root, "sub/deeper/c.parquet"),
    ]
    assert len(storage.glob_files(root, s3=s3)) == 4


def test_listing_a_missing_folder_is_empty(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    assert storage.glob_files(storage.join(root, "absent"), s3=s3) == []
    assert storage.listdir(storage.join(root, "absent"), s3) == []


def test_listdir_gives_sorted_child_names(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    for name in ["b.txt", "a/x.txt", "c/y/z.txt"]:
        storage.write_bytes(storage.join(root, name), b"x", s3)
    assert storage.listdir(root, s3) == ["a", "b.txt", "c"]


def test_delete_file_and_folder(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    storage.write_bytes(storage.join(root, "f.txt"), b"x", s3)
    storage.write_bytes(storage.join(root, "d", "g.txt"), b"x", s3)
    storage.write_bytes(storage.join(root, "d", "e", "h.txt"), b"x", s3)
    storage.delete(storage.join(root, "f.txt"), s3=s3)
    storage.delete(storage.join(root, "d"), s3=s3)
    assert storage.glob_files(root, s3=s3) == []


def test_delete_missing(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    storage.delete(storage.join(root, "ghost"), s3=s3)  # missing_ok by default
    with pytest.raises(NotFoundInStorage):
        storage.delete(storage.join(root, "ghost"), missing_ok=False, s3=s3)


def test_sha256_of_matches_hashlib(place: tuple[str, S3Options | None]) -> None:
    root, s3 = place
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    storage.write_bytes(storage.join(root, "big.bin"), data, s3)
    assert storage.sha256_of(storage.join(root, "big.bin"), s3) == hashlib.sha256(data).hexdigest()


def test_local_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "out.bin"), b"data")
    storage.write_parquet(pa.table({"a": [1]}), str(tmp_path / "t.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "t.parquet"]


def test_resolve_s3_uri(s3_server: SeaweedS3) -> None:
    fs, path = storage.resolve("s3://bucket/some/key/", s3_server.s3_options)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/some/key"


def test_s3_filesystems_are_cached_per_options(s3_server: SeaweedS3) -> None:
    fs1, _ = storage.resolve("s3://a/x", s3_server.s3_options)
    fs2, _ = storage.resolve("s3://b/y", s3_server.s3_options)
    other = S3Options(endpoint="http://127.0.0.1:1", access_key="k", secret_key="s")
    fs3, _ = storage.resolve("s3://a/x", other)
    assert fs1 is fs2
    assert fs3 is not fs1


def test_resolve_file_uri_and_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, path = storage.resolve(f"file://{tmp_path}/x")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/x"
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("rel/y")[1] == f"{tmp_path}/rel/y"


@pytest.mark.parametrize("bad", ["gs://bucket/key", "s3://", "http://host/x", ""])
def test_unsupported_uris_are_refused(bad: str) -> None:
    with pytest.raises(StorageError):
        storage.resolve(bad)


def test_deleting_a_whole_bucket_is_refused(s3_server: SeaweedS3, s3_bucket: str) -> None:
    with pytest.raises(StorageError, match="whole bucket"):
        storage.delete(s3_bucket, s3=s3_server.s3_options)


def test_wrong_credentials_are_a_storage_error(s3_server: SeaweedS3, s3_bucket: str) -> None:
    bad = S3Options(
        endpoint=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key="wrong",
        max_attempts=1,
    )
    with pytest.raises(StorageError) as info:
        storage.write_bytes(storage.join(s3_bucket, "x"), b"x", bad)
    assert s3_bucket in str(info.value)
    assert not isinstance(info.value, NotFoundInStorage)


@pytest.mark.parametrize(
    ("base", "parts", "want"),
    [
        ("s3://b", ("p", "k.txt"), "s3://b/p/k.txt"),
        ("s3://b/", ("/p/", "k.txt"), "s3://b/p/k.txt"),
        ("/tmp/x", ("a/b",), "/tmp/x/a/b"),
        ("/", ("a",), "/a"),
        ("file:///r", ("", "a"), "file:///r/a"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], want: str) -> None:
    assert storage.join(base, *parts) == want


def test_s3_options_from_env() -> None:
    opts = S3Options.from_env(
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_DEFAULT_REGION": "eu-west-3",
        }
    )
    assert (opts.access_key, opts.secret_key, opts.region) == ("k", "s", "eu-west-3")
    assert (opts.endpoint, opts.scheme) == ("127.0.0.1:9000", "http")
    assert opts.endpoint_url == "http://127.0.0.1:9000"


def test_s3_options_prefers_the_tokenfactory_endpoint_and_aws_region() -> None:
    opts = S3Options.from_env(
        {
            "TOKENFACTORY_S3_ENDPOINT": "https://minio.internal:443",
            "AWS_ENDPOINT_URL": "http://ignored:1",
            "AWS_REGION": "us-west-2",
            "AWS_DEFAULT_REGION": "eu-west-3",
        }
    )
    assert (opts.endpoint, opts.scheme) == ("minio.internal:443", "https")
    assert opts.region == "us-west-2"
    assert S3Options.from_env({}).endpoint_url is None


def test_s3_options_spellings_of_one_endpoint_are_equal() -> None:
    assert S3Options(endpoint="http://h:1") == S3Options(endpoint="h:1", scheme="http")


def test_s3_server_env_points_from_env_at_the_server(s3_server: SeaweedS3, s3_bucket: str) -> None:
    opts = S3Options.from_env(s3_server.env)
    assert opts == s3_server.s3_options
    storage.write_bytes(storage.join(s3_bucket, "k"), b"v", opts)
    assert storage.read_bytes(storage.join(s3_bucket, "k"), s3_server.s3_options) == b"v"


def test_s3_options_repr_hides_secrets() -> None:
    text = repr(S3Options(endpoint="http://h:1", access_key="AKIA", secret_key="s3cr3t", session_token="t0k"))
    assert "s3cr3t" not in text and "t0k" not in text
    assert "AKIA" in text
