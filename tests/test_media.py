"""pyllama4.multimodal.media.load_image: every accepted source decodes to the right pixels; every
refused or broken one raises a MediaError whose message says why (and names the server flag to
change where there is one).

HTTP sources come from a real HTTP server on 127.0.0.1 in a background thread.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import anyio
import pytest
from PIL import Image

from pyllama4.multimodal import fetch
from pyllama4.multimodal.addresses import refusal
from pyllama4.multimodal.media import MediaError, MediaPolicy, load_image

RED, BLUE = (255, 0, 0), (0, 0, 255)
SLOW_S = 20  # how long the test server stalls: far longer than any fetch that must not wait


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def pattern() -> Image.Image:
    """3x2 RGB, every pixel different."""
    image = Image.new("RGB", (3, 2))
    image.putdata([RED, BLUE, (0, 255, 0), (1, 2, 3), (200, 100, 50), (255, 255, 255)])
    return image


def is_pattern(image: Image.Image) -> bool:
    return image.size == (3, 2) and image.convert("RGB").tobytes() == pattern().tobytes()


def noise(size: int = 64) -> Image.Image:
    rng = random.Random(0)
    return Image.frombytes(
        "RGB", (size, size), bytes(rng.randrange(256) for _ in range(3 * size**2))
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (1-bit gray) but holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def load(source: str, policy: MediaPolicy | None = None) -> Image.Image:
    return anyio.run(load_image, source, policy or MediaPolicy())


def error(source: str, policy: MediaPolicy | None = None) -> str:
    with pytest.raises(MediaError) as e:
        load(source, policy)
    return str(e.value)


PNG = encode(pattern(), "PNG")
JPEG = encode(Image.new("RGB", (16, 8), RED), "JPEG", quality=95)


# ---- data URLs and bare base64 -------------------------------------------------------------


def test_png_data_url_keeps_pixels_and_mode():
    image = load(data_url(PNG))
    assert image.format == "PNG" and image.mode == "RGB"
    assert is_pattern(image)
    rgba = load(data_url(encode(Image.new("RGBA", (2, 2), (1, 2, 3, 4)), "PNG")))
    assert rgba.mode == "RGBA" and rgba.getpixel((1, 1)) == (1, 2, 3, 4)


def test_jpeg_data_url():
    image = load(data_url(JPEG, "image/jpeg"))
    assert image.format == "JPEG" and image.size == (16, 8)
    assert all(abs(a - b) <= 3 for a, b in zip(image.getpixel((4, 4)), RED, strict=True))


def test_webp_data_url():
    image = load(data_url(encode(pattern(), "WEBP", lossless=True), "image/webp"))
    assert image.format == "WEBP"
    assert is_pattern(image)


def test_bmp_data_url():
    image = load(data_url(encode(pattern(), "BMP"), "image/bmp"))
    assert image.format == "BMP" and is_pattern(image)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    image = load(data_url(gif, "image/gif"))
    assert image.format == "GIF" and image.tell() == 0
    assert image.convert("RGB").getpixel((2, 2)) == RED


def test_declared_data_url_subtype_does_not_matter():
    assert load(data_url(PNG, "image/jpeg")).format == "PNG"


def test_bare_base64():
    image = load(base64.b64encode(PNG).decode())
    assert is_pattern(image)
    assert load(base64.b64encode(JPEG).decode()).format == "JPEG"  # starts with "/9j/"


def test_data_url_must_be_base64_image():
    assert "base64" in error("data:image/png," + PNG.hex())
    assert "image/*" in error("data:text/plain;base64," + base64.b64encode(PNG).decode())
    assert "malformed data URL" in error("data:image/png;base64")
    assert "not valid base64" in error("data:image/png;base64,@@@@")
    assert "not valid base64" in error("data:image/png;base64,iVBORw0KGgo")  # bad padding


def test_empty_data():
    assert "empty" in error("data:image/png;base64,")
    assert "empty" in error("")


def test_oversized_base64_is_refused_before_decoding():
    policy = MediaPolicy(max_bytes=1000)
    assert "limit of 1000 bytes" in error(base64.b64encode(os.urandom(1500)).decode(), policy)
    # Not even valid base64 (bad length): the size alone refuses it.
    assert "limit of 1000 bytes" in error("data:image/png;base64," + "A" * 4001, policy)
    assert "limit of 1000 bytes" in error("A" * 5001, policy)
    assert load(data_url(PNG), MediaPolicy(max_bytes=len(PNG))).size == (3, 2)


def test_other_schemes_name_the_accepted_forms():
    message = error("ftp://example.com/cat.png")
    assert "unsupported image source" in message
    assert "http(s)://" in message and "data:image/" in message and "base64" in message


# ---- decoding ------------------------------------------------------------------------------


def test_garbage_and_non_images():
    assert "could not decode the image" in error(base64.b64encode(b"not an image!!!!").decode())
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n"
    assert "could not decode the image" in error(data_url(pdf, "image/pdf"))


def test_unsupported_format_is_named():
    message = error(data_url(encode(pattern(), "TIFF"), "image/tiff"))
    assert "unsupported image format TIFF" in message and "PNG" in message


def test_truncated_png():
    png = encode(noise(), "PNG")
    message = error(data_url(png[: len(png) // 2]))
    assert message.startswith("could not decode the image: ")
    assert "Traceback" not in message and len(message) < 300


def test_zero_size_image():
    assert "could not decode the image" in error(data_url(png_header(0, 10)))


def test_pixel_limit():
    big = encode(Image.new("1", (5000, 5000)), "PNG")
    assert len(big) < 100_000
    message = error(data_url(big), MediaPolicy(max_pixels=5000 * 5000 - 1))
    assert "too many pixels" in message and "5000x5000" in message
    assert load(data_url(big), MediaPolicy(max_pixels=5000 * 5000)).size == (5000, 5000)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # No pixel data at all: decoding would fail, so only a header check gives this message.
    assert "too many pixels" in error(data_url(png_header(9000, 9000)))
    assert "could not decode" in error(data_url(png_header(90, 90)))


def test_decompression_bomb_beyond_pil_limit():
    message = error(data_url(png_header(20000, 20000)), MediaPolicy(max_pixels=10**12))
    assert "too many pixels" in message


# ---- local files ---------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "inside.png").symlink_to(root / "a.png")
    return root


def test_local_file_under_allowed_dir(media: Path):
    policy = MediaPolicy(allowed_local_path=media)
    assert is_pattern(load(str(media / "a.png"), policy))
    assert load((media / "a.png").as_uri(), policy).size == (3, 2)
    assert load(f"file://localhost{media / 'a.png'}", policy).size == (3, 2)
    assert load(str(media / "inside.png"), policy).size == (3, 2)


def test_loaded_image_does_not_need_the_file(media: Path):
    image = load(str(media / "a.png"), MediaPolicy(allowed_local_path=media))
    (media / "a.png").unlink()
    assert image.getpixel((1, 0)) == BLUE


def test_local_file_outside_allowed_dir(media: Path):
    policy = MediaPolicy(allowed_local_path=media)
    for source in (
        str(media.parent / "secret.png"),
        str(media / ".." / "secret.png"),
        (media.parent / "secret.png").as_uri(),
        str(media / "escape.png"),  # a symlink out of the allowed directory
        "/etc/passwd",
    ):
        message = error(source, policy)
        assert "outside the directory allowed by --allowed-local-media-path" in message, source


def test_local_files_off_without_allowed_dir(media: Path):
    for source in (str(media / "a.png"), (media / "a.png").as_uri()):
        message = error(source)
        assert "disabled" in message and "--allowed-local-media-path DIR" in message


def test_local_file_errors(media: Path):
    policy = MediaPolicy(allowed_local_path=media)
    assert "No such file" in error(str(media / "missing.png"), policy)
    (media / "sub.d").mkdir()
    assert "not a regular file" in error(str(media / "sub.d"), policy)
    assert "limit of 50 bytes" in error(
        str(media / "a.png"), MediaPolicy(allowed_local_path=media, max_bytes=50)
    )
    assert "local file" in error("file://elsewhere/a.png", policy)


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
