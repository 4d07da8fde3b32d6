"""The model thread's side of the engine loop: plan, run and commit one step after another,
and hand each committed step's outputs to the event loop.

Invariants: nothing but the model thread runs this loop, and no other thread stands between two
of its steps: the event loop only receives outputs (one call per step, at most MAX_AHEAD steps
behind) and wakes the loop when requests arrive at an idle engine. The scheduler and the map of
running completions are read and changed under the core lock, which is never held while a step
computes or while waiting for the event loop. A step always completes and commits, also when the
loop is being stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from pyllama4._core import Scheduler
from pyllama4.engine.batch_log import BatchLog
from pyllama4.engine.executor import StepExecutor, StepResult, image_feed
from pyllama4.engine.records import Completion, StepOutputs, StepRow

log = logging.getLogger("pyllama4.engine")
MAX_AHEAD = 2  # committed steps the model thread may run ahead of the event loop's delivery


class StepLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        executor: StepExecutor,
        by_core: dict[int, Completion],
        lock: threading.Lock,
        *,
        overlap: bool,
        deliver: Callable[[StepOutputs], None],
        fail: Callable[[list[int], str], None],
    ):
        """by_core: the running completions by core id (the engine's; under `lock`, as the
        scheduler). deliver: makes a step's text and emits it, on the event loop. fail: ends the
        requests (by core id) of a step that raised, with the message, on the event loop.
        overlap: False: each step's outputs are delivered before the next step is planned."""
        self.scheduler = scheduler
        self.executor = executor
        self.by_core = by_core
        self._lock = lock
        self.overlap = overlap
        self.deliver = deliver
        self.fail = fail
        self.images_encoded = 0
        self.stopping = False
        # When a step's outputs go to the event loop: without overlap at once ("commit"); on a
        # GPU once the next step is queued on the device ("launch"); on the CPU, where a step
        # computes while it is launched, once the next step is planned ("plan"): the event loop
        # then makes their text while the model thread's torch operations (which release the
        # GIL) compute, not while its Python plans.
        on_cpu = executor.runner.device.type == "cpu"
        self._handover = "commit" if not overlap else "plan" if on_cpu else "launch"
        self._work = threading.Event()  # set when requests arrive: wakes an idle model thread
        self._delivered = threading.Condition()  # _posted fell: the event loop delivered a step
        self._posted = 0  # steps posted to the event loop, not delivered yet
        self._call_soon: Callable[..., Any] = _not_running
        self.batch_log: BatchLog | None = None  # told of each planned step (the engine's)

    def start(self, call_soon: Callable[..., Any]) -> None:
        """Before drive(): call_soon runs a callback on the event loop, from any thread."""
        self._call_soon = call_soon
        self.stopping = False

    def stop(self) -> None:
        """drive() returns after the step it is running (from any thread)."""
        self.stopping = True
        self._work.set()

    def wake(self) -> None:
        """Requests arrived (from any thread)."""
        self._work.set()

    def drive(self) -> None:
        """The loop, on the model thread: schedule, run and commit one step after another, with
        no other thread on the way; each committed step's outputs go to the event loop in one
        call. Requests arrive and leave through the core (under the core lock) meanwhile."""
        held: StepOutputs | None = None  # committed; posted at the next step's handover point
        while True:
            if not self.overlap:
                self._settle()  # the last step's text first: stop strings end requests now
            self._work.clear()  # before the stop check: stop() sets the flag, then the event
            if self.stopping:
                break
            step = self._plan()
            if step is None:
                if held is not None:
                    self._post(held)
                    held = None
                    continue
                self._work.wait(timeout=None if self._idle() else 0.01)
                continue
            if held is not None and self._handover == "plan":
                self._post(held)
                held = None
            outputs = self._run(*step, held)  # "launch": posts held once the step is queued
            held = None
            if outputs is not None and self._handover == "commit":
                self._post(outputs)
            else:
                held = outputs
        if held is not None:
            self._post(held)

    def _idle(self) -> bool:
        with self._lock:
            return not self.scheduler.has_work()

    def _plan(self) -> tuple[Any, list[Completion], list[Any], Any, Any] | None:
        """The next step's plan and what its execution reads of the requests, taken under the
        core lock; None when there is nothing to run."""
        with self._lock:
            if not self.scheduler.has_work():
                return None
            plan = self.scheduler.schedule()
            if plan.num_requests == 0:
                return None
            if self.batch_log is not None:
                self.batch_log.planned(plan)
            ids = plan.request_ids[plan.sample_requests].tolist()
            completions = [self.by_core[i] for i in ids]
            for c in completions:  # the cache hit is known once the request is admitted
                if c.index == 0 and not c.sampled_ids:
                    c.request.cached_tokens = self.scheduler.request_info(c.core_id).cached_tokens
            feed = image_feed(plan, self.by_core.get)
            prepared = self.executor.prepare(plan, self.by_core.get)
        return plan, completions, [c.sample_request() for c in completions], feed, prepared

    def _run(
        self,
        plan: Any,
        completions: list[Completion],
        requests: list[Any],
        feed: Any,
        prepared: Any,
        held: StepOutputs | None,
    ) -> StepOutputs | None:
        """Runs and commits one step; returns its outputs, their text not made yet. held: the
        last step's outputs, posted once this step is queued on the device (before the wait
        for its tokens), so that their text is made while it computes."""
        launched: Future[None] = Future()
        if held is not None:
            launched.add_done_callback(lambda _: self._post(held))
        try:
            result = self.executor.execute(plan, requests, feed, prepared, launched)
        except Exception as e:  # noqa: BLE001 - any failure of a step fails its requests only
            log.exception("step failed")
            with self._lock:
                self.scheduler.commit(np.zeros(plan.num_samples, dtype=np.int32))
            self._call_soon(self.fail, plan.request_ids.tolist(), f"{type(e).__name__}: {e}")
            return None
        if feed is not None:
            self.images_encoded += feed.encoded
        return self._commit(completions, result)

    def _commit(self, completions: list[Completion], result: StepResult) -> StepOutputs:
        """Commits a step's tokens to the core and records them in their completions (the next
        step's penalties and min_tokens read them); a completed grammar ends its request here."""
        with self._lock:
            committed = self.scheduler.commit(result.tokens, result.counts)
        finished = {f.request_id: f for f in committed}
        outputs = StepOutputs(time.monotonic())
        flat = result.tokens.tolist()
        if result.counts is None:  # one token per row
            per_row = [flat[row : row + 1] for row in range(len(flat))]
        else:
            sizes = result.counts.tolist()
            ends = np.cumsum(sizes).tolist()
            per_row = [flat[end - n : end] for end, n in zip(ends, sizes, strict=True)]
        rows = len(completions)
        verified = [False] * rows if result.verified is None else result.verified.tolist()
        for c, fresh, logprob, verify in zip(
            completions, per_row, result.logprobs, verified, strict=True
        ):
            outputs.requests[c.request.request_id] = c.request
            if c.finished:  # ended while in flight
                continue
            c.verify_steps += verify
            done = finished.get(c.core_id) if finished else None
            if done is not None:  # the core stopped at a stop token or the length limit
                fresh = fresh[: done.num_output_tokens - len(c.sampled_ids)]
            c.sampled_ids.extend(fresh)
            grammar_ended = done is None and c.constraint is not None and c.constraint.finished
            if grammar_ended:  # a stop token the request does not stop at (ignore_eos)
                with self._lock:
                    self.scheduler.finish(c.core_id, "stop")
            outputs.rows.append(StepRow(c, fresh, logprob, done, grammar_ended))
        return outputs

    def _post(self, outputs: StepOutputs) -> None:
        """Hands a step's outputs to the event loop; waits while it is MAX_AHEAD steps behind."""
        with self._delivered:
            while self._posted >= MAX_AHEAD:
                self._delivered.wait()
            self._posted += 1
        self._call_soon(self._on_outputs, outputs)

    def _settle(self) -> None:
        """Waits until the event loop has delivered every posted step."""
        with self._delivered:
            while self._posted:
                self._delivered.wait()

    def _on_outputs(self, outputs: StepOutputs) -> None:
        """On the event loop: delivers a posted step."""
        try:
            self.deliver(outputs)
        finally:
            with self._delivered:
                self._posted -= 1
                self._delivered.notify_all()


def _not_running(*args: Any) -> None:
    raise RuntimeError("the engine loop is not running")
