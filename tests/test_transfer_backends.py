"""The s3:// and file:// backends of tdapp.transfer, and ``transfer serve --s3``, for real.

S3 is moto's server in a child process on loopback (dummy credentials, its
address in AWS_ENDPOINT_URL), so boto3 speaks real HTTP to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from conftest import CliResult, assert_error, run_tdapp
from moto_fixtures import AWS, running_moto
from test_transfer_service import (
    _client_home,  # noqa: F401 - autouse: the client's own TDAPP_HOME
    free_port,
    no_progress,
    random_file,
    start_service,
    wait_for,
)

from tdapp.errors import InputError, NotFoundError, UnavailableError, UsageError
from tdapp.transfer import backend_for, download, upload


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_moto(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


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
    assert re.fullmatch(rf"s3://{bucket}/runs/[A-Za-z0-9_-]{{22}}/volume.zip", url), url
    # A second upload to the same prefix replaces nothing.
    second = upload(source, f"s3://{bucket}/runs/", progress=no_progress)
    assert second != url
    assert sorted(keys(bucket)) == sorted(k.removeprefix(f"s3://{bucket}/") for k in (url, second))
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
    assert re.fullmatch(rf"{folder.as_uri()}/[A-Za-z0-9_-]{{22}}/in.bin", url), url
    assert upload(source, folder.as_uri(), progress=no_progress) != url
    assert upload(source, (folder / "renamed").as_uri()) == (folder / "renamed").as_uri()
    target = tmp_path / "out.bin"
    download(url, target)
    assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["in.bin", "in.bin",
                                                                         "renamed"]


def test_file_backend_failures_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"download of file://.* failed: No such file"):
        download((tmp_path / "missing").as_uri(), tmp_path / "t", progress=no_progress)
    with pytest.raises(InputError, match="cannot read"):
        upload(tmp_path / "missing", tmp_path.as_uri(), progress=no_progress)
    with pytest.raises(InputError, match="no such folder"):
        upload(random_file(tmp_path, "a", 1), (tmp_path / "x" / "y").as_uri())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_put_get_delete_through_the_cli_for_file_urls(
        cli: Callable[..., CliResult], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    source = random_file(tmp_path, "bundle.zip", 50_000)
    put = cli("transfer", "put", source, shared.as_uri() + "/")
    assert put.code == 0, put.err
    url = put.out.strip()
    assert re.fullmatch(rf"{shared.as_uri()}/[A-Za-z0-9_-]{{22}}/bundle.zip", url), url
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = cli("transfer", "get", url)  # to its own name, here
    assert got.code == 0 and (elsewhere / "bundle.zip").read_bytes() == source.read_bytes()
    assert cli("transfer", "delete", url).code == 0
    assert not (shared / "bundle.zip").exists()
    assert_error(cli("transfer", "delete", url), 3, "no such file")
    assert_error(cli("transfer", "get", url, tmp_path / "x"), 3, "No such file")
    assert not (tmp_path / "x").exists()
    assert_error(cli("transfer", "get", f"{shared.as_uri()}/"), 2, "ends in no file name")
    with pytest.raises(NotFoundError):
        download(url, tmp_path / "y", progress=no_progress)


def test_unknown_scheme() -> None:
    with pytest.raises(UsageError, match="unsupported URL scheme"):
        backend_for("ftp://host/x")


def test_the_s3_store_deletes_for_the_uploader_within_its_quota(
        bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    """Attacks DELETE and the quota of an S3 store. What must not happen: an object
    removed by someone without its delete token, more than the quota stored, the delete
    token itself in the bucket."""
    env = {**AWS, "AWS_ENDPOINT_URL": moto_endpoint}
    args = ("--s3", f"s3://{bucket}/up", "--quota", "1000")
    home = tmp_path / "home"
    running = start_service(home, *args, env=env)
    try:
        answer = httpx.post(running.upload_url, content=b"a" * 600, params={"name": "a.bin"})
        url, secret = answer.text.strip(), answer.headers["X-Delete-Token"]
        key = f"up/{url.split('/')[-2]}/a.bin"
        head = s3().head_object(Bucket=bucket, Key=key)
        assert head["Metadata"]["delete-sha256"] == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in str(head)
        for wrong in ({}, {"X-Delete-Token": "A" * 22}, {"X-Delete-Token": url.split("/")[-2]}):
            assert httpx.delete(url, headers=wrong).status_code == 403
        assert keys(bucket) == [key] and httpx.get(url).content == b"a" * 600
        full = httpx.post(running.upload_url, content=b"b" * 600)
        assert full.status_code == 413 and "quota of 1000 bytes" in full.json()["reason"]
        assert keys(bucket) == [key]
        assert httpx.delete(url, headers={"X-Delete-Token": secret}).status_code == 204
        assert keys(bucket) == [] and httpx.get(url).status_code == 404
        kept = upload(random_file(tmp_path, "b.bin", 900), running.upload_url,
                      progress=no_progress)  # the deleted object's bytes are free again
    finally:
        running.stop()
    restarted = start_service(home, *args, env=env)  # the quota counts the bucket at start
    try:
        assert "(900 bytes stored)" in restarted.log.read_text()
        assert httpx.post(restarted.upload_url, content=b"c" * 200).status_code == 413
        assert len(keys(bucket)) == 1
        records = Path(os.environ["TDAPP_HOME"]) / "uploads.json"
        secret = json.loads(records.read_text())[kept]  # kept by the client's upload
        moved = kept.replace(running.base, restarted.base)
        assert httpx.delete(moved, headers={"X-Delete-Token": secret}).status_code == 204
        assert keys(bucket) == []
    finally:
        restarted.stop()


def test_the_s3_store_expires_objects(bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    env = {**AWS, "AWS_ENDPOINT_URL": moto_endpoint}
    running = start_service(tmp_path / "a", "--s3", f"s3://{bucket}/x/", "--keep", "1h",
                            env=env)
    try:  # published two hours ago by its metadata: 404 at once, long before the sweep
        old = f"x/{'B' * 22}/old.bin"
        s3().put_object(Bucket=bucket, Key=old, Body=b"old",
                        Metadata={"created": str(time.time() - 7200)})
        assert httpx.get(f"{running.base}/d/{'B' * 22}/old.bin").status_code == 404
        assert keys(bucket) == [old]
        s3().delete_object(Bucket=bucket, Key=old)
    finally:
        running.stop()
    running = start_service(tmp_path / "b", "--s3", f"s3://{bucket}/x/", "--keep", "1s",
                            env=env)
    try:
        url = httpx.post(running.upload_url, content=b"soon gone").text.strip()
        wait_for(lambda: keys(bucket) == [], "the sweep did not remove the expired object")
        assert httpx.get(url).status_code == 404
        assert "sweep: removed" in running.log.read_text()
    finally:
        running.stop()


def test_put_get_delete_through_the_cli_for_s3_urls(bucket: str, tmp_path: Path,
                                                    cli: Callable[..., CliResult]) -> None:
    source = random_file(tmp_path, "volume.zip", 70_000)
    put = cli("transfer", "put", source, f"s3://{bucket}/runs/", "--json")
    assert put.code == 0, put.err
    assert '"url": "s3://' in put.out and '"delete_token_saved": false' in put.out
    url = json.loads(put.out)["url"]
    got = cli("transfer", "get", url, tmp_path / "back.zip")
    assert got.code == 0 and (tmp_path / "back.zip").read_bytes() == source.read_bytes()
    assert cli("transfer", "delete", url).code == 0
    assert keys(bucket) == []
    assert_error(cli("transfer", "delete", url), 3, "404")
    with pytest.raises(NotFoundError):
        download(url, tmp_path / "gone", progress=no_progress)


def test_up_serves_transfers_from_s3(bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    """``tdapp up --s3 … --keep … --quota … --upload-token-file …``, and ``tdapp transfer
    put`` to the push target it announced."""
    home = tmp_path / "home"
    operator_tokens = tmp_path / "tokens"
    operator_tokens.write_text("an-upload-token-for-up-0123\n")
    env = {**os.environ, **AWS, "AWS_ENDPOINT_URL": moto_endpoint, "TDAPP_HOME": str(home),
           "HOME": str(tmp_path), "TDAPP_TRANSFER_TOKEN_FILE": str(operator_tokens)}
    ports = [str(free_port()) for _ in range(3)]
    with (tmp_path / "up.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tdapp", "up", "--cas-port", ports[0], "--las-port",
             ports[1], "--transfer-port", ports[2], "--s3", f"s3://{bucket}/runs",
             "--keep", "1h", "--quota", "1M", "--upload-token-file", str(operator_tokens)],
            env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (home / "up.json").exists():
            assert process.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "tdapp up did not start"
            time.sleep(0.1)
        assert f"s3://{bucket}/runs/, keep 1h" in (tmp_path / "up.log").read_text()
        push = f"http://127.0.0.1:{ports[2]}/upload"
        assert httpx.post(push, content=b"anonymous").status_code == 401
        source = random_file(tmp_path, "out.zip", 40_000)
        put = run_tdapp("transfer", "put", source, env=env)  # to the announced push target
        assert put.code == 0, put.err
        url = put.out.strip()
        assert keys(bucket) == [f"runs/{url.split('/')[-2]}/out.zip"]
        assert httpx.get(url).content == source.read_bytes()
        too_big = run_tdapp("transfer", "put", random_file(tmp_path, "big", 1 << 20), env=env)
        assert_error(too_big, 3, "quota of 1048576 bytes")
        assert run_tdapp("transfer", "delete", url, env=env).code == 0
        assert keys(bucket) == []
    finally:
        process.terminate()
        process.wait(timeout=30)
