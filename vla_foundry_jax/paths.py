"""The one path layer: every path a user gives is a local path, ``s3://``, ``gs://`` or ``hf://`` (read-only).

fsspec does the I/O (s3fs for S3 and S3-compatible stores, gcsfs for GCS, huggingface_hub for the hub). This module
adds what a training run needs on top: errors that name the path, the scheme and the fix; retries with backoff for
transient failures (counted in :data:`RETRIES`); reads that never return partial bytes; atomic writes; and local
copies for libraries that only read a filesystem (transformers' ``from_pretrained``, tokenizers).

Endpoints and credentials come from each library's standard environment: ``AWS_ENDPOINT_URL`` /
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION`` for S3, ``GOOGLE_APPLICATION_CREDENTIALS`` or
``STORAGE_EMULATOR_HOST`` for GCS, ``HF_TOKEN`` / ``HF_HOME`` / ``HF_HUB_OFFLINE`` for the hub.
``hf://`` reads go through the hub cache (``hf_hub_download`` / ``snapshot_download``), so a cached repo reads
offline.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from vla_foundry_jax.errors import VLAFoundryError

SCHEMES = ("file", "s3", "gs", "hf")
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "hf": "huggingface_hub"}
_FIX = {
    "s3": "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
    "S3-compatible store (MinIO, R2)",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS (or run `gcloud auth application-default login`); "
    "STORAGE_EMULATOR_HOST for an emulator",
    "hf": "set HF_TOKEN for a private repo; offline, download it first (`huggingface-cli download REPO`) and keep "
    "HF_HOME pointing at that cache, or give the local directory instead",
}
RETRIES: collections.Counter[str] = collections.Counter()
"""Transient failures retried so far, by scheme (logged and reported by the data pipeline)."""
MAX_ATTEMPTS = 6
_BACKOFF_S = 0.2
_T = TypeVar("_T")


class PathError(VLAFoundryError, OSError):
    """A path that cannot serve: unsupported scheme, missing object, bucket or credentials, unreachable endpoint."""


def scheme(path: str) -> str:
    """``file`` for a local path (or ``file://``), else the URL scheme; an unsupported scheme is a PathError."""
    if "://" not in path:
        return "file"
    name = path.split("://", 1)[0].lower()
    name = {"gcs": "gs", "s3a": "s3"}.get(name, name)
    if name not in SCHEMES:
        raise PathError(
            f"{path!r}: the scheme {name}:// is not supported; give a local path, s3://bucket/key, gs://bucket/key or "
            "hf://[datasets/]org/repo/path."
        )
    return name


def is_remote(path: str) -> bool:
    return scheme(path) != "file"


def normalize(path: str) -> str:
    """A local path made absolute (``~`` expanded, ``file://`` dropped); a URL with its scheme spelled canonically."""
    kind = scheme(path)
    if kind == "file":
        return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    return f"{kind}://{path.split('://', 1)[1].rstrip('/')}"


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(normalize(base), *parts)
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    if is_remote(path):
        return posixpath.dirname(normalize(path))
    return os.path.dirname(os.path.abspath(os.path.expanduser(path)))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path.rstrip(os.sep))


# ---------------------------------------------------------------- errors and retries


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status(text: str, *codes: str) -> bool:
    """Whether ``text`` names one of the HTTP status ``codes`` as a number of its own (not inside a port, say
    ``127.0.0.1:40355``)."""
    return re.search(r"(?<![\d.:])(" + "|".join(codes) + r")(?!\d)", text) is not None


def _is_transient(e: BaseException) -> bool:
    for cause in _chain(e):  # s3fs wraps a botocore 500 as a bare OSError; the cause keeps the status
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code", "")
            if (isinstance(status, int) and (status >= 500 or status == 429)) or code in (
                "InternalError",
                "SlowDown",
                "ServiceUnavailable",
                "RequestTimeout",
                "Throttling",
            ):
                return True
        if cause is not e and isinstance(cause, (TimeoutError, ConnectionError)):
            return True
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    status = getattr(e, "status", None) or getattr(e, "code", None)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return _status(text, "500", "503") or any(
        s in text
        for s in (
            "timeout",
            "timed out",
            "throttl",
            "slowdown",
            "slow down",
            "internal error",
            "internalerror",
            "serviceunavailable",
            "connection reset",
            "connection aborted",
            "server disconnected",
            "serverdisconnected",
            "connectionclosed",
            "payload",
            "incompleteread",
            "responsestreamingerror",
            "could not connect",
            "cannot connect",
            "endpointconnectionerror",
        )
    )


def explain(e: BaseException, path: str, what: str = "") -> PathError:
    """A one-line PathError for ``e`` raised while reading or writing ``path``: what failed and the fix."""
    if isinstance(e, PathError):
        return e
    kind = scheme(path)
    label = f"{what} {path!r}" if what else repr(path)
    text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    lowered = text.lower()
    if isinstance(e, FileNotFoundError) or "nosuchkey" in lowered or "not found" in lowered or _status(lowered, "404"):
        if "nosuchbucket" in lowered or ("bucket" in lowered and "not" in lowered):
            return PathError(f"{label}: the bucket does not exist ({text}); check the bucket name.")
        return PathError(f"{label}: no such file or directory; check the path.")
    if (
        isinstance(e, PermissionError)
        or any(s in lowered for s in ("credential", "accessdenied", "access denied", "forbidden", "unauthor"))
        or _status(lowered, "401", "403")
    ):
        return PathError(f"{label}: access denied or no credentials ({text}); {_FIX.get(kind, 'check permissions')}.")
    if _is_transient(e):
        hint = {
            "s3": "check AWS_ENDPOINT_URL and the network",
            "gs": "check STORAGE_EMULATOR_HOST / the network",
            "hf": "check the network or set HF_HUB_OFFLINE=1 with a cached copy",
        }.get(kind, "check the disk")
        return PathError(f"{label}: unreachable after {MAX_ATTEMPTS} attempts ({text}); {hint}.")
    return PathError(f"{label}: {text}")


def retry(fn: Callable[[], _T], path: str, what: str = "") -> _T:
    """``fn()``, retried with exponential backoff while it fails transiently; other failures become a PathError."""
    kind = scheme(path)
    for attempt in range(MAX_ATTEMPTS):
        try:
            return fn()
        except PathError:
            raise
        except Exception as e:
            if kind == "file" or not _is_transient(e) or attempt == MAX_ATTEMPTS - 1:
                raise explain(e, path, what) from e
            RETRIES[kind] += 1
            delay = _BACKOFF_S * 2**attempt
            logging.warning(
                "transient error on %s (%s: %s); retry %d in %.1fs", path, type(e).__name__, e, attempt + 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- filesystems


def filesystem(path: str) -> tuple[Any, str]:
    """The fsspec filesystem serving ``path`` and the path in its own terms (``bucket/key``)."""
    kind = scheme(path)
    if kind == "file":
        return None, normalize(path)
    if kind == "hf":
        raise AssertionError("hf:// goes through the hub cache, not a filesystem object")
    try:
        __import__(_PACKAGES[kind])
    except ImportError as e:
        raise PathError(
            f"{path!r}: {kind}:// paths need the {_PACKAGES[kind]} package: pip install {_PACKAGES[kind]}"
        ) from e
    import fsspec

    options: dict[str, Any] = {}
    if kind == "s3":
        # Retries belong to this layer (counted in RETRIES, same backoff for every scheme), not to botocore / s3fs.
        options["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
    fs, inner = fsspec.core.url_to_fs(normalize(path), **options)
    if kind == "s3":
        fs.retries = 1
    return fs, inner


def configure_tensorstore() -> None:
    """Point TensorStore (Orbax's array I/O) at a GCS emulator named by ``STORAGE_EMULATOR_HOST``, as gcsfs is.

    TensorStore reads ``TENSORSTORE_GCS_HTTP_URL`` instead and needs a token; against an emulator any token serves.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host and host != "default" and "TENSORSTORE_GCS_HTTP_URL" not in os.environ:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def _hf_parts(path: str) -> tuple[str, str, str | None, str]:
    """(repo_type, repo_id, revision, path inside the repo) of ``hf://[datasets/|models/]org/repo[@rev]/path``."""
    rest = normalize(path).split("://", 1)[1]
    parts = rest.split("/")
    repo_type = "model"
    if parts[0] in ("datasets", "models", "spaces"):
        repo_type = parts.pop(0)[:-1]
    if repo_type == "space" or len(parts) < 2:
        raise PathError(f"{path!r}: give hf://org/model/path or hf://datasets/org/name/path.")
    name, _, revision = parts[1].partition("@")
    return repo_type, f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def _hf_download(path: str, *, directory: bool) -> str:
    import huggingface_hub

    repo_type, repo_id, revision, inner = _hf_parts(path)
    try:
        if directory:
            root = huggingface_hub.snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, allow_patterns=[f"{inner}/*"] if inner else None
            )
            return os.path.join(root, inner) if inner else root
        return huggingface_hub.hf_hub_download(repo_id, inner, repo_type=repo_type, revision=revision)
    except Exception as e:
        text = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        raise PathError(f"{path!r}: cannot read from the hub ({text}); {_FIX['hf']}.") from e


# ---------------------------------------------------------------- reading


def exists(path: str) -> bool:
    kind = scheme(path)
    if kind == "file":
        return os.path.exists(normalize(path))
    if kind == "hf":
        try:
            _hf_download(path, directory=False)
            return True
        except PathError:
            try:
                return os.path.isdir(_hf_download(path, directory=True))
            except PathError:
                return False
    fs, inner = filesystem(path)
    return retry(lambda: fs.exists(inner), path)


def isdir(path: str) -> bool:
    kind = scheme(path)
    if kind == "file":
        return os.path.isdir(normalize(path))
    if kind == "hf":
        try:
            return os.path.isdir(_hf_download(path, directory=True))
        except PathError:
            return False
    fs, inner = filesystem(path)
    return retry(lambda: fs.isdir(inner), path)


def listdir(path: str) -> list[str]:
    """Sorted names (not paths) of the entries directly under the directory ``path``."""
    kind = scheme(path)
    if kind in ("file", "hf"):
        local = local_dir(path)
        try:
            return sorted(os.listdir(local))
        except OSError as e:
            raise explain(e, path) from e
    fs, inner = filesystem(path)
    fs.invalidate_cache(inner)
    entries = retry(lambda: fs.ls(inner, detail=False), path)
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != inner.rstrip("/"))


def size(path: str) -> int:
    if scheme(path) in ("file", "hf"):
        return os.path.getsize(local_file(path))
    fs, inner = filesystem(path)
    return int(retry(lambda: fs.size(inner), path))


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """The whole object (or bytes ``[start, end)``), retried on transient failure and checked for length."""
    if scheme(path) in ("file", "hf"):
        local = local_file(path)
        try:
            with open(local, "rb") as f:
                if start:
                    f.seek(start)
                return f.read() if end is None else f.read(end - (start or 0))
        except OSError as e:
            raise explain(e, path) from e
    fs, inner = filesystem(path)

    def read() -> bytes:
        expected = fs.size(inner) if end is None else None
        data = fs.cat_file(inner, start=start, end=end)
        want = (expected - (start or 0)) if end is None else end - (start or 0)
        if want is not None and len(data) < want:
            raise ConnectionError(f"short read: {len(data)} of {want} bytes")
        return data

    return retry(read, path)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def open_file(path: str, mode: str = "rb") -> Iterator[IO]:
    """A file object for ``path``. Remote reads are buffered whole (checked for length); remote writes are one atomic
    PUT on close; local writes go to a temporary file renamed into place on close."""
    import io

    if mode not in ("r", "rb", "w", "wb"):
        raise ValueError(f"open_file: mode {mode!r} not supported")
    text = "b" not in mode
    if mode.startswith("r"):
        data = read_bytes(path)
        yield io.StringIO(data.decode("utf-8")) if text else io.BytesIO(data)
        return
    buffer = io.StringIO() if text else io.BytesIO()
    yield buffer
    payload = buffer.getvalue()
    write_bytes(path, payload.encode("utf-8") if text else payload)


# ---------------------------------------------------------------- writing


def makedirs(path: str) -> None:
    """A local directory (and parents); object stores have no directories, so nothing to do there."""
    kind = scheme(path)
    if kind == "hf":
        raise PathError(f"{path!r}: hf:// is read-only; write to a local path, s3:// or gs://.")
    if kind == "file":
        os.makedirs(normalize(path), exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` atomically: a local temp file renamed into place, or one object PUT (atomic on S3 and GCS)."""
    kind = scheme(path)
    if kind == "hf":
        raise PathError(f"{path!r}: hf:// is read-only; write to a local path, s3:// or gs://.")
    if kind == "file":
        target = normalize(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    fs, inner = filesystem(path)
    retry(lambda: fs.pipe_file(inner, data), path, "writing")


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def move(src: str, dst: str) -> None:
    """Move a file or a tree (a rename on local disk; copy-then-delete on an object store)."""
    if scheme(src) != scheme(dst):
        raise PathError(f"cannot move {src!r} to {dst!r}: they are on different stores.")
    if scheme(src) == "file":
        os.makedirs(os.path.dirname(normalize(dst)), exist_ok=True)
        os.rename(normalize(src), normalize(dst))
        return
    fs, inner = filesystem(src)
    _, target = filesystem(dst)
    fs.invalidate_cache()
    files = retry(lambda: fs.find(inner), src, "moving")
    if not files:
        raise PathError(f"moving {src!r}: no such file or directory; check the path.")
    for entry in files:
        rel = entry[len(inner.rstrip("/")) :].lstrip("/")
        dest = f"{target.rstrip('/')}/{rel}" if rel else target
        retry(lambda entry=entry, dest=dest: fs.copy(entry, dest), src, "moving")
    retry(lambda: fs.rm(files), src, "moving")
    fs.invalidate_cache()


def upload_tree(local: str, remote: str) -> list[tuple[str, int]]:
    """Copy every file under the local directory ``local`` to ``remote/<relative path>``; returns (path, size)."""
    files = []
    for root, _, names in os.walk(local):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local).replace(os.sep, "/")
            with open(full, "rb") as f:
                data = f.read()
            write_bytes(join(remote, rel), data)
            files.append((rel, len(data)))
    return sorted(files)


def download_tree(remote: str, local: str, files: list[tuple[str, int]]) -> None:
    """Copy the listed ``(relative path, size)`` files of ``remote`` into a new local directory ``local``, through a
    temporary directory renamed into place, each checked for its size."""
    import shutil

    tmp = f"{local.rstrip(os.sep)}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for rel, nbytes in files:
            data = read_bytes(join(remote, rel))
            if len(data) != nbytes:
                raise PathError(f"{join(remote, rel)!r}: {len(data)} bytes where {nbytes} were written; re-upload it.")
            dest = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def local_output_dir(path: str, flag: str) -> str:
    """The absolute local directory ``path`` of an output assembled by local renames (converted and imported runs);
    an object-store or hub URL is one error line naming ``flag``."""
    if is_remote(path):
        raise PathError(f"{flag}={path!r}: give a local directory (copy it to remote storage after).")
    return os.path.abspath(os.path.expanduser(path))


def check_writable(path: str, what: str) -> None:
    """Fail now, with one line, when the output location ``path`` cannot be written: hf://, a missing bucket, no
    credentials or an unreachable endpoint (checked by writing and removing a small probe object)."""
    kind = scheme(path)
    if kind == "hf":
        raise PathError(f"{what} {path!r}: hf:// is read-only; write to a local path, s3:// or gs://.")
    if kind == "file":
        return
    probe = join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except PathError as e:
        raise PathError(f"{what}: {e}") from e


def remove(path: str, recursive: bool = False) -> None:
    kind = scheme(path)
    if kind == "hf":
        raise PathError(f"{path!r}: hf:// is read-only.")
    if kind == "file":
        import shutil

        target = normalize(path)
        if os.path.isdir(target) and recursive:
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
        return
    fs, inner = filesystem(path)
    retry(lambda: fs.rm(inner, recursive=recursive), path, "removing")


# ---------------------------------------------------------------- local copies


def cache_root() -> str:
    return os.environ.get("VLA_FOUNDRY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vla_foundry_jax")


def _version(info: dict[str, Any]) -> str:
    """What identifies one version of an object in a listing: size plus the store's ETag / generation / mtime."""
    keys = ("size", "ETag", "etag", "generation", "md5Hash", "LastModified", "updated", "mtime")
    return "|".join(f"{k}={info[k]}" for k in keys if info.get(k) is not None)


def _cache_path(path: str, version: str, cache_dir: str | None = None) -> str:
    """Where the copy of ``path`` as of ``version`` lives: a changed object behind the same URL gets a new copy."""
    url = normalize(path)
    digest = hashlib.sha1(f"{url}\n{version}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir or os.path.join(cache_root(), "paths"), f"{digest}-{basename(url)}")


def local_file(path: str) -> str:
    """A local filesystem path holding the file ``path`` (itself when local; a cached download otherwise)."""
    kind = scheme(path)
    if kind == "file":
        return normalize(path)
    if kind == "hf":
        return _hf_download(path, directory=False)
    fs, inner = filesystem(path)
    target = _cache_path(path, _version(retry(lambda: fs.info(inner), path)))
    if not os.path.isfile(target):
        write_bytes(target, read_bytes(path))
    return target


def local_dir(path: str, cache_dir: str | None = None) -> str:
    """A local directory holding the tree under ``path`` (itself when local; a cached, completed copy otherwise,
    under ``cache_dir`` when given).

    The copy is made in a temporary directory and renamed into place, so an interrupted download is never taken
    for a complete one.
    """
    kind = scheme(path)
    if kind == "file":
        return normalize(path)
    if kind == "hf":
        return _hf_download(path, directory=True)
    fs, inner = filesystem(path)
    listing = retry(lambda: fs.find(inner, detail=True), path)
    entries = sorted(listing)
    target = _cache_path(path, "\n".join(f"{e}:{_version(listing[e])}" for e in entries), cache_dir)
    if os.path.isdir(target):
        return target
    if not entries:
        raise PathError(f"{path!r}: no such directory (nothing under that prefix); check the path.")
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for entry in entries:
            rel = entry[len(inner.rstrip("/")) :].lstrip("/")
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(read_bytes(f"{scheme(path)}://{entry}"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(tmp, target)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_readable(path: str, what: str) -> None:
    """Fail now, with one line naming ``what`` and ``path``, when ``path`` does not exist or cannot be reached."""
    if not path:
        raise PathError(f"{what} is empty; give a local path, s3://, gs:// or hf:// URL.")
    try:
        found = exists(path)
    except PathError as e:
        raise PathError(f"{what}: {e}") from e
    if not found:
        raise PathError(f"{what} {path!r}: no such file or directory; check the path.")
