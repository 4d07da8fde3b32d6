"""End to end with images: `python -m pyllama4.launch_server --enable-multimodal` on the tiny
multimodal checkpoint (tests/conftest.py), on 127.0.0.1, driven by the official openai client;
raw HTTP for the error cases. Tiles are 56x56 with 4 `<|patch|>` tokens each, so one image of
one tile expands `<|image|>` into 7 tokens and a 112x56 image (2 tiles + the global) into 17.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading

import httpx
import openai
import pytest
from PIL import Image

from server_checks import assert_idle, metric

MODEL = "demo"  # the name the test servers are started with
# Tokens an image adds to a chat prompt (the template's <|image|> is expanded in place).
ONE_TILE_EXTRA = 7
TWO_TILE_EXTRA = 17


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def message(text: str, *urls: str) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts}]


_FETCHED: list[str] = []  # the paths the image host was asked for


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _FETCHED.append(self.path)
        if self.path == "/red.png":
            self._send(200, "image/png", png(56, 56))
        elif self.path == "/page.html":
            self._send(200, "text/html; charset=utf-8", b"<html>internal</html>")
        elif self.path == "/to-localhost":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("media")
    (directory / "red.png").write_bytes(png(56, 56))
    return directory


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("mm-server") / "server.log"


@pytest.fixture(scope="module")
def server(launch_server, tiny_mm_dir, media_dir, server_log):
    """Fetches from 127.0.0.1 only (the image host): any address, one allowed host."""
    live = launch_server(
        server_log,
        "--enable-multimodal",
        "--image-fetch-networks",
        "any",
        "--allowed-media-domains",
        "127.0.0.1",
        "--page-size",
        "8",
        "--max-images-per-request",
        "3",
        "--max-image-pixels",
        "4000000",
        "--allowed-local-media-path",
        str(media_dir),
        model_dir=tiny_mm_dir,
    )
    yield live.base
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=4, **kwargs
    )


def test_one_and_two_images_expand_as_llama4_tiles_them(client):
    text_only = chat(client, message("Describe the picture.")).usage.prompt_tokens
    one = chat(client, message("Describe the picture.", data_url(png(56, 56))))
    assert one.choices[0].finish_reason == "length"
    assert one.usage.prompt_tokens == text_only + ONE_TILE_EXTRA
    two = chat(
        client,
        message("Describe the picture.", data_url(png(56, 56)), data_url(png(112, 56))),
    )
    assert two.usage.prompt_tokens == text_only + ONE_TILE_EXTRA + TWO_TILE_EXTRA


def test_jpeg_webp_and_gif_data_urls(client):
    for kind, fmt in (("jpeg", "JPEG"), ("webp", "WEBP"), ("gif", "GIF")):
        buffer = io.BytesIO()
        Image.new("RGB", (60, 50), (10, 200, 90)).save(buffer, format=fmt)
        r = chat(client, message("What is it?", data_url(buffer.getvalue(), kind)))
        assert r.usage.completion_tokens == 4


def test_http_and_allowed_file_urls(client, image_host, media_dir):
    by_data = chat(client, message("Look.", data_url(png(56, 56))), logprobs=True)
    by_http = chat(client, message("Look.", image_host + "/red.png"), logprobs=True)
    by_file = chat(client, message("Look.", f"file://{media_dir}/red.png"), logprobs=True)
    expected = [t.logprob for t in by_data.choices[0].logprobs.content]
    for r in (by_http, by_file):
        assert r.choices[0].message.content == by_data.choices[0].message.content
        assert [t.logprob for t in r.choices[0].logprobs.content] == pytest.approx(expected)


def test_streaming_with_an_image_equals_non_streaming(client):
    messages = message("Stream it.", data_url(png(112, 56)))
    full = chat(client, messages).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=4, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full


def test_the_same_image_hits_the_cache_and_another_does_not(client, server):
    """The image comes first (positions 6..12 of the prompt: <|image_start|>, <|image|>, 4
    patches, <|image_end|>), so a hit of one 16-token chunk covers it; a different image shares
    at most the 8 tokens before its patches."""
    text = "A long enough question about this one picture, please answer it."
    red, blue = data_url(png(56, 56)), data_url(png(56, 56, (20, 20, 220)))

    def ask(url: str):
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        return chat(client, [{"role": "user", "content": parts}], logprobs=True)

    first = ask(red)
    before = metric(server, "pyllama4_images_encoded_total")
    again = ask(red)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert metric(server, "pyllama4_images_encoded_total") == before  # the cache covered it
    other = ask(blue)
    assert other.usage.prompt_tokens_details.cached_tokens <= 8
    assert metric(server, "pyllama4_images_encoded_total") == before + 1
    lp = [t.logprob for t in first.choices[0].logprobs.content]
    assert [t.logprob for t in again.choices[0].logprobs.content] == pytest.approx(lp)
    assert [t.logprob for t in other.choices[0].logprobs.content] != pytest.approx(lp)


def test_generate_takes_image_data(server):
    ids = httpx.post(server + "/tokenize", json={"prompt": "Look: <|image|> now"}).json()
    r = httpx.post(
        server + "/generate",
        json={
            "text": "Look: <|image|> now",
            "image_data": data_url(png(56, 56)),
            "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # The text's own <|image|> becomes the image's 7 tokens.
    assert r.json()["meta_info"]["prompt_tokens"] == ids["count"] + ONE_TILE_EXTRA - 1
    bare = base64.b64encode(png(56, 56)).decode()  # SGLang also takes bare base64
    r = httpx.post(
        server + "/generate",
        json={"text": "Look: <|image|> now", "image_data": [bare], "sampling_params": {}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # A batch: image_data has one entry per prompt (an image, or a list of them).
    r = httpx.post(
        server + "/generate",
        json={
            "text": ["Look: <|image|> now", "Two: <|image|><|image|>"],
            "image_data": [bare, [bare, data_url(png(56, 56))]],
            "sampling_params": {"max_new_tokens": 1},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    first, second = r.json()
    assert first["meta_info"]["prompt_tokens"] == ids["count"] + ONE_TILE_EXTRA - 1
    two = httpx.post(server + "/tokenize", json={"prompt": "Two: <|image|><|image|>"}).json()
    assert second["meta_info"]["prompt_tokens"] == two["count"] + 2 * (ONE_TILE_EXTRA - 1)


def _huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (3000, 2000)).save(buffer, format="PNG")  # 6 Mpx, a few KB on disk
    return buffer.getvalue()


BAD_IMAGES = {
    "too many": ([data_url(png(56, 56))] * 4, "at most 3 (--max-images-per-request)"),
    "undecodable": (["data:image/png;base64," + base64.b64encode(b"x" * 64).decode()], "decode"),
    "over the pixel limit": ([data_url(_huge_png())], "pixels"),
    "not base64": (["data:image/png;base64,!!!"], "base64"),
    "an unknown scheme": (["ftp://example.com/a.png"], "ftp"),
    "a local file outside": (["file:///etc/hostname"], "--allowed-local-media-path"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_each_bad_image_is_a_400_and_the_server_keeps_serving(server, client, case):
    urls, expected = BAD_IMAGES[case]
    body = {"model": MODEL, "messages": message("Hi", *urls), "max_tokens": 2}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert expected in error["message"], error
    assert error["param"] == "messages"
    assert chat(client, message("Still there?", data_url(png(56, 56)))).usage.completion_tokens
    assert_idle(server)


def fetch_error(server: str, url: str) -> str:
    """The message of the 400 that asking `server` about the image at `url` gets."""
    body = {"model": MODEL, "messages": message("Hi", url), "max_tokens": 2}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages" and error["type"], error
    return error["message"]


def test_a_failed_fetch_tells_nothing_about_the_upstream(server, server_log, image_host):
    for path in ("/missing.png", "/page.html", "/to-localhost"):
        url = image_host + path
        text = fetch_error(server, url)
        assert text.endswith(f"could not fetch the image from {url}"), text
        told = text.removesuffix(url)
        assert "404" not in told and "text/html" not in told and "localhost" not in told
    log = server_log.read_text()  # the reasons are in the server's log instead
    assert "HTTP 404" in log and "text/html" in log and "--allowed-media-domains" in log


def test_hosts_outside_allowed_media_domains_are_refused(server, image_host):
    port = image_host.rsplit(":", 1)[1]
    _FETCHED.clear()
    text = fetch_error(server, f"http://localhost:{port}/red.png")
    assert "--allowed-media-domains" in text
    assert _FETCHED == []


@pytest.fixture(scope="module")
def default_server(launch_server, tiny_mm_dir, tmp_path_factory):
    """The default fetch policy."""
    log = tmp_path_factory.mktemp("mm-default") / "server.log"
    live = launch_server(log, "--enable-multimodal", "--page-size", "8", model_dir=tiny_mm_dir)
    yield live.base
    live.stop()


def test_local_and_metadata_addresses_are_refused_by_default(default_server, image_host):
    port = image_host.rsplit(":", 1)[1]
    _FETCHED.clear()
    for url in (
        image_host + "/red.png",
        f"http://localhost:{port}/red.png",
        f"http://[::1]:{port}/red.png",
        "http://169.254.169.254/latest/meta-data/",
    ):
        assert fetch_error(default_server, url).endswith(f"could not fetch the image from {url}")
    assert _FETCHED == []  # refused before connecting
    client = openai.OpenAI(base_url=default_server + "/v1", api_key="unused", max_retries=0)
    assert chat(client, message("Still there?", data_url(png(56, 56)))).usage.completion_tokens
    assert_idle(default_server)


def test_image_data_without_its_placeholder_is_a_400(server):
    r = httpx.post(
        server + "/generate",
        json={"text": "no placeholder", "image_data": data_url(png(56, 56))},
        timeout=60,
    )
    assert r.status_code == 400
    assert "<|image|>" in r.json()["error"]["message"]


def test_a_text_only_server_names_the_flag(launch_server, tmp_path_factory):
    live = launch_server(tmp_path_factory.mktemp("text-server") / "server.log")
    try:
        body = {"model": MODEL, "messages": message("Hi", data_url(png(56, 56)))}
        r = httpx.post(live.base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400
        assert "--enable-multimodal" in r.json()["error"]["message"]
        ok = httpx.post(live.base + "/v1/chat/completions", json={**body, "messages": []})
        assert ok.status_code == 400  # still serving: a plain bad request gets its own answer
    finally:
        live.stop()
