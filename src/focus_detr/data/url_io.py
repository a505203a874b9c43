"""Fetching inputs given as ``http://`` / ``https://`` URLs (standard library only).

A URL is downloaded to a local file before anything else looks at it, with a timeout on every network
operation and a size limit (checked on ``Content-Length`` and again while reading, since servers may omit
or misstate it). Every failure is a :class:`DownloadError` (a :class:`~focus_detr.data.errors.DataError`)
whose message is one line naming the URL, e.g. ``https://x/y.jpg: HTTP 404 Not Found``.

URLs must be recognised *before* any ``pathlib.Path`` conversion: ``Path("https://a/b")`` collapses the
``//`` into ``https:/a/b``, which is then "no such file".

``public_only=True`` (the web app when other machines can reach it) refuses hosts that resolve to a loopback,
private, link-local or otherwise non-global address, and redirects to such hosts: a page served to the network
must not let its visitors make this machine fetch from the networks behind it (cloud metadata at 169.254.169.254,
intranet services). The address is checked before connecting; a DNS answer that changes between the check and
the connection (DNS rebinding) is not caught, so a machine on a network with sensitive services should not
expose the app at all.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import DataError

#: Default limit on one download (an image or a short video clip).
MAX_DOWNLOAD_BYTES: int = 200 * 1024 * 1024
#: Default timeout in seconds for connecting and for each read.
DOWNLOAD_TIMEOUT_S: float = 30.0

_URL_RE = re.compile(r"^https?://", re.IGNORECASE)
_CHUNK = 1 << 16


class DownloadError(DataError):
    """A URL that could not be fetched (HTTP error, timeout, too large, unreachable host)."""


def is_url(text: object) -> bool:
    """True for strings starting with ``http://`` or ``https://`` (any case)."""
    return isinstance(text, str) and _URL_RE.match(text.strip()) is not None


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.1``, ``::1``): reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _resolve(host: str) -> list[str]:
    """The addresses ``host`` resolves to (a seam for tests)."""
    return [info[4][0] for info in socket.getaddrinfo(host, None)]


def check_public_url(url: str) -> None:
    """Raise :class:`DownloadError` unless every address ``url``'s host resolves to is a global one."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise DownloadError("the URL has no host", url)
    try:
        addresses = _resolve(host)
    except (socket.gaierror, UnicodeError) as e:
        raise DownloadError(f"download failed (cannot resolve {host}: {getattr(e, 'strerror', None) or e})",
                            url) from None
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
        mapped = getattr(address, "ipv4_mapped", None)
        if not (mapped or address).is_global:
            raise DownloadError(f"refused: {host} is a loopback, private or link-local address ({text}); this "
                                "server fetches public addresses only", url)


class _PublicRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a public address (see :func:`check_public_url`)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        check_public_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def url_file_name(url: str, default: str = "download") -> str:
    """A safe local file name from the URL's last path part (``.../cat.jpg?x=1`` -> ``cat.jpg``)."""
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return name[:120] or default


def download_url(url: str, folder: str | os.PathLike[str] | None = None, timeout: float = DOWNLOAD_TIMEOUT_S,
                 max_bytes: int = MAX_DOWNLOAD_BYTES, public_only: bool = False) -> Path:
    """Download ``url`` into ``folder`` (default: a new temporary folder) and return the file's path.

    ``public_only``: refuse hosts (and redirects to hosts) with non-global addresses (see the module notes).

    The file is named after the URL's last path part (:func:`url_file_name`), so its suffix still says
    whether it is an image or a video. The caller owns the file (and the temporary folder) afterwards.

    Raises:
        DownloadError: naming ``url``: not http(s), HTTP status >= 400, timeout, connection failure, more
        than ``max_bytes`` bytes, an empty body, or (``public_only``) a non-public address. A partial file is
        removed.
    """
    url = url.strip()
    if not is_url(url):
        raise DownloadError("not an http(s) URL", url)
    opener = urllib.request.build_opener(_PublicRedirects) if public_only else urllib.request.build_opener()
    if public_only:
        check_public_url(url)
    target_dir = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="focus_detr_url_"))
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / url_file_name(url)
    n = 1
    while target.exists():  # two URLs ending in the same name
        n += 1
        target = target.with_name(f"{Path(url_file_name(url)).stem}_{n}{target.suffix}")
    request = urllib.request.Request(url, headers={"User-Agent": "focus-detr"})
    limit_mb = f"{max_bytes / 1e6:.3g} MB"
    try:
        with opener.open(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise DownloadError(f"too large ({int(declared) / 1e6:.3g} MB; the limit is {limit_mb})", url)
            size = 0
            with open(target, "wb") as out:
                while chunk := response.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise DownloadError(f"too large (more than the limit of {limit_mb})", url)
                    out.write(chunk)
    except DownloadError:
        target.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as e:
        target.unlink(missing_ok=True)
        raise DownloadError(f"HTTP {e.code} {e.reason}", url) from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        target.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            reason = f"timed out after {timeout:g} s"
        raise DownloadError(f"download failed ({reason})", url) from None
    if size == 0:
        target.unlink(missing_ok=True)
        raise DownloadError("the server sent an empty file", url)
    return target
