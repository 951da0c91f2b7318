from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from factory import storage
from factory.storage import S3Options, StorageError
from jobs.s3server import SeaweedS3, WeedExited


def test_wrong_secret_is_rejected(s3_server: SeaweedS3, s3_bucket: str) -> None:
    bad = S3Options(
        endpoint=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key="x" * 40,
        max_attempts=1,
    )
    with pytest.raises(StorageError):
        storage.read_bytes(storage.join(s3_bucket, "anything"), bad)


def test_endpoint_and_env_describe_the_server(s3_server: SeaweedS3) -> None:
    port = s3_server.ports["s3"]
    assert s3_server.endpoint == f"127.0.0.1:{port}"
    assert s3_server.env["TOKENFACTORY_S3_ENDPOINT"] == f"http://127.0.0.1:{port}"
    assert s3_server.env["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert len(set(s3_server.ports.values())) == 5


def test_restart_keeps_data_ports_and_credentials(tmp_path: Path) -> None:
    with SeaweedS3(data_dir=tmp_path / "s3") as server:
        bucket = server.create_bucket("keep-me")
        storage.write_bytes(storage.join(bucket, "k"), b"persisted", server.s3_options)
        endpoint, pid = server.endpoint, server.pid
        server.restart()
        assert server.endpoint == endpoint
        assert server.pid != pid
        assert storage.read_bytes(storage.join(bucket, "k"), server.s3_options) == b"persisted"
    assert not server.running
    assert (tmp_path / "s3" / "data").is_dir()  # a caller-provided folder is kept


def test_stop_ends_the_weed_process_and_bucket_names_are_checked(tmp_path: Path) -> None:
    server = SeaweedS3(data_dir=tmp_path / "s3").start()
    try:
        with pytest.raises(ClientError, match="InvalidBucketName"):
            server.create_bucket("x")
        proc = server._proc
        server.stop()
        assert proc is not None and proc.poll() is not None
        assert not server.running
    finally:
        server.close()


def test_a_server_that_exits_at_startup_reports_it(tmp_path: Path) -> None:
    server = SeaweedS3(data_dir=tmp_path, weed="/bin/false")
    with pytest.raises(WeedExited, match="weed exited with code 1 during startup"):
        server.start()
    assert not server.running
    server.close()


def test_the_filer_and_volume_ports_refuse_unsigned_requests(s3_server, s3_bucket):
    import urllib.error
    import urllib.request

    bucket = s3_bucket.removeprefix("s3://")
    s3_server.client().put_object(Bucket=bucket, Key="registry/manifest.json", Body=b"{}")
    filer = f"http://127.0.0.1:{s3_server.ports['filer']}/buckets/{bucket}/registry/manifest.json"
    for method, data in (("GET", None), ("PUT", b'{"forged": true}')):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(filer, data=data, method=method), timeout=5)
        assert e.value.code == 401
    assert s3_server.client().get_object(Bucket=bucket, Key="registry/manifest.json")["Body"].read() == b"{}"


def test_the_secrets_file_is_owner_only(s3_server):
    import stat

    assert stat.S_IMODE((s3_server.root / "s3.json").stat().st_mode) == 0o600
