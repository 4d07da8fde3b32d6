"""The engine's batch log, in SGLang's wording: a `Prefill batch.` line for every step that
computes prompt tokens and a `Decode batch.` line every `interval` steps that decode.

Invariant: it reads only what the scheduler and the engine already count (the plan's sizes, the
scheduler's stats, the engine's generated-token total); it costs a few attribute reads per step,
plus one scheduler.stats() call per line it writes, and never touches the device. It runs on the
model thread, under the core lock (right after a step is planned). Its lines go to the
`pyllama4.engine` logger at INFO; nothing is computed when that level is off.

KV use is reported per pool: `token usage` for an engine with one pool; with chunk-local layers
`full` (the global pool, every position) and `swa` (the chunk-local pool; SGLang's name for the
pool of its windowed layers), each as #tokens held and as a fraction of the pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pyllama4.engine")
DECODE_LOG_INTERVAL = 40  # SGLang's --decode-log-interval default


@dataclass(frozen=True)
class PoolUse:
    """One KV pool's use: tokens held by requests (not pages only the prefix cache keeps, which
    it may evict) and the pool's size in tokens."""

    name: str  # "" for the only pool, else "full" or "swa"
    used: int
    total: int

    @property
    def usage(self) -> float:
        return self.used / self.total if self.total else 0.0


def pool_use(stats: Any, page_size: int) -> list[PoolUse]:
    """The pools' use from the scheduler's stats (one entry without a chunk-local pool)."""

    def use(name: str, total: int, free: int, evictable: int) -> PoolUse:
        return PoolUse(name, (total - free - evictable) * page_size, total * page_size)

    full = use("", stats.global_total, stats.global_free, stats.global_evictable)
    if not stats.local_total:
        return [full]
    swa = use("swa", stats.local_total, stats.local_free, stats.local_evictable)
    return [PoolUse("full", full.used, full.total), swa]


def usage_text(pools: list[PoolUse], *, counts: bool) -> str:
    """`token usage: 0.12` (with counts: `#token: 96, token usage: 0.12`), per pool."""
    parts = []
    for pool in pools:
        prefix = f"{pool.name} " if pool.name else ""
        if counts:
            parts.append(f"#{prefix}token: {pool.used}")
        parts.append(f"{prefix}token usage: {pool.usage:.2f}")
    return ", ".join(parts)


def prefill_line(
    new_seq: int, new_token: int, cached_token: int, pools: list[PoolUse], running: int, queued: int
) -> str:
    return (
        f"Prefill batch. #new-seq: {new_seq}, #new-token: {new_token}, "
        f"#cached-token: {cached_token}, {usage_text(pools, counts=False)}, "
        f"#running-req: {running}, #queue-req: {queued}"
    )


def decode_line(
    running: int,
    pools: list[PoolUse],
    hit_rate: float,
    graph_label: str,
    graph: bool,
    throughput: float,
    queued: int,
    accept: tuple[float, float] | None = None,
) -> str:
    """accept: speculative decoding's (accept length, accept rate) since the last line."""
    spec = "" if accept is None else f"accept len: {accept[0]:.2f}, accept rate: {accept[1]:.2f}, "
    return (
        f"Decode batch. #running-req: {running}, {usage_text(pools, counts=True)}, {spec}"
        f"cache hit rate: {hit_rate:.2f}, {graph_label}: {graph}, "
        f"gen throughput (token/s): {throughput:.2f}, #queue-req: {queued}"
    )


class BatchLog:
    def __init__(
        self,
        scheduler: Any,
        generated: Callable[[], int],
        graph_ran: Callable[[Any], bool],
        graph_label: str,
        interval: int = DECODE_LOG_INTERVAL,
        spec: tuple[Any, int] | None = None,
    ):
        """generated: the engine's total of generated tokens (read, never reset). graph_ran:
        whether a plan replays a captured graph. graph_label: "cuda graph" or "cpu graph".
        interval: decode steps between two decode lines. spec: with EAGLE3, its running totals
        (verify_steps, accepted_tokens: accepted drafts and the bonus token) and the draft
        tokens verified per step."""
        self.scheduler = scheduler
        self.generated = generated
        self.graph_ran = graph_ran
        self.graph_label = graph_label
        self.interval = interval
        self.spec = spec
        self._spec_seen = (0, 0)
        self._decode_steps = 0
        self._cached_seen = 0  # the scheduler's cached-prompt-token total at the last prefill
        self._last_tokens = 0
        self._last_time = time.perf_counter()

    def planned(self, plan: Any) -> None:
        """Called with each planned step, under the core lock."""
        if not log.isEnabledFor(logging.INFO):
            return
        decodes = plan.num_decodes
        if plan.num_requests > decodes:
            self._prefill(plan, decodes)
        if decodes:
            self._decode_steps += 1
            if self._decode_steps % self.interval == 0:
                self._decode(plan)

    def _prefill(self, plan: Any, decodes: int) -> None:
        stats = self.scheduler.stats()
        cached = stats.cached_tokens - self._cached_seen
        self._cached_seen = stats.cached_tokens
        new_seq = plan.num_requests - decodes
        new_token = plan.num_tokens - int(plan.query_start[decodes])
        pools = pool_use(stats, self.scheduler.page_size)
        running = max(stats.num_running - new_seq, 0)
        log.info(prefill_line(new_seq, new_token, cached, pools, running, stats.num_waiting))

    def _decode(self, plan: Any) -> None:
        stats = self.scheduler.stats()
        now, tokens = time.perf_counter(), self.generated()
        throughput = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_tokens, self._last_time = tokens, now
        hit_rate = stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
        pools = pool_use(stats, self.scheduler.page_size)
        graph = self.graph_ran(plan)
        running, queued = stats.num_running, stats.num_waiting
        line = decode_line(
            running, pools, hit_rate, self.graph_label, graph, throughput, queued, self._accept()
        )
        log.info(line)

    def _accept(self) -> tuple[float, float] | None:
        """SGLang's accept length (tokens per verify) and rate (of the draft tokens verified)
        since the last decode line; None without speculative decoding."""
        if self.spec is None:
            return None
        totals, draft_tokens = self.spec
        seen_steps, seen_tokens = self._spec_seen
        steps, tokens = totals.verify_steps - seen_steps, totals.accepted_tokens - seen_tokens
        self._spec_seen = (totals.verify_steps, totals.accepted_tokens)
        if not steps:
            return (0.0, 0.0)
        return (tokens / steps, tokens / (steps * draft_tokens))
