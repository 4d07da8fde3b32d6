"""One measured run of bench/serving.py: the rows sent to one server at --request-rate (Poisson
arrivals) with at most --max-concurrency in flight, bracketed by readings of the server's CPU time;
and the untimed warm-up before the first run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
from server_cpu import tree_cpu_seconds
from serving_clients import http_client, send_request
from serving_data import DatasetRow, part_of_serving
from serving_metrics import RequestRecord


async def arrivals(rows: list[DatasetRow], rate: float, rng: np.random.Generator):
    """The rows, spaced by exponential gaps at `rate` requests/s (Poisson; none for inf)."""
    for i, row in enumerate(rows):
        yield row
        if math.isinf(rate) or i == len(rows) - 1:
            continue
        await asyncio.sleep(float(rng.exponential(1.0 / rate)))


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.failed, self.t0 = total, 0, 0, time.perf_counter()

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.failed += not rec.success
        el = time.perf_counter() - self.t0
        sys.stderr.write(
            f"\r[bench] {self.done}/{self.total} requests, {self.failed} failed, {el:.1f} s"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@dataclass
class Target:
    """One server under test: where it listens, how it is asked, and its pid for CPU readings."""

    label: str
    base_url: str
    backend: str
    model: str
    pid: int | None


async def warm_up(args: argparse.Namespace, target: Target, row: DatasetRow) -> None:
    """--warmup-requests untimed requests of `row`'s prompt and at most 16 output tokens."""
    short = DatasetRow(row.prompt, row.prompt_len, min(row.output_len, 16))
    async with http_client() as client:
        for _ in range(args.warmup_requests):
            rec = await send_request(
                client,
                target.base_url,
                target.backend,
                target.model,
                short,
                not args.disable_ignore_eos,
            )
            if not rec.success:
                raise SystemExit(f"error: the warmup request to {target.label} failed: {rec.error}")


async def run_benchmark(
    args: argparse.Namespace, rows: list[DatasetRow], target: Target
) -> tuple[list[RequestRecord], float, float | None, float | None]:
    """Send the rows to `target`; returns the records, the duration, the server's accept length
    if it reports one, and the server's CPU seconds over the run (None: unmeasured)."""
    ignore_eos = not args.disable_ignore_eos
    async with http_client() as client:

        def go(row: DatasetRow):
            return send_request(
                client, target.base_url, target.backend, target.model, row, ignore_eos
            )

        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        progress = Progress(len(rows))

        async def one(row: DatasetRow) -> RequestRecord:
            if sem is None:
                rec = await go(row)
            else:
                async with sem:
                    rec = await go(row)
            progress.update(rec)
            return rec

        rng = np.random.default_rng(args.seed + 1)
        cpu_start = tree_cpu_seconds(target.pid) if target.pid is not None else None
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(one(row)) async for row in arrivals(rows, args.request_rate, rng)
        ]
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        cpu_end = tree_cpu_seconds(target.pid) if target.pid is not None else None
        cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
        accept_length = None
        try:
            info = (await client.get(target.base_url + "/get_server_info", timeout=5)).json()
            states = info.get("internal_states") or [info]
            accept_length = states[0].get("avg_spec_accept_length")
        except Exception:  # noqa: BLE001 - the server may not have the endpoint
            pass
    return list(records), duration, accept_length, cpu


def main(argv: list[str] | None = None) -> NoReturn:
    part_of_serving(__doc__, argv)


if __name__ == "__main__":
    main()
