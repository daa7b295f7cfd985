"""Test servers on 127.0.0.1: an `mlflow server` that tests can stop and start again on the same port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server --host 127.0.0.1` with a SQLite backend and proxied artifacts under ``root``.

    Runs in its own session, so :meth:`stop` ends it and its workers by process group id.
    """

    def __init__(self, root: Path, port: int | None = None, artifacts: str | None = None,
                 env: dict[str, str] | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = artifacts or str(self.root / "artifacts")  # s3://... with env naming the endpoint
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> "MlflowServer":
        return self.launch().ready(timeout_s)

    def launch(self) -> "MlflowServer":
        """Start the server without waiting for it (:meth:`ready` waits): other set-up can run meanwhile."""
        exe = Path(sys.executable).with_name("mlflow")
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(exe), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", self.artifacts],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "ab"), start_new_session=True,
            env={**os.environ, **self.env})
        return self

    def ready(self, timeout_s: float = 120) -> "MlflowServer":
        """Wait until the launched server answers /health; stop it and raise if it does not in time."""
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def stop(self, grace_s: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its own workers, by our process group id
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class MotoServer:
    """moto's S3 in server mode on 127.0.0.1 (``moto_server``), the sweep's bucket for cluster tests.

    Clients reach it through ``env`` (``AWS_ENDPOINT_URL`` and dummy credentials), which pyarrow, Ray,
    boto3 and MLflow all read. Runs in its own session; :meth:`stop` ends it by process group id.
    """

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "MLFLOW_S3_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> "MotoServer":
        exe = Path(sys.executable).with_name("moto_server")
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "moto.log", "ab"), start_new_session=True)
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start: {(self.root / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.3)

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        import boto3

        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
