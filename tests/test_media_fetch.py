"""pyllama4.multimodal.fetch through load_image: http(s) images under the fetch policy. A client
is told only "could not fetch the image from <URL>" for anything that went wrong upstream (the
reason is logged); the address policy, the host allow list and the TLS name check hold on every
hop. The servers are real HTTP(S) servers on 127.0.0.1 in background threads; names other than
localhost resolve through a fake DNS.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import anyio
import pytest
from test_media import JPEG, PNG, error, is_pattern, load

from pyllama4.multimodal import fetch
from pyllama4.multimodal.addresses import refusal
from pyllama4.multimodal.media import MediaPolicy

SLOW_S = 20  # how long the test server stalls: far longer than any fetch that must not wait

# ---- http(s) -------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("User-Agent")))
        self.server.hosts.append(self.headers.get("Host"))
        try:
            self.route()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def route(self) -> None:
        path = self.path.split("?")[0]
        if path == "/img.png":
            self.send(200, "image/png", PNG)
        elif path == "/img.jpg":
            self.send(200, "image/jpeg; charset=binary", JPEG)
        elif path == "/page.html":
            self.send(200, "text/html; charset=utf-8", b"<html>hello</html>")
        elif path == "/slow.png":
            time.sleep(SLOW_S)
            self.send(200, "image/png", PNG)
        elif path == "/huge.png":  # no Content-Length: the body ends when the connection does
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 2**16)
        elif (
            path == "/declared-huge.png"
        ):  # says 1 GB, then stalls: only an up-front check is quick
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(PNG)
            self.wfile.flush()
            time.sleep(SLOW_S)
        elif path == "/redirect":
            self.redirect("/img.png")
        elif path == "/redirect-file":
            self.redirect("file:///etc/passwd")
        elif path == "/loop":
            self.redirect("/loop")
        elif path.startswith("/redirect-to/"):
            self.redirect(path.removeprefix("/redirect-to/"))
        else:
            self.send(404, "text/plain", b"not found")


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests, httpd.hosts = [], []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server: ThreadingHTTPServer) -> str:
    server.requests.clear()
    server.hosts.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


# The test server is on 127.0.0.1, which only "any" lets a fetch connect to.
LOCAL = MediaPolicy(fetch_networks="any")


def failed(url: str) -> str:
    """What the client is told about any fetch that went wrong upstream."""
    return f"could not fetch the image from {url}"


def test_http_png_and_jpeg(server: ThreadingHTTPServer, base: str):
    assert is_pattern(load(f"{base}/img.png", LOCAL))
    assert load(f"{base}/img.jpg", LOCAL).format == "JPEG"
    assert server.requests == [("/img.png", "pyllama4"), ("/img.jpg", "pyllama4")]


def test_http_follows_redirects(server: ThreadingHTTPServer, base: str):
    assert load(f"{base}/redirect", LOCAL).size == (3, 2)
    assert [path for path, _ in server.requests] == ["/redirect", "/img.png"]


def test_http_redirect_to_file_is_refused(base: str):
    assert error(f"{base}/redirect-file", LOCAL) == failed(f"{base}/redirect-file")


def test_http_redirect_loop_stops(server: ThreadingHTTPServer, base: str):
    assert error(f"{base}/loop", LOCAL) == failed(f"{base}/loop")
    assert len(server.requests) == 6


def test_http_upstream_status_and_type_are_not_told_but_logged(base: str, caplog):
    caplog.set_level(logging.INFO, logger="pyllama4.multimodal")
    assert error(f"{base}/nothing.png", LOCAL) == failed(f"{base}/nothing.png")
    assert error(f"{base}/page.html", LOCAL) == failed(f"{base}/page.html")
    assert "HTTP 404" in caplog.text and "text/html" in caplog.text


def test_http_timeout(base: str):
    start = time.monotonic()
    assert error(f"{base}/slow.png", MediaPolicy(fetch_timeout=0.3, fetch_networks="any")) == (
        failed(f"{base}/slow.png")
    )
    assert time.monotonic() - start < SLOW_S / 2  # well before the server answers


def test_http_body_over_limit(base: str):
    policy = MediaPolicy(max_bytes=100_000, fetch_networks="any")
    assert "limit of 100000 bytes" in error(f"{base}/huge.png", policy)


def test_http_declared_length_over_limit_is_refused_up_front(base: str):
    start = time.monotonic()
    policy = MediaPolicy(max_bytes=100_000, fetch_networks="any")
    assert "limit of 100000 bytes" in error(f"{base}/declared-huge.png", policy)
    assert time.monotonic() - start < SLOW_S / 2  # without waiting for the stalled body


def test_http_fetch_disabled(server: ThreadingHTTPServer, base: str):
    message = error(f"{base}/img.png", MediaPolicy(allow_fetch=False, fetch_networks="any"))
    assert "disabled" in message and "--disable-image-url-fetch" in message
    assert server.requests == []


def test_http_connection_refused_tells_nothing_more(caplog):
    caplog.set_level(logging.INFO, logger="pyllama4.multimodal")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/img.png"
    assert error(url, LOCAL) == failed(url)
    assert "onnect" in caplog.text  # httpx's ConnectError text, in the log only


def test_echoed_urls_are_truncated(base: str):
    message = error(f"{base}/nothing.png?q={'x' * 5000}", LOCAL)
    assert message.startswith(failed(base)) and message.endswith("...") and len(message) < 200


def test_malformed_urls():
    assert "not a valid URL" in error("http://[::1/img.png")
    assert "not an http(s) URL with a host" in error("http:///img.png")


# ---- the fetch policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "private", "public"),
    [
        ("127.0.0.1", "loopback", "loopback"),
        ("127.9.8.7", "loopback", "loopback"),
        ("::1", "loopback", "loopback"),
        ("::ffff:127.0.0.1", "loopback", "loopback"),  # IPv4-mapped: judged as the IPv4 address
        ("169.254.169.254", "link-local", "link-local"),  # cloud metadata
        ("fe80::1", "link-local", "link-local"),
        ("0.0.0.0", "unspecified", "unspecified"),
        ("0.1.2.3", "unspecified", "unspecified"),
        ("::", "unspecified", "unspecified"),
        ("224.0.0.1", "multicast", "multicast"),
        ("ff02::1", "multicast", "multicast"),
        ("240.0.0.1", "reserved", "reserved"),
        ("10.0.0.5", None, "not public"),
        ("172.16.3.4", None, "not public"),
        ("192.168.1.1", None, "not public"),
        ("100.64.0.1", None, "not public"),  # carrier-grade NAT
        ("fd12::1", None, "not public"),  # unique local
        ("::ffff:10.0.0.5", None, "not public"),
        ("93.184.215.14", None, None),
        ("2606:4700::1111", None, None),
    ],
)
def test_address_policy(address: str, private: str | None, public: str | None):
    ip = ip_address(address)
    assert refusal(ip, "private") == private
    assert refusal(ip, "public") == public
    assert refusal(ip, "any") is None


def test_loopback_and_link_local_are_refused_by_default(server: ThreadingHTTPServer, base: str):
    port = server.server_address[1]
    for url in (
        f"{base}/img.png",
        f"http://localhost:{port}/img.png",  # a name that resolves to loopback
        f"http://[::1]:{port}/img.png",
        f"http://[::ffff:127.0.0.1]:{port}/img.png",
        f"http://0.0.0.0:{port}/img.png",
        f"http://2130706433:{port}/img.png",  # 127.0.0.1 as one number
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/img.png",
    ):
        for networks in ("private", "public"):
            assert error(url, MediaPolicy(fetch_networks=networks)) == failed(url), url
    assert server.requests == []  # refused before connecting


def fake_dns(monkeypatch: pytest.MonkeyPatch, names: dict[str, list[str]]) -> list[str]:
    """Resolve `names` to their addresses (and only them); returns the names looked up."""
    looked_up: list[str] = []

    async def getaddrinfo(host: str, port: int, **kwargs: object) -> list[tuple]:
        looked_up.append(host)
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in names[host]]

    monkeypatch.setattr(anyio, "getaddrinfo", getaddrinfo)
    return looked_up


def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch, caplog):
    caplog.set_level(logging.INFO, logger="pyllama4.multimodal")
    fake_dns(monkeypatch, {"mixed.test": ["93.184.215.14", "127.0.0.1"], "lan.test": ["10.1.1.1"]})
    assert error("http://mixed.test/a.png") == failed("http://mixed.test/a.png")
    assert "127.0.0.1" in caplog.text and "loopback" in caplog.text
    assert error("http://lan.test/a.png", MediaPolicy(fetch_networks="public")) == (
        failed("http://lan.test/a.png")
    )
    assert "not public" in caplog.text


def test_connects_to_the_checked_address_with_the_original_host(
    server: ThreadingHTTPServer, base: str, monkeypatch: pytest.MonkeyPatch
):
    """images.test resolves only through the fake DNS: the fetch succeeds only if it connects to
    the address it resolved (and checked) itself, and it asks for the name it was given."""
    port = server.server_address[1]
    looked_up = fake_dns(monkeypatch, {"images.test": ["127.0.0.1"]})
    assert is_pattern(load(f"http://images.test:{port}/img.png", LOCAL))
    assert looked_up == ["images.test"]
    assert server.hosts == [f"images.test:{port}"]


def test_a_redirect_to_a_refused_address_is_refused(
    server: ThreadingHTTPServer, base: str, monkeypatch: pytest.MonkeyPatch, caplog
):
    """The test server on 127.0.0.1 stands in for a public host (the policy lets exactly that
    address through); where it redirects to is checked as any first hop is."""
    caplog.set_level(logging.INFO, logger="pyllama4.multimodal")
    monkeypatch.setattr(
        fetch, "refusal", lambda a, n: None if a == IPv4Address("127.0.0.1") else refusal(a, n)
    )
    port = server.server_address[1]
    assert load(f"{base}/img.png").size == (3, 2)
    for target in (
        "http://169.254.169.254/latest/meta-data/",
        f"http://127.0.0.2:{port}/img.png",
        f"http://[::1]:{port}/img.png",
    ):
        url = f"{base}/redirect-to/{target}"
        assert error(url) == failed(url)
    assert [path for path, _ in server.requests][1:] == [
        "/redirect-to/http://169.254.169.254/latest/meta-data/",
        f"/redirect-to/http://127.0.0.2:{port}/img.png",
        f"/redirect-to/http://[::1]:{port}/img.png",
    ]
    assert caplog.text.count("refused (") == 3


def test_allowed_domains(server: ThreadingHTTPServer, base: str):
    port = server.server_address[1]
    only_ip = MediaPolicy(fetch_networks="any", allowed_domains=frozenset({"127.0.0.1"}))
    assert load(f"{base}/img.png", only_ip).size == (3, 2)
    message = error(f"http://localhost:{port}/img.png", only_ip)
    assert "does not fetch from (--allowed-media-domains)" in message
    # A redirect to another host is refused without saying where it went.
    url = f"{base}/redirect-to/http://localhost:{port}/img.png"
    assert error(url, only_ip) == failed(url)
    assert [path for path, _ in server.requests] == ["/img.png", url.removeprefix(base)]
    # Names match case-insensitively, without a final dot.
    by_name = MediaPolicy(fetch_networks="any", allowed_domains=frozenset({"LocalHost."}))
    assert load(f"http://localhost:{port}/img.png", by_name).size == (3, 2)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    """An https server on 127.0.0.1 whose self-signed certificate names images.test only."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=images.test"]
        + ["-addext", "subjectAltName=DNS:images.test"],
        check=True,
        capture_output=True,
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests, httpd.hosts = [], []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], cert
    httpd.shutdown()
    httpd.server_close()


def test_https_verifies_the_certificate_against_the_name(
    tls_server: tuple[int, Path], monkeypatch: pytest.MonkeyPatch, caplog
):
    """The connection goes to the checked IP, yet TLS names the host (SNI) and the certificate
    must be valid for that name."""
    caplog.set_level(logging.INFO, logger="pyllama4.multimodal")
    port, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    fake_dns(monkeypatch, {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    assert is_pattern(load(f"https://images.test:{port}/img.png", LOCAL))
    url = f"https://other.test:{port}/img.png"
    assert error(url, LOCAL) == failed(url)
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
