"""pyllama4: a serving engine for Llama 4 with an OpenAI-compatible API.

The compiled core (`pyllama4._core`) owns all serving bookkeeping: the paged KV pools, the radix
prefix cache and the batch scheduler. Everything above it works on the StepPlans it produces.
"""

from pyllama4._core import (
    Finished,
    KVPool,
    RadixCache,
    RadixCacheStats,
    RequestInfo,
    Scheduler,
    SchedulerStats,
    StepPlan,
)

# The engine pulls in torch: import it on first use, so the core alone stays light.
_LAZY = {
    "Engine": "pyllama4.engine",
    "SamplingParams": "pyllama4.sampling_params",
    "RequestOutput": "pyllama4.outputs",
    "CompletionOutput": "pyllama4.outputs",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyllama4' has no attribute {name!r}")


__all__ = [
    "CompletionOutput",
    "Engine",
    "RequestOutput",
    "SamplingParams",
    "Finished",
    "KVPool",
    "RadixCache",
    "RadixCacheStats",
    "RequestInfo",
    "Scheduler",
    "SchedulerStats",
    "StepPlan",
]
__version__ = "0.1.0"
