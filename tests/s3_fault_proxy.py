"""A small HTTP proxy in front of the moto S3 server that answers a share of requests with faults.

Deterministic: requests are numbered as they arrive; request n is answered with
``faults[n % period]`` when that entry is not None: ``"503"`` (SlowDown, as S3 throttles),
``"500"`` (InternalError), ``"reset"`` (the connection is closed without an answer) or ``"cut"``
(the answer's headers and the first half of its body, then the connection closed). ``rule``
(method, path, headers) -> fault or None, when given, decides first, by request; it may also answer
``"applied-500"``: the request is forwarded and applied upstream, then answered 500 InternalError (a
PUT that landed but whose answer was lost: the client retries it), ``"nosuchupload"``: answered 404
NoSuchUpload, not forwarded (what S3 may answer a CompleteMultipartUpload of an upload already
completed or aborted; moto answers a repeated completion with success), or ``"hold"``: the request is
held, unanswered, until :meth:`release` (or the proxy's end), then forwarded (a call that hangs).
Every other request is forwarded to the upstream server unchanged. Counts what it did.
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_BODY = {
    "503": (503, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>"),
    "500": (500, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                 b"<Message>We encountered an internal error. Please try again.</Message></Error>"),
    "nosuchupload": (404, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchUpload</Code>'
                          b"<Message>The specified upload does not exist. The upload ID may be invalid, or the "
                          b"upload may have been aborted or completed.</Message></Error>"),
}


class FaultProxy:
    def __init__(self, upstream: str, faults: list[str | None], rule=None):
        self.upstream = urlsplit(upstream)
        self.faults = faults
        self.rule = rule
        self.lock = threading.Lock()
        self.n = 0
        self.injected: dict[str, int] = {"503": 0, "500": 0, "reset": 0, "cut": 0, "applied-500": 0, "hold": 0,
                                         "nosuchupload": 0}
        self.released = threading.Event()
        self.ranges: list[str | None] = []  # each request's Range header
        self.forwarded = 0
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, fault)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    fault = proxy.rule(self.command, self.path, self.headers) if proxy.rule else None
                    fault = fault or proxy.faults[proxy.n % len(proxy.faults)]
                    proxy.n += 1
                    proxy.log.append((self.command, self.path, fault))
                    proxy.ranges.append(self.headers.get("Range"))
                    if fault:
                        proxy.injected[fault] += 1
                    else:
                        proxy.forwarded += 1
                if fault == "hold":  # hangs until released, then goes on as any other request
                    proxy.released.wait()
                    fault = None
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "applied-500":  # applied upstream, then the answer lost
                    conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-connection")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    conn.getresponse().read()
                    conn.close()
                if fault and fault != "cut":
                    status, payload = ERROR_BODY["500" if fault == "applied-500" else fault]
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    # A HEAD answer keeps the object's Content-Length; others get the body's.
                    if k.lower() not in ("transfer-encoding", "connection") and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data[: len(data) // 2] if fault == "cut" else data)
                conn.close()
                if fault == "cut":
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def release(self) -> None:
        """Every held request (and any later one the rule would hold) goes on."""
        self.released.set()

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
