"""Downloads that drop, stall or fail: retried with backoff, resumed by Range, never left half-named."""

from __future__ import annotations

import http.server
import re
import threading
import time

import pytest

from reprotune.data import fetch
from reprotune.data.fetch import RETRIES, fetch_archive
from reprotune.errors import ReprotuneError

pytestmark = pytest.mark.reliability  # every test here is part of the reliability suite

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _FlakyServer(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD; `behaviour` says how the first request misbehaves."""

    behaviour = "drop"
    ranges = True
    requests: list[str | None] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        header = self.headers.get("Range")
        type(self).requests.append(header)
        first = len(type(self).requests) == 1
        if self.behaviour == "error":
            self.send_error(503, "busy")
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", header).group(1)) if header and self.ranges else 0
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if first and self.behaviour == "drop":
            self.wfile.write(body[: len(body) // 3])  # then hang up mid-transfer
            self.close_connection = True
            return
        if first and self.behaviour == "stall":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(2.0)  # longer than the client's timeout
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(fetch, "TIMEOUT_SECONDS", 0.5)
    _FlakyServer.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyServer)
    # shutdown() waits for serve_forever to look: every 0.05 s, not the default 0.5 s
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _fetch(server, tmp_path, md5=None):
    url = f"http://127.0.0.1:{server.server_address[1]}/cifar.tar.gz"
    expected = md5 or __import__("hashlib").md5(PAYLOAD).hexdigest()
    return fetch_archive(url, expected, tmp_path / "archive.tar.gz")


@pytest.mark.parametrize("behaviour", ["drop", "stall"])
def test_a_dropped_or_stalled_download_resumes_where_it_stopped(server, tmp_path, behaviour):
    _FlakyServer.behaviour, _FlakyServer.ranges = behaviour, True
    info = _fetch(server, tmp_path)
    assert (tmp_path / "archive.tar.gz").read_bytes() == PAYLOAD
    assert info["attempts"] == 2
    first, second = _FlakyServer.requests
    assert first is None and second is not None and int(second.split("=")[1].rstrip("-")) > 0


def test_a_server_without_ranges_is_downloaded_again_from_the_start(server, tmp_path):
    _FlakyServer.behaviour, _FlakyServer.ranges = "drop", False
    info = _fetch(server, tmp_path)
    assert (tmp_path / "archive.tar.gz").read_bytes() == PAYLOAD and info["attempts"] == 2


def test_retries_are_bounded_and_leave_nothing_behind(server, tmp_path):
    _FlakyServer.behaviour = "error"
    with pytest.raises(ReprotuneError, match=r"cannot download .* after 5 attempts \(HTTP 503 busy\)"):
        _fetch(server, tmp_path)
    assert len(_FlakyServer.requests) == 1 + RETRIES
    assert list(tmp_path.iterdir()) == []


def test_backoff_doubles_between_attempts(server, tmp_path, monkeypatch):
    _FlakyServer.behaviour = "error"
    waits = []
    monkeypatch.setattr(fetch, "BACKOFF_SECONDS", 2.0)
    monkeypatch.setattr(time, "sleep", waits.append)
    with pytest.raises(ReprotuneError):
        _fetch(server, tmp_path)
    assert waits == [2.0, 4.0, 8.0, 16.0]
