"""Offline generation: a batch of prompts run to completion on an engine, outside any event
loop of the caller's; final outputs in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from pyllama4.multimodal.inputs import ImagePrompt
from pyllama4.outputs import RequestOutput
from pyllama4.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pyllama4.engine.loop import Engine


def generate(
    engine: Engine,
    prompts: Sequence[str | Sequence[int] | ImagePrompt],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
) -> list[RequestOutput]:
    """Submits every prompt, runs the engine's loop until all have finished, and returns their
    final outputs (one SamplingParams for all, or one per prompt)."""
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")

    async def main() -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(prompts)
        streams = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]

        async def collect(i: int) -> None:
            async for out in streams[i]:
                results[i] = out

        async with engine:
            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(collect, i)
        return [r for r in results if r is not None]

    return anyio.run(main)
