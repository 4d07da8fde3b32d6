"""pyllama4 servers behind SGLang's router (sglang-router, cache-aware policy), as SGLang
workers: the router discovers them, spreads requests over them, and sends requests that share a
long prefix to the worker that holds it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_checks import metric

PROMPT_TOKENS = "pyllama4_prompt_tokens_total"
CACHED_TOKENS = "pyllama4_cached_prompt_tokens_total"
# A long shared prefix: a system prompt of several hundred tokens.
SYSTEM = " ".join(f"Rule {i}: answer politely and cite the manual section {i}." for i in range(40))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(launch_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("workers")
    live = [launch_server(logs / f"worker{i}.log", "--cpu-threads", "1") for i in range(2)]
    yield [w.base for w in live]
    for w in live:
        w.stop()


@pytest.fixture(scope="module")
def router(workers, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("router") / "router.log"
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--prometheus-port", str(free_port())]
    cmd += ["--policy", "cache_aware", "--worker-urls", *workers]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # wide: a loaded machine
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError(f"the router did not come up:\n{log.read_text()}")
    yield base
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def chat(client: openai.OpenAI, system: str, question: str) -> str:
    r = client.chat.completions.create(
        model="demo",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=4,
        temperature=0,
    )
    return r.choices[0].finish_reason


def test_64_requests_through_the_router_all_succeed_and_shared_prefixes_stay_on_one_worker(
    workers, router
):
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0)
    before = {w: (metric(w, PROMPT_TOKENS), metric(w, CACHED_TOKENS)) for w in workers}
    assert chat(client, SYSTEM, "Question 0?") in ("stop", "length")  # the prefix's first visit
    shared = [(SYSTEM, f"Question {i}?") for i in range(1, 32)]
    distinct = [
        (f"You are assistant number {i}, unique in {i * 7919} ways.", "Hi?") for i in range(32)
    ]
    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(lambda job: chat(client, *job), shared + distinct))
    assert len(reasons) == 63 and set(reasons) <= {"stop", "length"}

    served = {w: metric(w, PROMPT_TOKENS) - before[w][0] for w in workers}
    cached = {w: metric(w, CACHED_TOKENS) - before[w][1] for w in workers}
    assert all(tokens > 0 for tokens in served.values()), served  # both workers served
    prefix_tokens = len(
        httpx.post(workers[0] + "/tokenize", json={"prompt": SYSTEM}).json()["tokens"]
    )
    holder, other = sorted(workers, key=cached.get, reverse=True)
    # Every shared-prefix request after the first found the prefix cached where it landed.
    assert cached[holder] >= 31 * (prefix_tokens - 64), (cached, prefix_tokens)
    assert cached[other] < prefix_tokens, (cached, prefix_tokens)
