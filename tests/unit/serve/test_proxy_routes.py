"""serve.deploy.proxy_routes asks a Serve proxy which prefixes it routes; whatever a starting or
reloading proxy answers instead is "not answering" (None), never an exception that would fail
a deploy that already succeeded."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve.deploy import proxy_routes

ANSWERS = {
    "/list/-/routes": (200, b'["/", "/agents/"]'),
    "/dict/-/routes": (200, b'{"/agents": "agents", "/": "openai"}'),
    "/starting/-/routes": (503, b"Route table is not populated yet."),
    "/null/-/routes": (200, b"null"),
}


class _Proxy(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/cut/-/routes":  # HAProxy reloading: the answer stops short
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[\"/ag")
            return
        status, body = ANSWERS[self.path]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def proxy():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_listed_routes_in_either_shape(proxy):
    assert proxy_routes(f"{proxy}/list") == {"/", "/agents"}
    assert proxy_routes(f"{proxy}/dict") == {"/", "/agents"}


@pytest.mark.parametrize("what", ["starting", "null", "cut"])
def test_a_proxy_that_answers_no_list_is_not_answering(proxy, what):
    assert proxy_routes(f"{proxy}/{what}") is None


def test_nothing_listening_is_not_answering():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert proxy_routes(f"http://127.0.0.1:{port}") is None
