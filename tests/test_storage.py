"""One contract, run against every backend: a local directory and a real S3 API server."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sdqueue.config import Settings
from sdqueue.errors import ServiceUnavailable, StorageError
from sdqueue.storage import LocalStore, S3Store, Store, open_store


def download(url: str) -> bytes:
    if url.startswith("file://"):
        return Path(urlsplit(url).path).read_bytes()
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return open_store(Settings(storage_url=(tmp_path / "images").as_uri()))
    endpoint = request.getfixturevalue("s3_endpoint")
    url = request.getfixturevalue("s3_storage_url")
    return open_store(Settings(storage_url=url, s3_endpoint_url=endpoint, s3_create_bucket=True))


class TestStoreContract:
    def test_put_get_exists_url(self, store: Store) -> None:
        key = f"{store.prefix}/job1/0.png".lstrip("/")
        assert not store.exists(key)
        store.put(key, b"\x89PNG fake", "image/png")
        assert store.exists(key)
        assert store.get(key) == b"\x89PNG fake"
        assert download(store.url(key)) == b"\x89PNG fake"

    def test_overwrite_replaces_whole_object(self, store: Store) -> None:
        store.put("k/0.png", b"first version, long", "image/png")
        store.put("k/0.png", b"second", "image/png")
        assert store.get("k/0.png") == b"second"

    def test_missing_object_raises_storage_error(self, store: Store) -> None:
        with pytest.raises(StorageError):
            store.get("nope/0.png")

    def test_check_passes_when_reachable(self, store: Store) -> None:
        store.check()


def test_open_store_picks_backend_from_url(tmp_path: Path, s3_endpoint: str) -> None:
    local = open_store(Settings(storage_url=(tmp_path / "x").as_uri()))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "x"
    s3 = open_store(Settings(storage_url="s3://bucket-a/some/prefix", s3_endpoint_url=s3_endpoint))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket-a", "some/prefix")


def test_s3_object_has_png_content_type(s3_endpoint: str, s3_storage_url: str) -> None:
    store = open_store(
        Settings(storage_url=s3_storage_url, s3_endpoint_url=s3_endpoint, s3_create_bucket=True)
    )
    assert isinstance(store, S3Store)
    store.put("a/0.png", b"png", "image/png")
    head = store._client.head_object(Bucket=store.bucket, Key="a/0.png")
    assert head["ContentType"] == "image/png"


def test_missing_bucket_is_unavailable(s3_endpoint: str) -> None:
    store = open_store(Settings(storage_url="s3://no-such-bucket-zz/p", s3_endpoint_url=s3_endpoint))
    with pytest.raises(ServiceUnavailable, match="no-such-bucket-zz"):
        store.check()


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(StorageError, match="escapes"):
        store.put("../outside.png", b"x", "image/png")
    assert not (tmp_path / "outside.png").exists()


def test_urls_are_signed_for_the_public_endpoint(s3_endpoint: str, s3_storage_url: str) -> None:
    """The worker talks to S3 as 127.0.0.1 (compose: minio:9000); clients get URLs for localhost."""
    public = s3_endpoint.replace("127.0.0.1", "localhost")
    store = open_store(
        Settings(
            storage_url=s3_storage_url,
            s3_endpoint_url=s3_endpoint,
            s3_public_endpoint_url=public,
            s3_create_bucket=True,
        )
    )
    store.put("a/0.png", b"png bytes", "image/png")
    url = store.url("a/0.png")
    assert urlsplit(url).netloc == urlsplit(public).netloc
    assert download(url) == b"png bytes"
    internal = open_store(Settings(storage_url=s3_storage_url, s3_endpoint_url=s3_endpoint))
    assert urlsplit(internal.url("a/0.png")).netloc == urlsplit(s3_endpoint).netloc
