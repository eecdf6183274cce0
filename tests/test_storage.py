"""Storage: the same behaviour for a local folder and for S3.

S3 runs against a real S3-API HTTP server on 127.0.0.1 (moto's,
``pipeline/testing/s3server.py``), and for failures against a proxy that answers 503 SlowDown
or cuts bodies: nothing in boto3 is mocked, every S3 call here is HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

import pipeline.storage.s3 as s3_module
from pipeline.storage import (
    AccessDeniedError,
    LocalStorage,
    ObjectNotFoundError,
    RetryPolicy,
    S3Options,
    S3Storage,
    Storage,
    StorageError,
    call_with_retries,
    check_path,
    list_uri,
    open_storage,
    open_uri,
    read_uri,
    safe_name,
    split_uri,
)
from pipeline.testing.s3server import (
    SECRET_KEY,
    CountingProxy,
    FaultProxy,
    FlakyProxy,
    _error_response,
)

MiB = 1 << 20
BUCKET = "influence-ssl-test"
FAST = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """One bucket for the session; each test works under its own unique prefix."""
    S3Storage(BUCKET).client.create_bucket(Bucket=BUCKET)
    return BUCKET


def fresh_s3(**options: object) -> S3Storage:
    return S3Storage(BUCKET, f"t-{uuid.uuid4().hex[:12]}", S3Options(retry=FAST, **options))


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Storage:
    if request.param == "local":
        return LocalStorage(os.path.join(tmp_path, "root"))
    request.getfixturevalue("s3_bucket")
    return fresh_s3()


@pytest.fixture
def s3(s3_bucket: str) -> S3Storage:
    return fresh_s3()


def with_options(storage: S3Storage, **changes: object) -> S3Storage:
    return S3Storage(storage.bucket, storage.prefix, replace(storage.options, **changes))


# ----------------------------------------------------------------------------- behaviour


def test_round_trip(storage: Storage) -> None:
    storage.write_bytes("a.bin", b"hello")
    storage.write_bytes("nested/deep/b.bin", bytearray(b"\x00\xff" * 10))
    storage.write_bytes("view.bin", memoryview(b"abcdef")[1:4])
    storage.write_bytes("empty.bin", b"")
    assert storage.read_bytes("a.bin") == b"hello"
    assert storage.read_bytes("nested/deep/b.bin") == b"\x00\xff" * 10
    assert storage.read_bytes("view.bin") == b"bcd"
    assert storage.read_bytes("empty.bin") == b""


def test_overwrite(storage: Storage) -> None:
    storage.write_bytes("x", b"old content, longer")
    storage.write_bytes("x", b"new")
    assert storage.read_bytes("x") == b"new"
    assert storage.size("x") == 3


def test_list_prefixes_nested_sorted(storage: Storage) -> None:
    assert storage.list() == []
    paths = ["c", "b/2", "a/x/1", "a/1", "ab/1", "a/x/y/z", "a/x-2"]
    for path in paths:
        storage.write_bytes(path, path.encode())
    assert storage.list() == sorted(paths)
    assert storage.list("a/") == ["a/1", "a/x-2", "a/x/1", "a/x/y/z"]
    assert storage.list("a") == ["a/1", "a/x-2", "a/x/1", "a/x/y/z", "ab/1"]
    assert storage.list("a/x/") == ["a/x/1", "a/x/y/z"]
    assert storage.list("a/x") == ["a/x-2", "a/x/1", "a/x/y/z"]
    assert storage.list("nope/") == []
    assert storage.list("c") == ["c"]


def test_delete(storage: Storage) -> None:
    storage.write_bytes("d/x", b"1")
    storage.write_bytes("d/y", b"2")
    storage.delete("d/x")
    storage.delete("d/x")  # missing is fine
    storage.delete("never/existed")
    assert not storage.exists("d/x")
    assert storage.list() == ["d/y"]


def test_exists_and_size(storage: Storage) -> None:
    storage.write_bytes("dir/obj", b"12345")
    assert storage.exists("dir/obj")
    assert not storage.exists("dir")  # a folder is not an object
    assert not storage.exists("missing")
    assert storage.size("dir/obj") == 5
    with pytest.raises(FileNotFoundError):
        storage.size("missing")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing")
    with pytest.raises(FileNotFoundError):
        storage.open_read("missing")


def test_streaming_read_in_chunks(storage: Storage) -> None:
    data = os.urandom(3_000_000)
    storage.write_bytes("big.bin", data)
    chunk = 64 * 1024
    parts = []
    with storage.open_read("big.bin") as f:
        while part := f.read(chunk):
            assert len(part) == chunk or len(parts) == len(data) // chunk  # short only at the end
            parts.append(part)
        assert f.read(chunk) == b""
    assert f.closed
    assert b"".join(parts) == data
    with storage.open_read("big.bin") as f:  # seekable, so headers and footers can be read
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(1_000_000)
        assert f.read(5) == data[1_000_000:1_000_005]
        assert f.tell() == 1_000_005


def test_multipart_write(storage: Storage) -> None:
    if isinstance(storage, S3Storage):
        storage = with_options(storage, multipart_threshold=5 * MiB, part_size=5 * MiB)
    data = os.urandom(12 * MiB)
    storage.write_bytes("mp.bin", data)
    assert storage.read_bytes("mp.bin") == data
    assert storage.size("mp.bin") == len(data)
    if isinstance(storage, S3Storage):  # a multipart ETag ends with the part count
        key = f"{storage.prefix}/mp.bin"
        etag = storage.client.head_object(Bucket=storage.bucket, Key=key)["ETag"]
        assert etag.strip('"').endswith("-3")


def test_child(storage: Storage) -> None:
    sub = storage.child("runs/r1")
    assert sub.uri == storage.url("runs/r1")
    sub.write_bytes("index/part-0", b"p0")
    assert storage.read_bytes("runs/r1/index/part-0") == b"p0"
    assert sub.list() == ["index/part-0"]
    assert sub.url("index/part-0") == storage.url("runs/r1/index/part-0")
    assert storage.child("runs").child("r1").read_bytes("index/part-0") == b"p0"


BAD_PATHS = ["", "/abs", "../x", "a/../b", "a/..", ".", "./a", "a//b", "a/", "a\\b", "a\x00b"]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_path_validation(storage: Storage, path: str) -> None:
    calls = [
        lambda: storage.read_bytes(path),
        lambda: storage.write_bytes(path, b"x"),
        lambda: storage.open_read(path),
        lambda: storage.exists(path),
        lambda: storage.size(path),
        lambda: storage.delete(path),
        lambda: storage.child(path),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_path_validation_messages(storage: Storage) -> None:
    with pytest.raises(ValueError, match="relative"):
        storage.read_bytes("/etc/passwd")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.write_bytes("keys/../../escape", b"x")
    with pytest.raises(ValueError, match="reserved"):
        storage.write_bytes("a/.tmp-storage-x", b"x")
    with pytest.raises(ValueError):
        storage.list("../")
    with pytest.raises(TypeError):
        check_path(b"bytes")  # type: ignore[arg-type]
    assert check_path("ok/name.bin") == "ok/name.bin"


def test_uri_helpers(storage: Storage) -> None:
    for path in ["shards/part-0", "shards/part-1", "shards/sub/x", "shards-old/y", "z"]:
        storage.write_bytes(path, path.encode())
    uri = storage.url("shards/part-1")
    assert read_uri(uri) == b"shards/part-1"
    with open_uri(uri) as f:
        assert f.read(6) == b"shards"
    parent, name = split_uri(uri)
    assert (parent.uri, name) == (storage.url("shards"), "part-1")
    assert open_storage(storage.uri).read_bytes("z") == b"z"
    folder = storage.url("shards") + "/"
    assert list_uri(folder) == [
        storage.url(p) for p in ["shards/part-0", "shards/part-1", "shards/sub/x"]
    ]
    assert list_uri(storage.url("shards/part-")) == [storage.url("shards/part-0"), uri]
    assert storage.url("shards-old/y") in list_uri(storage.url("shards"))  # a string prefix
    assert list_uri(storage.uri + "/") == [storage.url(p) for p in storage.list()]


def test_pickle_round_trip(storage: Storage) -> None:
    storage.write_bytes("p", b"payload")  # creates the client first
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.uri == storage.uri
    assert clone.read_bytes("p") == b"payload"


# ----------------------------------------------------------------------------- URIs, names


def test_open_storage_parsing(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert open_storage("file:///data/x%20y").uri == "/data/x y"
    assert open_storage("/data/x/").uri == "/data/x"
    assert open_storage("rel/x").uri == os.path.join(os.getcwd(), "rel/x")
    assert isinstance(open_storage("rel/x"), LocalStorage)
    assert open_storage("~/x").uri == os.path.expanduser("~/x")
    for uri, want in [
        ("s3://bkt", "s3://bkt"),
        ("s3://bkt/", "s3://bkt"),
        ("s3://bkt/p/q/", "s3://bkt/p/q"),
    ]:
        s3 = open_storage(uri)
        assert isinstance(s3, S3Storage) and s3.uri == want
    assert open_storage("s3://bkt/p").url("a/b") == "s3://bkt/p/a/b"
    for bad in ["", "gs://bkt/x", "file://otherhost/x", "s3://bkt/../x", "s3://bkt//x", "s3://"]:
        with pytest.raises(ValueError):
            open_storage(bad)
    for bad in ["s3://bkt", "s3://bkt/", "s3://bkt/dir/", "/data/dir/"]:
        with pytest.raises(ValueError, match="not an object URI"):
            split_uri(bad)
    local, name = split_uri("file:///data/shards/part-0.tar")
    assert (local.uri, name) == ("/data/shards", "part-0.tar")
    remote, name = split_uri("s3://bkt/obj")
    assert (remote.uri, name) == ("s3://bkt", "obj")


def test_safe_name() -> None:
    texts = [
        "plain-name_1.jpg",
        "a b",
        "a_b",
        "a/b",
        "a\\b",
        "../x",
        "..",
        ".",
        "",
        ".hidden",
        "_hidden",
        "é",
        "è",
        "x" * 300,
        "x" * 299 + "y",
        "name-0123456789abcdef",
        "n\x00ul",
        "\ud800",
    ]
    names = [safe_name(t) for t in texts]
    assert len(set(names)) == len(texts)  # distinct inputs stay distinct
    assert names[0] == "plain-name_1.jpg"  # a clean name is kept as is
    assert names[texts.index("a_b")] == "a_b"
    assert names[texts.index("name-0123456789abcdef")] != "name-0123456789abcdef"
    for text, name in zip(texts, names, strict=True):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
        assert len(name) <= 100
        assert not name.startswith(".")
        assert check_path(name) == name
        assert safe_name(text) == name  # stable
    assert len(safe_name("y" * 1000, max_len=40)) == 40
    with pytest.raises(ValueError):
        safe_name("x", max_len=10)


# ----------------------------------------------------------------------------- local specifics


def test_local_atomic_publication(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes("a/obj", b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes("a/obj", b"new")
    monkeypatch.undo()
    assert storage.read_bytes("a/obj") == b"old"  # the old object, whole
    assert os.listdir(os.path.join(tmp_path, "a")) == ["obj"]  # no temp file left behind
    with open(os.path.join(tmp_path, "a", ".tmp-storage-123"), "wb") as f:
        f.write(b"a writer in flight")
    assert storage.list() == ["a/obj"]


def test_local_write_honours_umask(tmp_path: os.PathLike[str]) -> None:
    storage = LocalStorage(tmp_path)
    old = os.umask(0o022)
    try:
        storage.write_bytes("f", b"x")
    finally:
        os.umask(old)
    assert os.stat(os.path.join(tmp_path, "f")).st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- retries


def client_error(code: str, status: int, op: str = "GetObject") -> ClientError:
    response = {
        "Error": {"Code": code, "Message": "msg"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, op)  # type: ignore[arg-type]


class Flaky:
    """Raises the given errors in turn, then returns "ok"; counts calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_retry_wrapper_retries_throttling_then_succeeds() -> None:
    sleeps: list[float] = []
    flaky = Flaky(client_error("SlowDown", 503), EndpointConnectionError(endpoint_url="http://x"))
    policy = RetryPolicy(max_attempts=8, base_delay=0.2, max_delay=10.0)
    assert (
        call_with_retries(flaky, op="read", uri="s3://b/k", policy=policy, sleep=sleeps.append)
        == "ok"
    )
    assert flaky.calls == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.2 and 0 <= sleeps[1] <= 0.4


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (client_error("NoSuchKey", 404), ObjectNotFoundError),
        (client_error("404", 404, "HeadObject"), ObjectNotFoundError),
        (client_error("NoSuchBucket", 404), ObjectNotFoundError),
        (client_error("AccessDenied", 403), AccessDeniedError),
        (client_error("InvalidArgument", 400), StorageError),
    ],
)
def test_retry_wrapper_does_not_retry_client_errors(error: ClientError, kind: type) -> None:
    flaky = Flaky(error)
    with pytest.raises(kind, match="s3://b/k") as info:
        call_with_retries(flaky, op="read", uri="s3://b/k", sleep=lambda _: None)
    assert flaky.calls == 1
    assert info.value.__cause__ is error


def test_retry_wrapper_is_bounded() -> None:
    flaky = Flaky(*[client_error("InternalError", 500)] * 10)
    with pytest.raises(StorageError, match="after 4 attempts") as info:
        call_with_retries(
            flaky, op="write", uri="s3://b/k", policy=RetryPolicy(4), sleep=lambda _: None
        )
    assert flaky.calls == 4
    assert not isinstance(info.value, FileNotFoundError)


def test_retry_wrapper_passes_other_errors_through() -> None:
    flaky = Flaky(KeyError("a bug, not the network"))
    with pytest.raises(KeyError):
        call_with_retries(flaky, op="read", uri="s3://b/k", sleep=lambda _: None)
    assert flaky.calls == 1


def test_backoff_is_full_jitter_and_capped() -> None:
    policy = RetryPolicy(base_delay=0.2, max_delay=1.0)
    delays = [[policy.delay(n) for _ in range(200)] for n in range(6)]
    for n, ds in enumerate(delays):
        assert all(0 <= d <= min(1.0, 0.2 * 2**n) for d in ds)
    assert max(delays[5]) > 0.5  # grows until the cap


# ----------------------------------------------------------------------------- S3 over the wire


def test_retry_over_the_network_503(s3: S3Storage) -> None:
    s3.write_bytes("obj", b"payload")
    with FlakyProxy(s3.options.endpoint_url or "", slowdowns=2) as proxy:
        # botocore never retries: the wrapper alone rides out the 503s.
        flaky = with_options(s3, endpoint_url=proxy.endpoint_url)
        flaky.write_bytes("obj2", b"through the proxy")
        assert proxy.rejected == 2
        assert flaky.read_bytes("obj") == b"payload"
    assert proxy.requests[:3] == [f"PUT /{BUCKET}/{s3.prefix}/obj2 "] * 3
    assert s3.read_bytes("obj2") == b"through the proxy"


def test_retry_over_the_network_503_gives_up(s3: S3Storage) -> None:
    with FlakyProxy(s3.options.endpoint_url or "", slowdowns=100) as proxy:
        flaky = with_options(s3, endpoint_url=proxy.endpoint_url)
        with pytest.raises(StorageError, match=r"\(after 5 attempts\): SlowDown \(HTTP 503\)"):
            flaky.read_bytes("obj")
        assert proxy.rejected == FAST.max_attempts


def test_broken_body_is_resumed(s3: S3Storage) -> None:
    data = os.urandom(3 * MiB)
    s3.write_bytes("big", data)
    with FlakyProxy(s3.options.endpoint_url or "", truncations=1) as proxy:
        flaky = with_options(s3, endpoint_url=proxy.endpoint_url)
        with flaky.open_read("big") as f:
            assert b"".join(iter(lambda: f.read(100_000), b"")) == data
        assert proxy.truncated == 1
        assert any("bytes=" in r for r in proxy.requests)  # resumed with a Range GET
        proxy.truncations = 2
        assert flaky.read_bytes("big") == data  # the whole GET is retried
        assert proxy.truncated == 2


def test_list_follows_pages(s3: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_module, "_LIST_PAGE_SIZE", 2)  # 5 keys -> 3 ListObjectsV2 pages
    paths = [f"k/{i}" for i in range(5)]
    for path in paths:
        s3.write_bytes(path, b"")
    assert s3.list() == paths
    assert s3.list("k/3") == ["k/3"]


def test_object_changed_while_reading(s3: S3Storage) -> None:
    s3.write_bytes("v", b"a" * 1000)
    with s3.open_read("v") as f:
        f.seek(10)  # drops the stream; the next read reopens pinned to the first ETag
        s3.write_bytes("v", b"b" * 1000)
        with pytest.raises(StorageError, match="changed while being read"):
            f.read(5)


def test_missing_bucket(s3_bucket: str) -> None:
    storage = S3Storage("no-such-bucket-here", options=S3Options(retry=FAST))
    with pytest.raises(ObjectNotFoundError, match="bucket does not exist"):
        storage.list()
    with pytest.raises(ObjectNotFoundError, match="s3://no-such-bucket-here/k"):
        storage.read_bytes("k")


def test_no_secret_in_reprs_errors_or_pickles(s3: S3Storage) -> None:
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY  # the client really holds it
    s3.write_bytes("x", b"1")
    assert s3.client is not None
    with s3.open_arrow("x") as f:  # pyarrow's filesystem holds the keys too, never the storage
        assert f.read() == b"1"
    shown = [repr(s3), str(s3), repr(s3.options), repr(s3.child("c"))]
    with pytest.raises(StorageError) as info:
        s3.read_bytes("missing")
    shown += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
    assert s3.url("missing") in str(info.value)
    assert all(SECRET_KEY not in text for text in shown)
    assert SECRET_KEY.encode() not in pickle.dumps(s3)
    assert pickle.loads(pickle.dumps(s3))._client is None


def test_endpoint_from_environment(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert S3Storage("bkt").options.endpoint_url == s3_endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    assert S3Storage("bkt").options.endpoint_url == "http://127.0.0.1:1"  # service-specific wins
    secret_url = "http://user:pw@127.0.0.1:2"
    assert "pw" not in repr(S3Storage("bkt", options=S3Options(endpoint_url=secret_url)))


# ----------------------------------------------------------------------------- batched deletes


def test_delete_many(storage: Storage) -> None:
    paths = [f"many/{i}" for i in range(7)]
    for path in paths:
        storage.write_bytes(path, b"x")
    storage.delete_many(iter([*paths[:5], "never/existed"]))  # any iterable; missing is fine
    storage.delete_many([])
    assert storage.list() == paths[5:]
    with pytest.raises(ValueError, match="relative"):
        storage.delete_many(["/abs"])
    assert storage.list() == paths[5:]


def test_delete_many_batches_deleteobjects(s3: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 3)  # 7 keys -> 3 requests
    paths = [f"k/{i}" for i in range(7)]
    for path in paths:
        s3.write_bytes(path, b"x")
    with CountingProxy(s3.options.endpoint_url or "") as proxy:
        with_options(s3, endpoint_url=proxy.endpoint_url).delete_many(paths)
    assert [r.split("?")[-1] for r in proxy.requests] == ["delete "] * 3
    assert s3.list() == []


class RefusingProxy(CountingProxy):
    """Answers the first DeleteObjects (after forwarding it) as if S3 had refused two keys:
    one with a retryable code, one for good."""

    def __init__(self, upstream: str, retryable: str, refused: str) -> None:
        super().__init__(upstream)
        self.refusals = [(retryable, "InternalError"), (refused, "AccessDenied")]

    def _forward(self, lines: list[str], body: bytes) -> bytes:
        response = super()._forward(lines, body)
        if "?delete" not in lines[0] or not self.refusals:
            return response
        errors = "".join(
            f"<Error><Key>{key}</Key><Code>{code}</Code><Message>no</Message></Error>"
            for key, code in self.refusals
        )
        self.refusals = []
        xml = f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>{errors}</DeleteResult>'
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {len(xml)}"
        return f"{head}\r\nConnection: close\r\n\r\n{xml}".encode()


def test_delete_many_surfaces_errors_per_key(s3: S3Storage) -> None:
    paths = [f"d/{i}" for i in range(4)]
    for path in paths:
        s3.write_bytes(path, b"x")
    key = f"{s3.prefix}/d/%d"
    with RefusingProxy(s3.options.endpoint_url or "", key % 1, key % 2) as proxy:
        flaky = with_options(s3, endpoint_url=proxy.endpoint_url)
        with pytest.raises(StorageError, match="1 of 4 objects") as info:
            flaky.delete_many(paths)
    assert f"s3://{BUCKET}/{key % 2}: AccessDenied" in str(info.value)
    assert key % 1 not in str(info.value)
    sent = [re.findall(rb"<Key>([^<]*)</Key>", body) for body in proxy.bodies]
    assert sent == [[(key % i).encode() for i in range(4)], [(key % 1).encode()]]  # resent alone


# ----------------------------------------------------------------------------- one retry layer

FAULTS = ("slowdown", "internal", "reset")


@contextlib.contextmanager
def through_faults(s3: S3Storage, seed: int) -> Iterator[tuple[FaultProxy, S3Storage]]:
    """The store behind a proxy failing a third of requests (503, 500, reset), with patient
    retries and 5 MiB multipart parts."""
    with FaultProxy(s3.options.endpoint_url or "", rate=0.3, seed=seed, faults=FAULTS) as proxy:
        yield (
            proxy,
            with_options(
                s3,
                endpoint_url=proxy.endpoint_url,
                multipart_threshold=5 * MiB,
                part_size=5 * MiB,
                retry=RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.05),
            ),
        )


def test_buffer_writes_are_whole_through_faults(s3: S3Storage) -> None:
    """A bytes-like body that is not bytes (a search shard's numpy buffer) is sent without a
    copy; a retried attempt sends it again from its first byte, small or multipart."""
    data = os.urandom(7 * MiB)
    with through_faults(s3, seed=5) as (proxy, flaky):
        for n in range(12):
            flaky.write_bytes(f"small-{n}", memoryview(data)[n * 1000 : (n + 2) * 1000])
        flaky.write_bytes("big", memoryview(bytearray(data)))
    assert sum(proxy.counts.values()) >= 3, proxy.counts
    for n in range(12):
        assert s3.read_bytes(f"small-{n}") == data[n * 1000 : (n + 2) * 1000]
    assert s3.read_bytes("big") == data


def test_exactly_one_retry_layer(s3: S3Storage) -> None:
    """Every request, whatever the client (boto3, s3transfer, pyarrow), is attempted exactly
    the policy's number of times when every attempt fails: no layer retries another's retry."""
    s3.write_bytes("obj", b"payload")
    big = os.urandom(6 * MiB)
    with FlakyProxy(s3.options.endpoint_url or "", slowdowns=10_000) as proxy:
        flaky = with_options(
            s3, endpoint_url=proxy.endpoint_url, multipart_threshold=5 * MiB, part_size=5 * MiB
        )
        calls = {
            "read": lambda: flaky.read_bytes("obj"),
            "write": lambda: flaky.write_bytes("new", b"1"),
            "multipart": lambda: flaky.write_bytes("big", big),
            "list": flaky.list,
            "exists": lambda: flaky.exists("obj"),
            "delete": lambda: flaky.delete("obj"),
            "delete_many": lambda: flaky.delete_many(["obj"]),
            "arrow": lambda: flaky.open_arrow("obj"),
        }
        for name, call in calls.items():
            before = proxy.rejected
            with pytest.raises(OSError):
                call()
            assert proxy.rejected - before == FAST.max_attempts, name
    assert s3.read_bytes("obj") == b"payload" and not s3.exists("big")


class LosesFirstCompletion(FlakyProxy):
    """Forwards the first CompleteMultipartUpload, then drops the connection unanswered; with
    ``gone``, answers the retried one NoSuchUpload, as S3 may once an upload is complete.
    ``forward_first`` False: the first one is dropped before it reaches the server."""

    def __init__(self, upstream: str, gone: bool, forward_first: bool = True) -> None:
        super().__init__(upstream)
        self.gone, self.forward_first, self.completions = gone, forward_first, 0

    def _forward(self, lines: list[str], body: bytes) -> bytes:
        if not (lines[0].startswith("POST ") and "uploadId=" in lines[0]):
            return super()._forward(lines, body)
        self.completions += 1
        if self.completions > 1 and self.gone:
            return _error_response("404 Not Found", "NoSuchUpload", "The upload does not exist.")
        if self.completions == 1 and not self.forward_first:
            raise OSError("request lost on purpose")
        response = super()._forward(lines, body)
        if self.completions == 1:
            raise OSError("response lost on purpose")
        return response


@pytest.mark.parametrize("gone", [False, True])
def test_multipart_survives_a_lost_completion(s3: S3Storage, gone: bool) -> None:
    data = os.urandom(11 * MiB)
    with LosesFirstCompletion(s3.options.endpoint_url or "", gone) as proxy:
        flaky = with_options(
            s3, endpoint_url=proxy.endpoint_url, multipart_threshold=5 * MiB, part_size=5 * MiB
        )
        flaky.write_bytes("mp", data)
    assert proxy.completions == 2
    assert s3.read_bytes("mp") == data


def test_multipart_lost_completion_of_another_upload_fails(s3: S3Storage) -> None:
    """NoSuchUpload on a retried completion whose first try never arrived: the object there
    is not this upload, so the write fails (and the other object stays)."""
    s3.write_bytes("mp", b"someone else's")
    proxy = LosesFirstCompletion(s3.options.endpoint_url or "", gone=True, forward_first=False)
    with proxy:
        flaky = with_options(
            s3, endpoint_url=proxy.endpoint_url, multipart_threshold=5 * MiB, part_size=5 * MiB
        )
        with pytest.raises(ObjectNotFoundError, match="NoSuchUpload"):
            flaky.write_bytes("mp", os.urandom(11 * MiB))
    assert s3.read_bytes("mp") == b"someone else's"


def test_multipart_through_faults(s3: S3Storage) -> None:
    """503s, 500s and resets on a third of the requests of a concurrent multipart upload: each
    request is retried (a part's body rewound), the object is whole, never partial."""
    data = os.urandom(16 * MiB)
    with through_faults(s3, seed=3) as (proxy, flaky):
        flaky.write_bytes("mp", data)
    assert all(proxy.counts[kind] >= 1 for kind in FAULTS), proxy.counts
    assert s3.read_bytes("mp") == data
    etag = s3.client.head_object(Bucket=s3.bucket, Key=f"{s3.prefix}/mp")["ETag"]
    parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    assert etag.strip('"') == f"{hashlib.md5(md5s).hexdigest()}-4"
