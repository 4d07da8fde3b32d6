"""The HTTP layer's guards, end to end on the demo model: the API key on every route but
/health, deadlines on reading a request, an early 413, the concurrency cap, 405's Allow,
GET /v1/models/{id}, and 500s that name no internals. Raw sockets where the bytes on the wire
matter; deadlines are wide (this machine may be loaded) and only bound a hang."""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from typing import Any

import anyio
import httpx
import openai
import pytest

from pyllama4.server import early_413
from pyllama4.server.router import Router

KEY = "sekret"
AUTH = {"authorization": f"Bearer {KEY}"}
BODY_TIMEOUT_S = 3
KEEP_ALIVE_S = 3
MAX_BODY = 1_000_000
MARGIN_S = 60  # on top of a server timeout: only a hang fails

ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/demo"),
    ("GET", "/health_generate"),
    ("GET", "/metrics"),
    ("POST", "/generate"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/get_model_info"),
    ("GET", "/get_server_info"),
    ("GET", "/model_info"),
    ("GET", "/server_info"),
    ("GET", "/get_load"),
    ("GET", "/flush_cache"),
    ("POST", "/flush_cache"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/path"),  # unknown paths too: 401 before 404
    ("DELETE", "/v1/models"),  # and methods: 401 before 405
]


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    flags = ["--api-key", KEY, "--timeout-request-body", str(BODY_TIMEOUT_S)]
    flags += ["--timeout-keep-alive", str(KEEP_ALIVE_S), "--max-request-body-bytes", str(MAX_BODY)]
    live = launch_server(tmp_path_factory.mktemp("http") / "server.log", *flags)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def capped(launch_server, tmp_path_factory):
    """Two requests in the app at most; /metrics open to scrapers."""
    flags = ["--api-key", KEY, "--public-metrics", "--limit-concurrency", "2"]
    live = launch_server(tmp_path_factory.mktemp("capped") / "server.log", *flags)
    yield live
    live.stop()


def connect(port: int, timeout: float = BODY_TIMEOUT_S + MARGIN_S) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout if never)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: test", f"authorization: Bearer {KEY}"]
    lines += ["content-type: application/json", f"content-length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """(status line, headers with lower-case names, body) of one raw response."""
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = raw_head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, {k.lower(): v for k, v in headers.items()}, body


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    return error


# ---- the API key ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_health_needs_the_key(server, method, path):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        r = httpx.request(method, server.base + path, headers=headers, timeout=60)
        error = assert_openai_error(r, 401)
        assert error["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    body = {"text": "hi", "prompt": "hi", "tokens": [1], "sampling_params": {"max_new_tokens": 1}}
    kwargs = {"json": body} if method == "POST" else {}
    r = httpx.request(method, server.base + path, headers=AUTH, timeout=120, **kwargs)
    assert r.status_code != 401


def test_health_needs_no_key(server, capped):
    for live in (server, capped):
        assert httpx.get(live.base + "/health").status_code == 200


def test_public_metrics_opens_metrics_alone(capped):
    r = httpx.get(capped.base + "/metrics")
    assert r.status_code == 200 and "pyllama4" in r.text
    assert httpx.get(capped.base + "/get_server_info").status_code == 401


# ---- reading a request ----------------------------------------------------------------------


def test_a_body_that_stops_coming_gets_408_and_the_connection_closes(server):
    with connect(server.port) as sock:
        sock.sendall(head("/v1/completions", 100) + b"{")
        status, headers, body = split_response(read_to_eof(sock))
    assert status.startswith("HTTP/1.1 408")
    assert headers["connection"] == "close"
    assert b'"code":408' in body and b"did not arrive" in body


def test_headers_that_trickle_are_cut_off_by_the_keep_alive_timer(server):
    """hypercorn's idle timer runs until a request's headers are complete: a client that sends
    one header byte a second is closed (never answered), however long it would go on."""
    with connect(server.port) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: test\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < KEEP_ALIVE_S + MARGIN_S:
            try:
                sock.sendall(b"x")
                sock.settimeout(1.0)
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    assert closed


def test_an_announced_body_over_the_limit_gets_413_before_100_continue(server):
    """Expect: 100-continue with a Content-Length of a terabyte: the first (and only) response
    is the 413; the client is never invited to send its body."""
    with connect(server.port) as sock:
        sock.sendall(head("/v1/completions", 10**12, "expect: 100-continue"))
        data = read_to_eof(sock)
    status, headers, body = split_response(data)
    assert status.startswith("HTTP/1.1 413"), data[:200]
    assert b"100 Continue" not in data
    assert headers["connection"] == "close" and b'"code":413' in body


def test_an_announced_body_over_the_limit_gets_413_without_sending_it(server):
    with connect(server.port) as sock:
        sock.sendall(head("/v1/completions", MAX_BODY + 1))
        status, _, body = split_response(read_to_eof(sock))
    assert status.startswith("HTTP/1.1 413") and b"is over" in body


def test_a_chunked_body_over_the_limit_is_cut_at_the_limit(server):
    def chunks():
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b"x" * 10_000

    r = httpx.post(server.base + "/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert_openai_error(r, 413)


def test_the_early_413_hook_still_fits_hypercorn():
    """A hypercorn that moved the internals the early 413 hooks into fails here (and the server
    refuses to start), instead of quietly sending `100 Continue` again."""
    early_413.check_hypercorn()


# ---- the concurrency cap --------------------------------------------------------------------


def test_beyond_the_concurrency_cap_requests_get_503_and_health_still_answers(capped):
    held = [connect(capped.port) for _ in range(2)]
    try:
        for sock in held:  # two requests in the app, waiting for the rest of their bodies
            sock.sendall(head("/v1/completions", 100) + b"{")
        deadline = time.monotonic() + MARGIN_S
        while (r := httpx.get(capped.base + "/v1/models", headers=AUTH)).status_code == 200:
            assert time.monotonic() < deadline, "the cap never took effect"
            time.sleep(0.1)
        error = assert_openai_error(r, 503)
        assert "concurrent requests" in error["message"]
        assert r.headers["retry-after"] and r.headers["connection"] == "close"
        assert httpx.get(capped.base + "/health").status_code == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + MARGIN_S
    while httpx.get(capped.base + "/v1/models", headers=AUTH).status_code != 200:
        assert time.monotonic() < deadline, "requests that left still count against the cap"
        time.sleep(0.1)


# ---- 2,000 clients that stop halfway --------------------------------------------------------

HALF_BODIES = 2000


def open_half_bodies(port: int, count: int) -> list[socket.socket]:
    """`count` connections, each with its headers (Content-Length: 1000) and 500 body bytes
    sent, opened without blocking on any one of them."""
    request = head("/v1/completions", 1000) + b" " * 500
    socks, pending = [], selectors.DefaultSelector()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        pending.register(sock, selectors.EVENT_WRITE)
        socks.append(sock)
    deadline = time.monotonic() + MARGIN_S
    while pending.get_map():
        assert time.monotonic() < deadline, "connections did not open"
        for key, _ in pending.select(timeout=1.0):
            pending.unregister(key.fileobj)
            key.fileobj.sendall(request)  # type: ignore[union-attr]
    return socks


def wait_closed(socks: list[socket.socket], deadline: float) -> tuple[int, int]:
    """Waits until every socket sees EOF; returns (how many got a 408 first, how many EOF)."""
    watch = selectors.DefaultSelector()
    received = {}
    for sock in socks:
        watch.register(sock, selectors.EVENT_READ)
        received[sock] = b""
    eofs = 0
    while watch.get_map() and time.monotonic() < deadline:
        for key, _ in watch.select(timeout=1.0):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)  # type: ignore[union-attr]
            except ConnectionResetError:
                chunk = b""
            received[sock] += chunk
            if not chunk:
                watch.unregister(sock)
                eofs += 1
    got_408 = sum(data.startswith(b"HTTP/1.1 408") for data in received.values())
    return got_408, eofs


def serve_meanwhile(base: str, results: dict[str, Any]) -> None:
    """/health (timed) and a small chat completion, stored in `results`."""
    t0 = time.monotonic()
    results["health"] = httpx.get(base + "/health", timeout=MARGIN_S).status_code
    results["health_s"] = time.monotonic() - t0
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    results["chat"] = answer.choices[0].message.content


def test_2000_half_sent_bodies_are_closed_while_the_server_serves(server, capsys):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HALF_BODIES + 200:
        if hard != resource.RLIM_INFINITY and hard < HALF_BODIES + 200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard}: too few descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (HALF_BODIES + 200, hard))
    start = time.monotonic()
    socks = open_half_bodies(server.port, HALF_BODIES)
    opened = time.monotonic() - start
    results: dict[str, Any] = {}
    meanwhile = threading.Thread(target=serve_meanwhile, args=(server.base, results))
    meanwhile.start()
    try:
        got_408, eofs = wait_closed(socks, time.monotonic() + BODY_TIMEOUT_S + MARGIN_S)
        closed_s = time.monotonic() - start
    finally:
        for sock in socks:
            sock.close()
        meanwhile.join()
    with capsys.disabled():
        print(
            f"\n{HALF_BODIES} half bodies: opened in {opened:.1f} s, all closed "
            f"{closed_s:.1f} s after the first connect ({got_408} with a 408 first); "
            f"/health took {results.get('health_s', -1) * 1000:.0f} ms while they hung"
        )
    assert eofs == HALF_BODIES
    assert results["health"] == 200 and results["chat"] is not None
    assert httpx.get(server.base + "/health").status_code == 200


# ---- routing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/v1/models", "GET, HEAD"),
        ("GET", "/v1/chat/completions", "POST"),
        ("HEAD", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models/demo", "GET, HEAD"),
    ],
)
def test_405_lists_the_allowed_methods(server, method, path, allow):
    r = httpx.request(method, server.base + path, headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == allow
    if method != "HEAD":
        assert_openai_error(r, 405)


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/get_model_info"])
def test_head_is_get_without_the_body(server, path):
    got = httpx.get(server.base + path, headers=AUTH)
    head = httpx.head(server.base + path, headers=AUTH)
    assert head.status_code == got.status_code == 200
    assert head.headers["content-type"] == got.headers["content-type"] and head.content == b""
    assert httpx.head(server.base + "/metrics").status_code == 401  # the key still applies


def test_a_model_is_retrieved_by_its_id(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
    card = client.models.retrieve("demo")
    assert card.id == "demo" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("meta-llama/Llama-4-Scout-17B-16E-Instruct")
    path = "/v1/models/meta-llama/Llama-4-Scout-17B-16E-Instruct"
    error = assert_openai_error(httpx.get(server.base + path, headers=AUTH), 404)
    assert error["param"] == "model" and "Llama-4-Scout" in error["message"]


def test_an_unexpected_error_is_a_500_that_names_no_internals():
    async def broken(body: bytes, send: Any, receive: Any) -> None:
        raise ValueError("secret detail from /srv/internal/path")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    router = Router({("GET", "/boom"): broken}, None)
    scope = {"type": "http", "method": "GET", "path": "/boom", "headers": []}
    anyio.run(router, scope, receive, send)
    assert sent[0]["status"] == 500
    body = sent[1]["body"].decode()
    assert "internal error (logged by the server): ValueError" in body
    assert "secret" not in body and "/srv" not in body
