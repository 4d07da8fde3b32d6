"""Multi-process serving: tensor parallelism (`parallel`)."""

from pyllama4.distributed.parallel import (
    SINGLE,
    Shard,
    TensorParallel,
    attention_heads,
    init_tensor_parallel,
)

__all__ = ["SINGLE", "Shard", "TensorParallel", "attention_heads", "init_tensor_parallel"]
