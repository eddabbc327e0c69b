"""Opening shards wherever they live — local files, ``s3://``, ``gs://``, ``http(s)://``, ``pipe:`` — with
connect and read timeouts and bounded retries, so a slow or dead store never stalls training silently.

Every remote stream is a ``ResumingReader``: a read that fails (timeout, dropped connection, reset) reopens
the object at the byte it had reached (an HTTP ``Range`` request; for ``pipe:`` the command is rerun and the
bytes already read are skipped), waiting ``retry_backoff_s``, doubling, between tries. After ``retries``
failed tries in a row without a byte of progress it raises ``ShardUnavailable``; the stream counts the
shard as skipped and moves on.

S3 goes through boto3, which reads credentials and the endpoint from the standard AWS environment and
config files (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores). ``gs://`` goes through fsspec's
``gcsfs`` when installed.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteOptions:
    """Timeouts and retries for every remote read (set from ``data.connect_timeout_s`` etc.)."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    retries: int = 3
    retry_backoff_s: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> RemoteOptions:
        """The options of a ``DataConfig`` (or anything with its attributes)."""
        return cls(float(cfg.connect_timeout_s), float(cfg.read_timeout_s), int(cfg.read_retries),
                   float(cfg.retry_backoff_s))


class ShardUnavailable(OSError):
    """A shard that could not be opened, or read to its end within the retries: skipped and counted."""


def scheme(url: str) -> str:
    """``s3``, ``gs``, ``http`` (also https), ``pipe`` or ``file`` (local paths and ``file://``)."""
    if url.startswith("pipe:"):
        return "pipe"
    head = url.split("://", 1)[0].lower() if "://" in url else "file"
    if head in ("http", "https"):
        return "http"
    if head in ("s3", "gs", "file"):
        return head
    return head


def split_bucket(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


# ---- S3 -----------------------------------------------------------------------------------------------------
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def s3_client(options: RemoteOptions, listing: bool = False) -> Any:
    """A boto3 S3 client for this process (clients are not fork-safe, so one per pid), with our timeouts.

    Credentials, region, profile and endpoint come from boto3's standard chain; ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` point it at an S3-compatible store (MinIO, Ceph, R2, ...).
    """
    environment = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"))
    key = (os.getpid(), options, listing, environment)
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            # Shard reads retry in ResumingReader (resuming at the byte reached); listings and small files
            # use botocore's own retries.
            attempts = max(1, options.retries + 1) if listing else 1
            config = Config(connect_timeout=options.connect_timeout_s, read_timeout=options.read_timeout_s,
                            retries={"total_max_attempts": attempts, "mode": "standard"})
            _clients[key] = boto3.session.Session().client("s3", config=config)
        return _clients[key]


def s3_endpoint(options: RemoteOptions) -> str:
    """The endpoint boto3 uses (for messages)."""
    try:
        return str(s3_client(options).meta.endpoint_url)
    except Exception:  # noqa: BLE001 - only for a message
        return "?"


def describe_s3_error(exn: Exception, url: str, options: RemoteOptions) -> str:
    """One line saying what an S3 failure means and what to do."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket, key = split_bucket(url)
    if isinstance(exn, NoCredentialsError):
        return (f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE (see ~/.aws/credentials)")
    if isinstance(exn, EndpointConnectionError):
        return (f"{url}: cannot connect to the S3 endpoint {s3_endpoint(options)}; for an S3-compatible store "
                "set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)")
    if isinstance(exn, ClientError):
        code = str(exn.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return f"{url}: bucket {bucket!r} does not exist at {s3_endpoint(options)}"
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{url}: no object {key!r} in bucket {bucket!r}"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return (f"{url}: access denied ({code}); check the AWS credentials (AWS_PROFILE, "
                    "AWS_ACCESS_KEY_ID) and the bucket's policy")
        return f"{url}: S3 error {code}: {exn}"
    return f"{url}: {type(exn).__name__}: {exn}"


def _s3_open_at(url: str, options: RemoteOptions) -> Callable[[int], tuple[IO[bytes], Callable[[], None]]]:
    bucket, key = split_bucket(url)

    def open_at(offset: int) -> tuple[IO[bytes], Callable[[], None]]:
        args = {"Bucket": bucket, "Key": key}
        if offset:
            args["Range"] = f"bytes={offset}-"
        body = s3_client(options).get_object(**args)["Body"]
        return body, body.close

    return open_at


def s3_list(url: str, options: RemoteOptions) -> list[str]:
    """Every object URL under the prefix of ``url`` (``s3://bucket/prefix``), paginated."""
    bucket, prefix = split_bucket(url)
    out: list[str] = []
    for page in s3_client(options, listing=True).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    return out


# ---- GCS (fsspec + gcsfs) -----------------------------------------------------------------------------------
def gcs_filesystem(options: RemoteOptions) -> Any:
    """gcsfs's filesystem; a one-line error naming the package when it is not installed."""
    try:
        import fsspec
        import gcsfs  # noqa: F401
    except ImportError:
        raise ValueError("gs:// shards need the gcsfs package: pip install gcsfs") from None
    return fsspec.filesystem("gs", requests_timeout=options.read_timeout_s)


def _gcs_open_at(url: str, options: RemoteOptions) -> Callable[[int], tuple[IO[bytes], Callable[[], None]]]:
    def open_at(offset: int) -> tuple[IO[bytes], Callable[[], None]]:
        f = gcs_filesystem(options).open(url, "rb")
        if offset:
            f.seek(offset)
        return f, f.close

    return open_at


# ---- HTTP ---------------------------------------------------------------------------------------------------
_pools: dict[int, Any] = {}


def _http_open_at(url: str, options: RemoteOptions) -> Callable[[int], tuple[IO[bytes], Callable[[], None]]]:
    import urllib3

    def open_at(offset: int) -> tuple[IO[bytes], Callable[[], None]]:
        pool = _pools.get(os.getpid())
        if pool is None:  # one pool per process: pools are not fork-safe
            pool = _pools[os.getpid()] = urllib3.PoolManager()
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = pool.request("GET", url, headers=headers, preload_content=False, retries=False,
                                timeout=urllib3.Timeout(connect=options.connect_timeout_s,
                                                        read=options.read_timeout_s))
        if response.status >= 400:
            response.release_conn()
            message = f"{url}: HTTP {response.status} {response.reason}"
            raise OSError(message) if response.status >= 500 else ShardUnavailable(message)  # 5xx: retried
        if offset and response.status != 206:  # the server ignored Range: skip what was read already
            _skip(response, offset)
        return response, response.release_conn

    return open_at


def _skip(stream: IO[bytes], count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, _CHUNK))
        if not chunk:
            raise ShardUnavailable("the stream ended before the position to resume from")
        count -= len(chunk)


# ---- pipe: ----------------------------------------------------------------------------------------------------
class _PipeStream(io.RawIOBase):
    """stdout of a shell command, read with a timeout: no byte for ``read_timeout_s`` kills the command."""

    def __init__(self, command: str, read_timeout_s: float) -> None:
        self.command = command
        self.timeout = read_timeout_s
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"no output for {self.timeout:g} s (data.read_timeout_s)")
        data = os.read(self.proc.stdout.fileno(), len(buffer))
        if not data:
            status = self.proc.wait()
            if status != 0:
                raise OSError(f"command exited with status {status}")
            return 0
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        super().close()


def _pipe_open_at(url: str, options: RemoteOptions) -> Callable[[int], tuple[IO[bytes], Callable[[], None]]]:
    command = url[len("pipe:"):]

    def open_at(offset: int) -> tuple[IO[bytes], Callable[[], None]]:
        stream = _PipeStream(command, options.read_timeout_s)
        if offset:
            _skip(stream, offset)
        return stream, stream.close

    return open_at


# ---- the resuming reader ------------------------------------------------------------------------------------
def _transient(exn: Exception) -> bool:
    """Errors worth another try: timeouts, dropped connections, server errors; not missing objects."""
    if isinstance(exn, ShardUnavailable):
        return False
    try:
        from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError

        if isinstance(exn, (NoCredentialsError, ParamValidationError)):
            return False
        if isinstance(exn, ClientError):
            code = str(exn.response.get("Error", {}).get("Code", ""))
            status = int(exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError")
    except ImportError:  # pragma: no cover
        pass
    return not isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError, ValueError))


class ResumingReader(io.RawIOBase):
    """A read-only stream over ``open_at(offset)`` that reopens at the current offset when a read fails.

    ``retries`` counts failed tries in a row; any byte of progress resets it. Once out of tries, and from
    then on, reads raise ``ShardUnavailable`` naming the URL and the last error.
    """

    def __init__(self, url: str, open_at: Callable[[int], tuple[IO[bytes], Callable[[], None]]],
                 options: RemoteOptions, describe: Callable[[Exception], str] | None = None) -> None:
        self.url = url
        self._open_at = open_at
        self._options = options
        self._describe = describe or (lambda exn: f"{url}: {type(exn).__name__}: {exn}")
        self._offset = 0
        self._stream: IO[bytes] | None = None
        self._release: Callable[[], None] | None = None
        self._failed: ShardUnavailable | None = None
        self._tries = 0
        self._open()

    def readable(self) -> bool:
        return True

    def _drop(self) -> None:
        if self._release is not None:
            try:
                self._release()
            except Exception as exn:  # noqa: BLE001 - a broken connection may fail to close; it is gone anyway
                log.debug("%s: closing the stream failed: %s", self.url, exn)
        self._stream = self._release = None

    def _give_up(self, exn: Exception) -> ShardUnavailable:
        self._drop()
        where = f" at byte {self._offset:,}" if self._offset else ""
        self._failed = ShardUnavailable(f"{self._describe(exn)}{where} (gave up after {self._tries} tries)")
        return self._failed

    def _fail(self, exn: Exception) -> None:
        """Count a failed try: wait before the next one, or give up (out of tries, or not worth retrying)."""
        self._drop()
        self._tries += 1
        if not _transient(exn) or self._tries > self._options.retries:
            raise self._give_up(exn) from None
        log.debug("%s: try %d failed at byte %d (%s: %s); retrying", self.url, self._tries, self._offset,
                  type(exn).__name__, exn)
        time.sleep(self._options.retry_backoff_s * 2 ** (self._tries - 1))

    def _open(self) -> None:
        while self._stream is None:
            try:
                self._stream, self._release = self._open_at(self._offset)
            except Exception as exn:  # noqa: BLE001 - every failure is either retried or reported
                self._fail(exn)

    def readinto(self, buffer: Any) -> int:
        if self._failed is not None:
            raise self._failed
        view = memoryview(buffer).cast("B")
        while True:
            self._open()
            assert self._stream is not None
            try:
                data = self._stream.read(len(view))
                break
            except Exception as exn:  # noqa: BLE001 - timeouts and drops come in many types
                self._fail(exn)
        if data:
            self._tries = 0  # progress: the next failure starts a fresh count
        view[: len(data)] = data
        self._offset += len(data)
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str, options: RemoteOptions | None = None) -> IO[bytes]:
    """A buffered binary stream of the shard at ``url``; ``ShardUnavailable`` when it cannot be had."""
    options = options or RemoteOptions()
    kind = scheme(url)
    if kind == "file":
        path = url.removeprefix("file://")
        try:
            return open(path, "rb")
        except OSError as exn:
            raise ShardUnavailable(f"{path}: {exn.strerror or exn}") from None
    describe = None
    if kind == "s3":
        open_at = _s3_open_at(url, options)
        describe = lambda exn: describe_s3_error(exn, url, options)
    elif kind == "gs":
        open_at = _gcs_open_at(url, options)
    elif kind == "http":
        open_at = _http_open_at(url, options)
    elif kind == "pipe":
        open_at = _pipe_open_at(url, options)
    else:  # other schemes webdataset knows (hf://, ais://, sftp://...): its opener, without our timeouts
        import webdataset as wds

        try:
            return wds.gopen(url, "rb")
        except Exception as exn:  # noqa: BLE001 - any failure to open is an unavailable shard
            raise ShardUnavailable(f"{url}: {type(exn).__name__}: {exn}") from None
    return io.BufferedReader(ResumingReader(url, open_at, options, describe), buffer_size=_CHUNK)


def read_small(url: str, options: RemoteOptions | None = None) -> bytes | None:
    """The whole content of a small object (a manifest, a stats file), or None when it does not exist."""
    options = options or RemoteOptions()
    kind = scheme(url)
    if kind == "file":
        path = url.removeprefix("file://")
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    if kind == "s3":
        from botocore.exceptions import ClientError

        bucket, key = split_bucket(url)
        try:
            return s3_client(options, listing=True).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exn:
            if str(exn.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise ShardUnavailable(describe_s3_error(exn, url, options)) from None
    if kind == "gs":
        fs = gcs_filesystem(options)
        return fs.cat_file(url) if fs.exists(url) else None
    try:
        with open_shard(url, RemoteOptions(options.connect_timeout_s, options.read_timeout_s, 0, 0.0)) as f:
            return f.read()
    except ShardUnavailable:
        return None


def list_matching(url: str, options: RemoteOptions | None = None) -> list[str]:
    """Object URLs for an ``s3://``/``gs://`` glob (``*``, ``?``, ``[...]``) or folder prefix, sorted.

    A URL without glob characters that does not end in ``.tar`` is a folder: every ``.tar`` directly in it.
    """
    options = options or RemoteOptions()
    kind = scheme(url)
    globbing = any(c in url for c in "*?[")
    if globbing:
        literal = url[: min(url.index(c) for c in "*?[" if c in url)]
        pattern = url
    else:
        literal = url.rstrip("/") + "/"
        pattern = literal + "*.tar"
    if kind == "s3":
        listed = s3_list(literal, options)
    elif kind == "gs":
        fs = gcs_filesystem(options)
        listed = ["gs://" + p for p in fs.glob(pattern[len("gs://"):])]
    else:
        raise ValueError(f"cannot list {url}: listing needs s3:// or gs://")
    depth = pattern.count("/")  # "*" does not cross "/", as in a shell glob
    return sorted(u for u in listed if u.count("/") == depth and fnmatch.fnmatchcase(u, pattern))
