"""Fetching an archive over HTTP (or from a local path), md5-checked, with retries and resume.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from reprotune.errors import ReprotuneError
from reprotune.files import atomic_file, file_md5

CHUNK = 1 << 20
RETRIES = 4  # further attempts after a dropped, stalled or refused connection, or an HTTP 5xx
BACKOFF_SECONDS = 2.0  # wait before retry k (from 0): BACKOFF_SECONDS * 2**k, so 2, 4, 8, 16 s
TIMEOUT_SECONDS = 60.0  # a connection or read that waits longer than this has stalled
OFFLINE_HINT = ("without a network, set data.url to a local copy of the archive (a path or file:// URL), "
                "or run `make demo` for the offline synthetic dataset")


class _Transient(Exception):
    """A failure worth retrying: the connection dropped, stalled or was refused, or the server erred."""


def fetch_archive(url: str, md5: str, dest: Path) -> dict:
    """Copy or download `url` to `dest` with a progress bar; rename into place only if md5 matches.

    HTTP downloads that drop or stall are retried with exponential backoff and resume where they
    stopped when the server honours Range requests. The partial file never has the final name.
    """
    started = time.perf_counter()
    with atomic_file(dest) as tmp:
        for attempt in range(RETRIES + 1):
            try:
                _transfer(url, tmp)
                break
            except _Transient as exc:
                if attempt == RETRIES:
                    raise ReprotuneError(f"cannot download {url} after {RETRIES + 1} attempts ({exc}): "
                                         f"{OFFLINE_HINT}") from None
                wait = BACKOFF_SECONDS * 2**attempt
                tqdm.write(f"{url}: {exc}; retry {attempt + 1}/{RETRIES} in {wait:.0f} s")
                time.sleep(wait)
        digest = file_md5(tmp)
        if digest != md5:
            raise ReprotuneError(f"{url}: md5 {digest} does not match data.md5 {md5}; the file was discarded")
        size = tmp.stat().st_size
    return {"url": url, "md5": digest, "bytes": size, "attempts": attempt + 1,
            "seconds": time.perf_counter() - started}


def _transfer(url: str, tmp: Path) -> None:
    """Bring `tmp` up to the whole of `url`, appending to what an earlier attempt got if possible."""
    if "://" not in url or url.startswith("file://"):
        path = Path(urllib.request.url2pathname(url.removeprefix("file://")))
        try:
            with path.open("rb") as source, tmp.open("wb") as out:
                _copy(source, out, path.stat().st_size, 0, url)
        except OSError as exc:
            raise ReprotuneError(f"{url}: cannot read local archive: {exc.strerror or exc}") from None
        return
    have = tmp.stat().st_size
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)  # noqa: S310 - the user's URL
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise ReprotuneError(f"{url}: server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):  # no DNS: offline, retrying will not help
            raise ReprotuneError(f"cannot reach {url} ({exc.reason}): {OFFLINE_HINT}") from None
        raise _Transient(str(exc.reason)) from None
    except OSError as exc:  # a timeout while connecting
        raise _Transient(str(exc) or type(exc).__name__) from None
    with response:
        resumed = have > 0 and response.status == 206
        length = response.headers.get("Content-Length")
        total = int(length) + (have if resumed else 0) if length and length.isdigit() else None
        with tmp.open("ab" if resumed else "wb") as out:
            _copy(response, out, total, have if resumed else 0, url)


def _copy(source: BinaryIO, out: BinaryIO, total: int | None, start: int, label: str) -> None:
    size = start
    with tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=Path(label).name, leave=False,
              disable=None) as bar:
        try:
            while chunk := source.read1(CHUNK):  # what has arrived: a stall keeps the bytes before it
                out.write(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        except (http.client.HTTPException, TimeoutError, ConnectionError) as exc:
            raise _Transient(f"connection lost after {size:,} bytes ({type(exc).__name__})") from None
    if total is not None and size != total:
        raise _Transient(f"got {size:,} of {total:,} bytes")

