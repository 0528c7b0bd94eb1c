"""The transfer service's S3 store: objects at ``s3://BUCKET/PREFIX<token>/<name>``.

An object is uploaded only once complete (one ``upload_file`` of its spool
file), with two metadata entries: ``delete-sha256`` (the SHA-256 of its delete
token, never the token) and ``created`` (seconds since the epoch, this
service's clock). Expiry reads ``created`` where the object is fetched, and
LastModified in listings (which carry no metadata). Must never make a partial
upload visible under a key.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from tdapp.errors import UnavailableError, UsageError
from tdapp.transfer.store import (
    CHUNK,
    StoredObject,
    download_headers,
    remove_quietly,
    valid_key,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DIGEST_META = "delete-sha256"
CREATED_META = "created"
# LastModified in a listing has whole seconds: counted as up to a second later, an
# object is never swept before its time.
_LISTING_GRAIN = 1.0


def s3_client() -> S3Client:
    """A boto3 S3 client configured as boto3 does (AWS_ENDPOINT_URL, profiles, …)."""
    import boto3  # imported here: boto3 is slow to import

    client: S3Client = boto3.client("s3")
    return client


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``; the key may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise UsageError(f"{url!r} is not an S3 URL (expected s3://bucket/prefix)")
    return parts.netloc, parts.path.lstrip("/")


def _created(metadata: dict[str, str], last_modified: Any) -> float:
    try:
        return float(metadata[CREATED_META])
    except (KeyError, ValueError):
        return float(last_modified.timestamp())


class S3Store:
    """Objects at ``s3://BUCKET/PREFIX<token>/<name>``, uploaded only once complete."""

    def __init__(self, url: str, spool: Path) -> None:
        self.bucket, prefix = parse_s3_url(url)
        self.prefix = prefix if not prefix or prefix.endswith("/") else f"{prefix}/"
        self.client = s3_client()
        self.spool = spool
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.description = f"s3://{self.bucket}/{self.prefix}"

    def check(self) -> None:
        """Fail now, with a reason, when the bucket cannot be reached."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as error:
            raise UnavailableError(f"cannot reach the bucket {self.bucket!r}: "
                                   f"{s3_reason(error)}") from None

    def spool_dir(self) -> Path:
        return self.spool

    def _key(self, token: str, name: str) -> str:
        return f"{self.prefix}{token}/{name}"

    async def publish(self, spooled: Path, token: str, name: str, *,
                      delete_digest: str) -> None:
        metadata = {DIGEST_META: delete_digest, CREATED_META: f"{time.time():.3f}"}
        try:
            await asyncio.to_thread(self.client.upload_file, str(spooled), self.bucket,
                                    self._key(token, name), ExtraArgs={"Metadata": metadata})
        finally:
            remove_quietly(spooled)

    async def respond(self, token: str, name: str, request: web.Request, *,
                      oldest: float | None) -> web.StreamResponse | None:
        from botocore.exceptions import ClientError

        try:
            answer = await asyncio.to_thread(self.client.get_object, Bucket=self.bucket,
                                             Key=self._key(token, name))
        except ClientError as error:
            if s3_status(error) == 404:
                return None
            raise
        body: Any = answer["Body"]
        try:
            created = _created(dict(answer.get("Metadata", {})), answer["LastModified"])
            if oldest is not None and created < oldest:
                return None
            response = web.StreamResponse(
                headers=download_headers(name, int(answer["ContentLength"])))
            await response.prepare(request)
            while chunk := await asyncio.to_thread(body.read, CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            body.close()

    async def info(self, token: str, name: str) -> StoredObject | None:
        from botocore.exceptions import ClientError

        try:
            head = await asyncio.to_thread(self.client.head_object, Bucket=self.bucket,
                                           Key=self._key(token, name))
        except ClientError as error:
            if s3_status(error) == 404:
                return None
            raise
        metadata = dict(head.get("Metadata", {}))
        return StoredObject(token, name, int(head["ContentLength"]),
                            _created(metadata, head["LastModified"]),
                            metadata.get(DIGEST_META))

    async def remove(self, token: str, name: str) -> bool:
        # S3 answers a delete alike whether or not the key was there.
        await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket,
                                Key=self._key(token, name))
        return True

    async def inventory(self) -> list[StoredObject]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> list[StoredObject]:
        found = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", []):
                token, _, name = item["Key"][len(self.prefix):].partition("/")
                if valid_key(token, name):
                    found.append(StoredObject(token, name, int(item["Size"]),
                                              item["LastModified"].timestamp()
                                              + _LISTING_GRAIN))
        return found

    async def tidy(self, older_than: float) -> list[str]:
        # Nothing: an object appears only with its upload. (Parts of a multipart upload a
        # killed server left are the bucket's lifecycle rule's: docs/operations.md.)
        return []


def s3_status(error: Any) -> int | None:
    meta = getattr(error, "response", {}).get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode")
    return int(status) if status is not None else None


def s3_reason(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        detail = response.get("Error", {})
        code = detail.get("Code", "")
        message = detail.get("Message", "")
        return " ".join(f"{code} {message}".split()) or str(error)
    return " ".join(str(error).split())
