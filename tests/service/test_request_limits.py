"""Requests too large to read are cut off by the API's HTTP parser, on the real server: a header
past COMPACTOR_MAX_REQUEST_HEADER_BYTES (64 KiB) is refused at once, never read in full."""

from __future__ import annotations

import socket
import time

import httpx

LIMIT = 64 * 1024


def _connect(service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=10)


def _request_with_header(size: int) -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\nConnection: close\r\n\r\n"


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_header_under_the_limit_is_served(service):
    with _connect(service) as sock:
        sock.sendall(_request_with_header(LIMIT // 2))
        assert _status(_read_all(sock)) == 200


def test_a_header_past_the_limit_is_refused(service):
    with _connect(service) as sock:
        sock.sendall(_request_with_header(LIMIT + 1024))
        answer = _read_all(sock)
    # 431 problem+json when the headers came in one read; h11's plain 400 when they came in several
    assert _status(answer) in (400, 431), answer[:200]
    if _status(answer) == 431:
        assert b"headers_too_large" in answer and b"application/problem+json" in answer


def test_a_huge_header_is_cut_off_before_it_is_read(service):
    """64 MiB of header: the server hangs up once its limit is passed, long before the client has
    sent it all (without a limit it read all of it, for seconds, and answered 200)."""
    sent, chunk, started = 0, b"a" * 65536, time.monotonic()
    with _connect(service) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 64 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
            answer = _read_all(sock)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""

    assert sent < 16 * 1024 * 1024, f"the server read {sent} bytes of one header"
    assert answer == b"" or _status(answer) in (400, 431)
    assert time.monotonic() - started < 10
    assert httpx.get(f"{service.url}/healthz").status_code == 200
