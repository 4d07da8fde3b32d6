"""Checks on a live server shared by the end-to-end tests: its Prometheus metrics, idleness."""

from __future__ import annotations

import time

import httpx


def metric(server: str, name: str) -> float:
    """The value of one metric (the first sample of a labelled one) from GET /metrics."""
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def assert_idle(server: str) -> None:
    """Soon nothing runs and no request holds a KV page (a wide deadline, 60 s, for a loaded
    machine: an abort takes effect at the next step)."""
    names = ("pyllama4_num_running_reqs", "pyllama4_pages_held_by_requests")
    deadline = time.monotonic() + 60
    while any(metric(server, n) for n in names) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [metric(server, n) for n in names] == [0, 0]
