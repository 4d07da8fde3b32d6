"""One measured run of bench/serving.py, in SGLang's order: --warmup-requests untimed requests
(the first row, at most 32 output tokens, at --max-concurrency), the cache flush (--flush-cache),
a 1-second pause, the profiler start (--profile), then every row sent at --request-rate (Poisson
arrivals from numpy's global generator) with at most --max-concurrency in flight, bracketed by
readings of the server's CPU time; then the profiler stop and the server's accept length.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import numpy as np
from server_cpu import tree_cpu_seconds
from serving_clients import RequestOptions, http_client, send_request
from serving_data import DatasetRow, part_of_serving
from serving_metrics import RequestRecord


@dataclass
class Target:
    """One server under test: where it listens, how it is asked, and its pid for CPU readings."""

    label: str
    base_url: str
    backend: str
    model: str
    pid: int | None


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration: float
    accept_length: float | None  # the server's speculative accept length, if it reports one
    cpu: float | None  # the server's CPU seconds over the run (None: unmeasured)


async def arrivals(rows: list[DatasetRow], rate: float) -> AsyncIterator[DatasetRow]:
    """The rows, spaced by exponential gaps at `rate` requests/s (none for inf)."""
    for row in rows:
        yield row
        if rate != float("inf"):
            await asyncio.sleep(float(np.random.exponential(1.0 / rate)))


class Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.failed, self.quiet = total, 0, 0, quiet
        self.t0 = time.perf_counter()

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.failed += not rec.success
        if self.quiet:
            return
        el = time.perf_counter() - self.t0
        sys.stderr.write(
            f"\r[bench] {self.done}/{self.total} requests, {self.failed} failed, {el:.1f} s"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def _post(client: Any, url: str, what: str, **kw: Any) -> bool:
    try:
        resp = await client.post(url, timeout=600, **kw)
    except Exception as e:  # noqa: BLE001 - reported, the run goes on or stops below
        print(f"{what}: {url} failed: {e}", file=sys.stderr)
        return False
    if resp.status_code != 200:
        print(f"{what}: {url} answered {resp.status_code}: {resp.text[:200]}", file=sys.stderr)
    return resp.status_code == 200


async def _accept_length(client: Any, target: Target) -> float | None:
    """avg_spec_accept_length of /server_info (SGLang's route), else of /get_server_info."""
    for route in ("/server_info", "/get_server_info"):
        try:
            resp = await client.get(target.base_url + route, timeout=5)
            if resp.status_code == 200:
                info = resp.json()
                states = info.get("internal_states") or [info]
                return states[0].get("avg_spec_accept_length")
        except Exception:  # noqa: BLE001 - the server may not have the route
            pass
    return None


async def run_benchmark(
    args: argparse.Namespace, rows: list[DatasetRow], target: Target, opts: RequestOptions
) -> RunResult:
    """Warm up, then send the rows to `target` (see the module docstring)."""
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with http_client() as client:

        async def go(row: DatasetRow) -> RequestRecord:
            if sem is None:
                return await send_request(client, target.base_url, target.backend, opts, row)
            async with sem:
                return await send_request(client, target.base_url, target.backend, opts, row)

        print(f"Starting warmup with {args.warmup_requests} sequences...")
        warm = replace(rows[0], output_len=min(rows[0].output_len, 32))
        outs = await asyncio.gather(*(go(warm) for _ in range(args.warmup_requests)))
        if outs and not any(o.success for o in outs):
            error = outs[0].error
            raise SystemExit(f"error: the warmup requests to {target.label} failed: {error}")
        print(f"Warmup completed with {args.warmup_requests} sequences. Starting main run...")
        if args.flush_cache:
            route = "/reset_prefix_cache" if target.backend.startswith("vllm") else "/flush_cache"
            params = {"timeout": args.flush_cache_timeout} if "sglang" in target.backend else {}
            if not await _post(client, target.base_url + route, "--flush-cache", params=params):
                raise SystemExit("error: --flush-cache: the server did not flush its cache")
        await asyncio.sleep(1.0)
        if args.profile:
            await _post(client, target.base_url + "/start_profile", "--profile", json={})
        progress = Progress(len(rows), args.disable_tqdm)

        async def one(row: DatasetRow) -> RequestRecord:
            rec = await go(row)
            progress.update(rec)
            return rec

        cpu_start = tree_cpu_seconds(target.pid) if target.pid is not None else None
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(row)) async for row in arrivals(rows, args.request_rate)]
        records = await asyncio.gather(*tasks)
        if args.profile:
            await _post(client, target.base_url + "/stop_profile", "--profile", json={})
        accept_length = await _accept_length(client, target)
        duration = time.perf_counter() - start
        cpu_end = tree_cpu_seconds(target.pid) if target.pid is not None else None
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return RunResult(list(records), duration, accept_length, cpu)


def main(argv: list[str] | None = None) -> NoReturn:
    part_of_serving(__doc__, argv)


if __name__ == "__main__":
    main()
