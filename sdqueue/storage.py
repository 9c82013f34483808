"""Where images go: one small protocol, two backends (S3-compatible and a local directory).

Keys are relative ("renders/JOB_ID/0.png"); the store's URL decides the bucket and prefix.
A write either lands whole or raises StorageError: the local backend writes to a temporary
file and renames it, S3 PUTs are atomic by nature.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from .config import Settings
from .errors import ServiceUnavailable, StorageError

logger = logging.getLogger(__name__)


class Store(Protocol):
    """The seam between the worker and wherever images live."""

    prefix: str

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def url(self, key: str) -> str:
        """A URL a client can download the object from (presigned for S3)."""
        ...

    def check(self) -> None:
        """Raise ServiceUnavailable unless the store can be reached and written to."""
        ...


class LocalStore:
    """Images in a directory on this machine: the demo's default and for single-box setups."""

    def __init__(self, root: Path, prefix: str = "") -> None:
        self.root = root
        self.prefix = prefix

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"key {key!r} escapes the storage directory")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees half a PNG.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {key!r}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceUnavailable(f"storage directory {self.root} is not writable: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise ServiceUnavailable(f"storage directory {self.root} is not writable")


class S3Store:
    """Images in an S3-compatible bucket (AWS S3, MinIO, R2, GCS interop)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str | None = None,
        presign_expiry_s: int = 3600,
        create_bucket: bool = False,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.presign_expiry_s = presign_expiry_s
        # Path-style addressing works everywhere custom endpoints are used (MinIO has no
        # virtual-host DNS); boto3's own retries cover throttling and transient 5xx. SigV4, since
        # boto3 may otherwise presign with SigV2, which AWS S3 refuses in most regions.
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"} if endpoint_url else {},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        )
        self._client: Any = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # A presigned URL names its host inside the signature, so a client that reaches S3 by
        # another name (the host's localhost:9000 for the worker's minio:9000) needs URLs signed
        # for that name. Signing is offline: this second client never opens a connection.
        self._signer: Any = (
            boto3.client("s3", endpoint_url=public_endpoint_url, region_name=region, config=config)
            if public_endpoint_url
            else self._client
        )
        if create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            logger.info("creating bucket %s", self.bucket)
            self._client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot upload s3://{self.bucket}/{key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body: bytes = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot download s3://{self.bucket}/{key}: {exc}") from exc
        return body

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot check s3://{self.bucket}/{key}: {exc}") from exc
        return True

    def url(self, key: str) -> str:
        url: str = self._signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_expiry_s
        )
        return url

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise ServiceUnavailable(f"bucket {self.bucket!r} is not reachable: {exc}") from exc


def open_store(settings: Settings) -> Store:
    """The store named by SDQ_STORAGE_URL."""
    parts = urlsplit(settings.storage_url)
    if parts.scheme == "file":
        return LocalStore(Path(unquote(parts.path)))
    return S3Store(
        parts.netloc,
        parts.path.strip("/"),
        endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url,
        region=settings.s3_region,
        presign_expiry_s=settings.presign_expiry_s,
        create_bucket=settings.s3_create_bucket,
    )
