"""The server's log: SGLang's `Prefill batch.` / `Decode batch.` lines, the per-request lines
of --log-requests (levels 0-3) and request ids (X-Request-Id, the response's id) on every line
about a request. Unit tests for the formatting, then live demo servers."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx
import numpy as np
import pytest

from pyllama4 import SamplingParams
from pyllama4.engine.batch_log import BatchLog, PoolUse, decode_line, pool_use, prefill_line
from pyllama4.outputs import RequestMetrics, RequestOutput
from pyllama4.server import request_ids, request_log
from pyllama4.server.request_log import clip, error_line, finished_line, received_line

SECRET = "zebrafish quartz lantern"  # a prompt text no log line may hold at the default level


# ---- batch lines ----------------------------------------------------------------------------


def stats(**kw):
    base = dict(
        num_running=3,
        num_waiting=2,
        global_total=100,
        global_free=60,
        global_evictable=10,
        local_total=0,
        local_free=0,
        local_evictable=0,
        prompt_tokens=400,
        cached_tokens=100,
    )
    return SimpleNamespace(**{**base, **kw})


def test_one_pool_reads_as_sglang_token_usage():
    pools = pool_use(stats(), page_size=16)
    assert pools == [PoolUse("", 30 * 16, 100 * 16)]
    line = prefill_line(2, 17, 5, pools, running=1, queued=2)
    assert line == (
        "Prefill batch. #new-seq: 2, #new-token: 17, #cached-token: 5, token usage: 0.30, "
        "#running-req: 1, #queue-req: 2"
    )
    line = decode_line(3, pools, 0.25, "cpu graph", False, 30.5, 2)
    assert line == (
        "Decode batch. #running-req: 3, #token: 480, token usage: 0.30, cache hit rate: 0.25, "
        "cpu graph: False, gen throughput (token/s): 30.50, #queue-req: 2"
    )


def test_chunk_local_pool_is_named_apart():
    pools = pool_use(stats(local_total=50, local_free=40, local_evictable=5), page_size=16)
    assert [p.name for p in pools] == ["full", "swa"]
    line = decode_line(3, pools, 0.0, "cuda graph", True, 1.0, 0)
    assert "#full token: 480, full token usage: 0.30, #swa token: 80, swa token usage: 0.10" in line
    assert "cuda graph: True" in line


def test_speculative_decoding_adds_accept_length_and_rate(caplog):
    totals = SimpleNamespace(verify_steps=0, accepted_tokens=0)
    scheduler = FakeScheduler()
    batch = BatchLog(scheduler, lambda: 0, lambda p: False, "cpu graph", 1, spec=(totals, 4))
    caplog.set_level(logging.INFO, logger="pyllama4.engine")
    totals.verify_steps, totals.accepted_tokens = 10, 30
    batch.planned(plan(2, []))
    totals.verify_steps, totals.accepted_tokens = 20, 50
    batch.planned(plan(2, []))
    first, second = (r.getMessage() for r in caplog.records)
    assert "accept len: 3.00, accept rate: 0.75, cache hit rate" in first
    assert "accept len: 2.00, accept rate: 0.50, " in second  # since the last line


class FakeScheduler:
    page_size = 16

    def __init__(self):
        self.s = stats(cached_tokens=0)

    def stats(self):
        return self.s


def plan(decodes: int, prefill_tokens: list[int]):
    sizes = [1] * decodes + prefill_tokens
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    return SimpleNamespace(
        num_requests=len(sizes), num_decodes=decodes, num_tokens=int(starts[-1]), query_start=starts
    )


def test_batch_log_writes_prefills_and_every_nth_decode(caplog):
    scheduler = FakeScheduler()
    generated = [0]
    batch = BatchLog(scheduler, lambda: generated[0], lambda p: False, "cpu graph", interval=2)
    caplog.set_level(logging.INFO, logger="pyllama4.engine")
    scheduler.s = stats(cached_tokens=7)  # the admission of the 2 new requests hit 7 tokens
    batch.planned(plan(1, [10, 5]))  # one decode and two prefill chunks
    for _ in range(3):
        generated[0] += 3
        batch.planned(plan(3, []))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("Prefill batch. #new-seq: 2, #new-token: 15, #cached-token: 7,")
    assert "#running-req: 1, #queue-req: 2" in lines[0]
    decodes = [line for line in lines if line.startswith("Decode batch.")]
    assert len(decodes) == 2  # decode steps 2 and 4 (the mixed step counts)
    assert "cpu graph: False" in decodes[0] and "gen throughput (token/s): " in decodes[0]


def test_batch_log_costs_nothing_when_info_is_off(caplog):
    scheduler = FakeScheduler()
    scheduler.stats = None  # would raise if read
    batch = BatchLog(scheduler, lambda: 0, lambda p: False, "cpu graph", interval=1)
    caplog.set_level(logging.WARNING, logger="pyllama4.engine")
    batch.planned(plan(1, [4]))
    assert not caplog.records


# ---- request lines --------------------------------------------------------------------------


def final_output(text: str = "hello") -> RequestOutput:
    c = SimpleNamespace(finish_reason="stop", token_ids=[1, 2, 3], text=text)
    metrics = RequestMetrics(10.0, first_token_time=10.25, finish_time=11.5)
    return RequestOutput("req-1", [5] * 9, [c], True, 4, metrics)


def test_levels_follow_sglang():
    params = SamplingParams(temperature=0.5, max_tokens=8, stop=["END"], seed=3)
    route = "POST /v1/completions"
    zero = received_line("cmpl-1", route, 9, params, True, 0)
    assert zero == f"Receive: id=cmpl-1, route={route}, prompt_tokens=9, n=1, stream=True"
    one = received_line("cmpl-1", route, 9, params, True, 1)
    assert one.startswith(zero + ", sampling_params={temperature: 0.5, top_p: 1.0, top_k: -1, ")
    assert "max_tokens: 8" in one and "seed: 3" in one and "min_p" not in one  # a default
    assert "END" not in one
    assert "stop: ['END']" in received_line("cmpl-1", route, 9, params, True, 2)
    done = finished_line("cmpl-1", final_output(), 1, prompt=SECRET)
    assert done == (
        "Finish: id=cmpl-1, finish_reason=stop, prompt_tokens=9, completion_tokens=3, "
        "cached_tokens=4, e2e_latency=1.500s, ttft=0.250s"
    )
    two = finished_line("cmpl-1", final_output(), 2, prompt=SECRET)
    assert two == done + f", prompt={SECRET!r}, output='hello'"


def test_level_two_cuts_long_text_and_three_keeps_it():
    text = "a" * 1500 + "b" * 1500
    assert clip(text, 2) == f"{'a' * 1024!r} ... {'b' * 1024!r}"
    assert clip(text, 3) == repr(text)


def test_error_line_reads_the_openai_body():
    body = b'{"error": {"message": "bad temperature", "type": "invalid_request_error"}}'
    line = error_line("cmpl-9", "POST /v1/completions", 400, body)
    assert line == (
        "Error: id=cmpl-9, route=POST /v1/completions, status=400, "
        "type=invalid_request_error, message='bad temperature'"
    )
    assert "type=-" in error_line("-", "GET /x", 500, b"not json")


def test_ids_come_from_the_header_and_tag_log_records():
    async def main():
        seen = {}

        async def app(scope, receive, send):
            seen["before"] = request_ids.current_id()
            seen["id"] = request_ids.new_id("chatcmpl-")
            record = logging.LogRecord("x", logging.INFO, "f", 1, "m", None, None)
            request_ids.RequestIdFilter().filter(record)
            seen["tag"] = record.request
            await send({"type": "http.response.start", "status": 200, "headers": []})

        sent = []

        async def send(message):
            sent.append(message)

        headers = [(b"x-request-id", b"abc-123")]
        scope = {"type": "http", "method": "POST", "path": "/v1/x", "headers": headers}
        await request_ids.tagged(app)(scope, None, send)
        assert request_ids.current_id() is None  # reset once the request ends
        return seen, sent

    seen, sent = anyio.run(main)
    assert seen == {"before": "abc-123", "id": "chatcmpl-abc-123", "tag": " [chatcmpl-abc-123]"}
    assert (b"x-request-id", b"abc-123") in sent[0]["headers"]
    assert request_ids.client_id({"headers": [(b"x-request-id", b"a b\n")]}) is None


# ---- live servers ---------------------------------------------------------------------------


def wait_for(log: Path, pattern: str, timeout: float = 60.0) -> list[str]:
    """The log's lines matching `pattern`, waiting (widely) for at least one."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in log.read_text().splitlines() if re.search(pattern, line)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.fixture(scope="module")
def logged_server(launch_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    live = launch_server(log, "--log-requests", "--decode-log-interval", "2")
    yield live, log
    live.stop()


def chat(base: str, headers: dict | None = None, **extra) -> httpx.Response:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": f"Say something about a {SECRET}."}],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_a_request_logs_received_and_finished_with_its_id(logged_server):
    live, log = logged_server
    r = chat(live.base)
    assert r.status_code == 200
    rid = r.json()["id"]
    received = wait_for(log, rf"Receive: id={re.escape(rid)},")
    assert len(received) == 1
    assert "route=POST /v1/chat/completions" in received[0] and "stream=False" in received[0]
    assert "sampling_params={temperature: 0.0" in received[0]
    finished = wait_for(log, rf"Finish: id={re.escape(rid)},")
    assert len(finished) == 1
    assert "finish_reason=length" in finished[0] and "completion_tokens=8" in finished[0]
    assert "ttft=" in finished[0] and "e2e_latency=" in finished[0]
    assert SECRET not in log.read_text()  # the default level holds no prompt text


def test_client_request_id_is_echoed_and_names_the_response(logged_server):
    live, log = logged_server
    r = chat(live.base, headers={"X-Request-Id": "trace-42"}, stream=True)
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-42"
    assert '"id":"chatcmpl-trace-42"' in r.text
    assert wait_for(log, r"Receive: id=chatcmpl-trace-42, .*stream=True")
    assert wait_for(log, r"Finish: id=chatcmpl-trace-42,")


def test_a_failed_request_logs_its_id(logged_server):
    live, log = logged_server
    body = {"model": "demo", "prompt": "hi", "temperature": 9}
    r = httpx.post(
        live.base + "/v1/completions", json=body, headers={"X-Request-Id": "bad-7"}, timeout=60
    )
    assert r.status_code == 400
    errors = wait_for(log, r"Error: id=cmpl-bad-7,")
    assert len(errors) == 1
    assert "status=400" in errors[0] and "type=invalid_request_error" in errors[0]
    r = httpx.post(live.base + "/v1/completions", content=b"{", timeout=60)
    assert r.status_code == 400
    assert wait_for(log, r"Error: id=cmpl-[0-9a-f]{32}, route=POST /v1/completions, status=400")


def test_batch_lines_appear_with_their_fields(logged_server):
    live, log = logged_server
    assert chat(live.base, max_tokens=6).status_code == 200
    prefill = wait_for(log, r"Prefill batch\. #new-seq: \d+, #new-token: \d+, #cached-token: \d+")
    assert prefill and "token usage: " in prefill[-1] and "#queue-req: " in prefill[-1]
    decode = wait_for(log, r"Decode batch\. #running-req: \d+, #token: \d+, token usage: ")
    assert decode
    assert "cpu graph: False" in decode[-1] and "gen throughput (token/s): " in decode[-1]
    assert "cache hit rate: " in decode[-1]


def test_top_level_logs_prompt_and_output_text(launch_server, tmp_path):
    log = tmp_path / "server.log"
    live = launch_server(log, "--log-requests", "--log-requests-level", "3")
    try:
        r = httpx.post(
            live.base + "/generate",
            json={"text": SECRET, "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
            timeout=120,
        )
        assert r.status_code == 200
        out = r.json()
        rid = out["meta_info"]["id"]
        assert wait_for(log, rf"Receive: id={rid}, route=POST /generate")
        finished = wait_for(log, rf"Finish: id={rid},")
        assert finished and f"prompt={SECRET!r}, output={out['text']!r}" in finished[0]
    finally:
        live.stop()


@pytest.fixture(autouse=True)
def _request_log_off():
    """Unit tests here may configure the module-level request log; leave it off afterwards."""
    yield
    request_log.configure(False)
