"""Downloads resume with HTTP Range, survive servers that ignore it, and keep nothing that fails its pin.

Served by a real ThreadingHTTPServer on 127.0.0.1 that can be told to cut the connection after K bytes.
"""

import hashlib
import random
import re
import threading
import urllib.error
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distillery.download import ChecksumMismatch, IncompleteDownload, download

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        if self.path != "/teacher.pkl":
            self.send_error(404)
            return
        server.requests.append(dict(self.headers))
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = 0
        if wanted and server.honour_range:
            start = int(wanted.group(1))
            if start >= len(server.payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(server.payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
        else:
            self.send_response(200)
        body = server.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cuts.pop(0) if server.cuts else None
        # a cut sends K bytes of the announced length, then closes the socket
        self.wfile.write(body if cut is None else body[:cut])
        self.close_connection = True

    def log_message(self, *args):
        pass


@contextmanager
def serving(payload):
    """A ThreadingHTTPServer on 127.0.0.1 handing out `payload` at `.url` (Range requests honoured), stopped
    whatever happens."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.payload, httpd.requests, httpd.cuts, httpd.honour_range = payload, [], [], True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/teacher.pkl"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server():
    with serving(PAYLOAD) as httpd:
        yield httpd


def test_interrupted_download_resumes_from_the_part_file_with_a_range_request(server, tmp_path):
    dest = tmp_path / "teacher.pkl"
    server.cuts = [100_000]
    with pytest.raises(IncompleteDownload):
        download(server.url, dest, sha256=PAYLOAD_SHA256, progress=False, chunk=16_384, retries=0)
    assert not dest.exists()
    assert (tmp_path / "teacher.pkl.part").read_bytes() == PAYLOAD[:100_000]

    assert download(server.url, dest, sha256=PAYLOAD_SHA256, progress=True, chunk=16_384) == PAYLOAD_SHA256
    assert "Range" not in server.requests[0] and server.requests[1]["Range"] == "bytes=100000-"
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pkl"]


def test_broken_connections_are_resumed_within_one_call(server, tmp_path):
    dest = tmp_path / "teacher.pkl"
    server.cuts = [50_000, 120_000]
    assert download(server.url, dest, sha256=PAYLOAD_SHA256.upper(), progress=False, chunk=10_000) == PAYLOAD_SHA256
    assert [r.get("Range") for r in server.requests] == [None, "bytes=50000-", "bytes=170000-"]
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_still_yields_the_right_file(server, tmp_path):
    dest = tmp_path / "teacher.pkl"
    server.honour_range = False
    server.cuts = [100_000]
    with pytest.raises(IncompleteDownload):
        download(server.url, dest, sha256=PAYLOAD_SHA256, progress=False, chunk=16_384, retries=0)
    assert download(server.url, dest, sha256=PAYLOAD_SHA256, progress=False, chunk=16_384) == PAYLOAD_SHA256
    # asked to resume, answered with the whole file (200): the part is rewritten from the start
    assert server.requests[1]["Range"] == "bytes=100000-"
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pkl"]


def test_hash_mismatch_is_refused_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "teacher.pkl"
    with pytest.raises(ChecksumMismatch, match=PAYLOAD_SHA256):
        download(server.url, dest, sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_stale_part_of_another_file_is_caught_by_the_pin(server, tmp_path):
    dest = tmp_path / "teacher.pkl"
    (tmp_path / "teacher.pkl.part").write_bytes(b"x" * 1000)
    with pytest.raises(ChecksumMismatch):
        download(server.url, dest, sha256=PAYLOAD_SHA256, progress=False)
    assert server.requests[0]["Range"] == "bytes=1000-"
    assert list(tmp_path.iterdir()) == []
    # with the stale part gone, the next call fetches the right file
    assert download(server.url, dest, sha256=PAYLOAD_SHA256, progress=False) == PAYLOAD_SHA256


def test_part_longer_than_the_file_restarts(server, tmp_path):
    dest = tmp_path / "teacher.pkl"
    (tmp_path / "teacher.pkl.part").write_bytes(b"x" * (len(PAYLOAD) + 10))
    assert download(server.url, dest, sha256=PAYLOAD_SHA256, progress=False) == PAYLOAD_SHA256
    assert [r.get("Range") for r in server.requests] == [f"bytes={len(PAYLOAD) + 10}-", None]
    assert dest.read_bytes() == PAYLOAD


def test_unpinned_download_returns_the_hash_and_warns(server, tmp_path):
    dest = tmp_path / "teacher.pkl"
    with pytest.warns(UserWarning, match=f"no sha256 pinned.*{PAYLOAD_SHA256}"):
        assert download(server.url, dest, progress=False) == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD


def test_http_errors_are_not_retried_and_leave_nothing(server, tmp_path):
    with pytest.raises(urllib.error.HTTPError, match="404"):
        download(server.url.replace("teacher.pkl", "missing.pkl"), tmp_path / "missing.pkl", progress=False)
    assert list(tmp_path.iterdir()) == []
