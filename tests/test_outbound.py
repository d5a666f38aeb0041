"""The address policy of outgoing requests (webhooks) and the Standard Webhooks signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook

from app import outbound
from app.services.webhooks import signed_headers


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not a public"),  # carrier-grade NAT
    ],
)
def test_non_public_addresses_are_refused(address, kind):
    assert kind in outbound.refusal(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert outbound.refusal(address) is None


@pytest.mark.parametrize(
    "url, words",
    [
        ("ftp://example.com/hook", "only http and https"),
        ("http:///nohost", "no host"),
        ("http://user:pw@8.8.8.8/", "credentials"),
        ("http://127.0.0.1:8080/", "loopback"),
        ("http://localhost/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://no-such-host.invalid/", "does not resolve"),
        ("http://8.8.8.8:99999/", "malformed"),
        ("http://8.8.8.8/" + "a" * 2100, "longer than"),
    ],
)
def test_bad_callback_urls_are_refused_with_a_reason(url, words):
    with pytest.raises(outbound.AddressRefused, match=words):
        outbound.check_url(url, allow_private=False)


class _Receiver(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.hits.append(self.rfile.read(int(self.headers["content-length"])).decode())
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_loopback_receiver_is_reached_only_when_private_addresses_are_allowed(receiver):
    url = f"http://localhost:{receiver}/hook"

    refused = outbound.post(url, b"{}", {}, timeout_s=5, allow_private=False)
    allowed = outbound.post(url, b"{}", {}, timeout_s=5, allow_private=True)

    assert refused.status_code is None and "loopback" in refused.error
    assert allowed.ok and allowed.status_code == 204
    assert _Receiver.hits == ["{}"]  # the refused attempt never connected


def test_a_name_rebound_to_a_private_address_after_the_check_is_refused_at_connection(receiver, monkeypatch):
    """DNS rebinding: public when the URL is checked, loopback when connecting. The guard checks
    the addresses it connects to, so the receiver on loopback is never reached."""
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["93.184.216.34", "127.0.0.1"])

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            return real_getaddrinfo(next(answers, "127.0.0.1"), port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)

    outcome = outbound.post(f"http://rebind.example:{receiver}/", b"{}", {}, timeout_s=5, allow_private=False)

    assert outcome.status_code is None and "127.0.0.1" in outcome.error and "loopback" in outcome.error
    assert _Receiver.hits == []


def test_signature_is_the_standard_webhooks_hmac_and_verifies():
    secret_bytes = b"k" * 32
    secret = "whsec_" + base64.b64encode(secret_bytes).decode()
    sent_at = datetime.now(UTC)
    body = '{"type":"job.succeeded"}'

    headers = signed_headers(secret, "msg_1", sent_at, body)

    # The format's definition, computed here independently of the library the service uses.
    timestamp = str(int(sent_at.timestamp()))
    expected = hmac.new(secret_bytes, f"msg_1.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == timestamp
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()
    assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
