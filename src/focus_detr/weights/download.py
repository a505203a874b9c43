"""Download, cache and verify registry files.

Cache folder: ``$FOCUS_DETR_HOME`` (default ``~/.cache/focus_detr``)::

    downloads/FILE            the file as published (zip or .pth); FILE.part while downloading
    converted/NAME.pth        a detector converted once to our weights format (what later uses read)
    index.json                {"files": {relative path: {"sha256", "size", "url", ...}}}
    .lock                     held while a process downloads or converts (others wait)

* A download resumes where an interrupted one stopped (HTTP ``Range``); it is written to ``FILE.part`` and
  renamed when complete, so ``FILE`` is always whole.
* The SHA-256 of every downloaded or converted file is recorded in ``index.json`` and checked on every later
  use; a changed file is refused with a message naming it and how to download it again.
* ``FOCUS_DETR_MIRROR=URL`` replaces the scheme and host of every registry URL (``URL`` may carry a path
  prefix): mirrors, air-gapped sites, tests.
* Without network access, a file placed by hand at ``downloads/FILE`` is used (and recorded).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import CheckpointFormatError, atomic_write_bytes, file_sha256
from .registry import PretrainedModel

CHUNK = 1 << 20
TIMEOUT_S = 60.0


class DownloadError(CheckpointFormatError):
    """A registry file that cannot be fetched (offline, unreachable, HTTP error, interrupted); one line."""


def cache_home() -> Path:
    return Path(os.environ.get("FOCUS_DETR_HOME") or Path.home() / ".cache" / "focus_detr").expanduser()


def mirrored(url: str) -> str:
    """``url`` with its scheme and host replaced by ``$FOCUS_DETR_MIRROR`` (when set)."""
    mirror = os.environ.get("FOCUS_DETR_MIRROR")
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def download_path(entry: PretrainedModel) -> Path:
    return cache_home() / "downloads" / entry.filename


def converted_path(entry: PretrainedModel) -> Path:
    return cache_home() / "converted" / f"{entry.name}.pth"


# --------------------------------------------------------------------------------------------------
# Index and lock


def _index_file() -> Path:
    return cache_home() / "index.json"


def read_index() -> dict[str, Any]:
    path = _index_file()
    if not path.is_file():
        return {"files": {}}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ValueError("no 'files' mapping")
        return data
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: the cache index is damaged ({e}); delete it to rebuild the cache "
                                    "(cached files will be downloaded again)") from None


def _record(path: Path, **facts: Any) -> str:
    digest = file_sha256(path)
    index = read_index()
    index["files"][path.relative_to(cache_home()).as_posix()] = {
        "sha256": digest, "size": path.stat().st_size, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **facts}
    atomic_write_bytes(_index_file(), (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
    return digest


def index_entry(path: Path) -> dict[str, Any] | None:
    return read_index()["files"].get(path.relative_to(cache_home()).as_posix())


def verify_cached(path: Path, how_to_refetch: str) -> None:
    """Check ``path`` against the SHA-256 recorded when it was written; one-line error when it changed."""
    entry = index_entry(path)
    if entry is None:
        return
    actual = file_sha256(path)
    if actual != entry.get("sha256"):
        raise CheckpointFormatError(f"{path}: the cached file changed since it was recorded (sha256 {actual[:12]}..., "
                                    f"index {str(entry.get('sha256'))[:12]}...); it is corrupted or was modified. "
                                    f"Delete it to download it again: {how_to_refetch}")


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Exclusive lock on the cache while downloading / converting (other processes wait)."""
    home = cache_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, some network filesystems): best effort
            pass
        try:
            yield
        finally:
            try:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            except (ImportError, OSError):
                pass


# --------------------------------------------------------------------------------------------------
# HTTP


def _by_hand(url: str, dest: Path) -> str:
    return (f"to install it by hand, download {url} elsewhere and place it at {dest} (or set FOCUS_DETR_MIRROR "
            "to a reachable copy)")


def download(url: str, dest: Path, progress: bool = True, desc: str | None = None) -> Path:
    """Fetch ``url`` (after :func:`mirrored`) to ``dest``, resuming ``dest.part``; :class:`DownloadError`
    with one line on any failure (the partial file is kept for the next attempt)."""
    from tqdm.auto import tqdm

    real = mirrored(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(real, headers={"User-Agent": "focus-detr", "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - http(s) URLs from the registry
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the partial file is not a prefix of this file any more: start again
            part.unlink()
            return download(url, dest, progress, desc)
        raise DownloadError(f"cannot download {real}: HTTP {e.code} {e.reason}; {_by_hand(real, dest)}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {real} ({reason}); {_by_hand(real, dest)}") from None
    with response:
        status = getattr(response, "status", 200)
        if status != 206 and offset:  # the server ignored the range: start from the beginning
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=desc or dest.name, disable=None if progress else True, dynamic_ncols=True, leave=False)
        received = offset
        try:
            with open(part, "ab" if offset else "wb") as f:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as e:
                        raise DownloadError(
                            f"download of {real} interrupted after {received} of {total or '?'} bytes "
                            f"({type(e).__name__}); run the same command again to resume, or "
                            f"{_by_hand(real, dest)}") from None
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
    if total is not None and received < total:
        raise DownloadError(f"download of {real} interrupted after {received} of {total} bytes; run the same command "
                            f"again to resume, or {_by_hand(real, dest)}")
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Registry files


def fetch_file(entry: PretrainedModel, progress: bool = True) -> Path:
    """The published file of ``entry`` in the cache (downloaded if missing), checked against its SHA-256."""
    if not entry.available:
        raise DownloadError(f"{entry.name}: unavailable, the official README gives no download link"
                            + (f" ({entry.note})" if entry.note else "") + "; if you have the file, pass its path")
    dest = download_path(entry)
    with cache_lock():
        if dest.is_file():
            verify_cached(dest, f"rm {dest}")
            recorded = index_entry(dest)
        else:
            download(entry.url, dest, progress, desc=entry.name)
            recorded = None
        if recorded is None:  # just downloaded, or placed by hand
            digest = _record(dest, url=entry.url, name=entry.name)
            if entry.sha256 and digest != entry.sha256:
                dest.unlink()
                raise DownloadError(f"{dest}: sha256 {digest} differs from the published {entry.sha256}; the file was "
                                    "removed, run again to download it again")
    return dest


def fetch_converted(entry: PretrainedModel, progress: bool = True) -> Path:
    """Detector ``entry`` in our weights format: converted once from the published file, then read from the
    cache (checked against the index on every use)."""
    if entry.kind != "detector":
        raise CheckpointFormatError(f"{entry.name}: ImageNet {entry.backbone} backbone weights, not a detector; use "
                                    "it with `focus-detr train --backbone-weights`")
    converted = converted_path(entry)
    if converted.is_file():
        with cache_lock():
            verify_cached(converted, f"rm {converted}")
            if index_entry(converted) is None:
                _record(converted, name=entry.name, converted_from=entry.url)
        return converted
    source = fetch_file(entry, progress)
    from .kinds import build_for_state_dict, read_weights, save_weights

    with cache_lock():
        if converted.is_file():  # converted by another process while we waited
            return converted
        read = read_weights(source, entry.preset)
        model = build_for_state_dict(read.cfg, read.state_dict, str(source), read.report)
        save_weights(model, converted, extra={"pretrained": entry.name, "source_url": entry.url,
                                              "source_sha256": (index_entry(source) or {}).get("sha256"),
                                              "converted_from": read.description})
        _record(converted, name=entry.name, converted_from=entry.url)
    return converted


def cached_state(entry: PretrainedModel) -> dict[str, Any]:
    """What the cache holds for ``entry`` (for ``focus-detr models``), without hashing anything."""
    index = read_index()["files"]
    out: dict[str, Any] = {"cached": False}
    for label, path in (("converted", converted_path(entry)), ("download", download_path(entry))):
        if entry.filename or label == "converted":
            if path.is_file():
                out["cached"] = True
                out[label] = str(path)
                out[f"{label}_size"] = path.stat().st_size
                rel = path.relative_to(cache_home()).as_posix()
                out[f"{label}_recorded"] = rel in index
    return out


__all__ = ["DownloadError", "cache_home", "mirrored", "download", "fetch_file", "fetch_converted", "verify_cached",
           "read_index", "cached_state", "download_path", "converted_path"]
