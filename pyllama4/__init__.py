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

__all__ = [
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
