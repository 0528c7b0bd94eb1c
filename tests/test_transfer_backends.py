"""The s3:// and file:// backends of tdapp.transfer, and ``transfer serve --s3``, for real.

S3 is moto's server in a child process on loopback (dummy credentials, its
address in AWS_ENDPOINT_URL), so boto3 speaks real HTTP to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from test_transfer_service import free_port, no_progress, random_file, start_service

from tdapp.errors import InputError, UnavailableError, UsageError
from tdapp.transfer import backend_for, download, upload

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                    "-p", str(port)], stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **AWS})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1, trust_env=False)
                break
            except httpx.HTTPError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture
def bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in {**AWS, "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3().create_bucket(Bucket=name)
    return name


def s3() -> Any:
    return boto3.client("s3")


def keys(bucket: str) -> list[str]:
    return sorted(item["Key"] for item in s3().list_objects_v2(Bucket=bucket).get("Contents", []))


def test_s3_backend_round_trip(bucket: str, tmp_path: Path) -> None:
    source = random_file(tmp_path, "volume.zip", 600_000)
    url = upload(source, f"s3://{bucket}/runs/", progress=no_progress)
    assert url == f"s3://{bucket}/runs/volume.zip"
    assert keys(bucket) == ["runs/volume.zip"]
    assert upload(source, f"s3://{bucket}/exact/name.bin") == f"s3://{bucket}/exact/name.bin"
    target = tmp_path / "back.zip"
    download(url, target)
    assert target.read_bytes() == source.read_bytes()


def test_s3_backend_missing_object_leaves_no_file(bucket: str, tmp_path: Path) -> None:
    target = tmp_path / "t"
    with pytest.raises(InputError, match=rf"download of s3://{bucket}/nope failed: 404"):
        download(f"s3://{bucket}/nope", target, progress=no_progress)
    with pytest.raises(InputError, match="failed"):
        download("s3://no-such-bucket-here/x", target, progress=no_progress)
    assert list(tmp_path.iterdir()) == []


def test_s3_backend_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {**AWS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                        "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UnavailableError, match="cannot reach S3"):
        download("s3://b/k", tmp_path / "t", progress=no_progress)
    assert list(tmp_path.iterdir()) == []


def test_serve_with_s3(bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    running = start_service(tmp_path / "home", "--s3", f"s3://{bucket}/up", "--max-size", "1000",
                            env={**AWS, "AWS_ENDPOINT_URL": moto_endpoint})
    try:
        data = os.urandom(900)
        url = upload(random_file(tmp_path, "r.bin", 900), running.upload_url,
                     progress=no_progress)
        token = url.split("/")[-2]
        assert keys(bucket) == [f"up/{token}/r.bin"]
        target = tmp_path / "back"
        download(url, target, progress=no_progress)
        assert target.read_bytes() == (tmp_path / "r.bin").read_bytes()
        answer = httpx.get(url)
        assert answer.headers["content-type"] == "application/octet-stream"
        assert answer.headers["content-length"] == "900"
        assert httpx.post(running.upload_url, content=data + data).status_code == 413
        assert httpx.get(url.replace(token, "A" * 22)).status_code == 404
        assert keys(bucket) == [f"up/{token}/r.bin"]
        spool = tmp_path / "home" / "transfer" / "spool"
        assert list(spool.iterdir()) == []
    finally:
        running.stop()


def test_serve_with_an_unreachable_bucket_fails_with_a_reason(bucket: str,
                                                              tmp_path: Path) -> None:
    env = {**os.environ, "TDAPP_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", __import__("test_transfer_service").CLI,
                           "transfer", "serve", "--port", str(free_port()), "--s3",
                           "s3://no-such-bucket-at-all/p"], capture_output=True, text=True,
                          timeout=60, check=False, env=env)
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("tdapp: error: cannot reach the bucket 'no-such-bucket-at-all'")


def test_file_backend(tmp_path: Path) -> None:
    source = random_file(tmp_path, "in.bin", 100_000)
    folder = tmp_path / "shared"
    folder.mkdir()
    url = upload(source, folder.as_uri(), progress=no_progress)
    assert url == (folder / "in.bin").as_uri()
    assert upload(source, (folder / "renamed").as_uri()) == (folder / "renamed").as_uri()
    target = tmp_path / "out.bin"
    download(url, target)
    assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["in.bin", "renamed"]


def test_file_backend_failures_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"download of file://.* failed: No such file"):
        download((tmp_path / "missing").as_uri(), tmp_path / "t", progress=no_progress)
    with pytest.raises(InputError, match="cannot read"):
        upload(tmp_path / "missing", tmp_path.as_uri(), progress=no_progress)
    with pytest.raises(InputError, match="no such folder"):
        upload(random_file(tmp_path, "a", 1), (tmp_path / "x" / "y").as_uri())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_unknown_scheme() -> None:
    with pytest.raises(UsageError, match="unsupported URL scheme"):
        backend_for("ftp://host/x")
