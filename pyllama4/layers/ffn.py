"""Llama 4 feed-forward blocks: dense SwiGLU and the top-k MoE with a shared expert.

Invariants (as in transformers): the router score is sigmoid(top-k logit), computed in float32,
cast to the activation dtype, and multiplies the expert INPUT; the shared expert sees the
unscaled input; expert weights are input-major (`gate_up_proj` [E, H, 2I]: gate then up;
`down_proj` [E, I, H]). Dispatch is sparse: each expert computes only the tokens routed to it:
all experts in two grouped matmuls (torch._grouped_mm: no host sync for the counts), or expert by
expert over each expert's contiguous rows, empty experts skipped (on the CPU where that is faster:
CPU_EXPERT_LOOP; fp8 experts; a torch without the grouped matmul for the dtype). Both give the
same bits on the CPU.
Small bf16 batches on a GPU use the fused MoE kernels instead (pyllama4.kernels.moe), which
compute the same in fp32 with one bf16 rounding at the end.

Tensor parallelism (`tp`, Megatron style): every block splits its intermediate dim; rank r holds the
r-th of `tp.size` parts of each gate/up output (gate_up_proj: its part of the gate columns, then its
part of the up columns) and of the down input, computes a partial output [N, H], and the block sums
the partials over the ranks with ONE all_reduce (an MoE: its shared and routed experts' partials
added locally first). The router is replicated. With tp.size == 1 everything is as without.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pyllama4.distributed.parallel import SINGLE, Shard, TensorParallel
from pyllama4.kernels import fused
from pyllama4.kernels import moe as moe_gpu

log = logging.getLogger("pyllama4.layers")
_GROUPED_MM: dict[tuple[str, torch.dtype], bool] = {}  # False: torch._grouped_mm failed there
# On the CPU (the counts are free to read there) the routed experts run one by one where that
# is faster than torch._grouped_mm: for packed experts (Experts.prefers_one_by_one), and when
# there are fewer routed rows than experts (the grouped kernel then spends its time on idle
# experts). Benchmarks switch it off to compare with the grouped matmul.
CPU_EXPERT_LOOP = True


class SwiGLU(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        tp: TensorParallel = SINGLE,
        what: str = "intermediate_size",
    ):
        """what: the config key of intermediate_size (for the error when tp.size does not
        divide it)."""
        super().__init__()
        self.tp = tp
        self.intermediate_size = intermediate_size  # all ranks'
        self.intermediate = tp.split(intermediate_size, what)  # this rank's [start, stop)
        inter = self.intermediate[1] - self.intermediate[0]
        self.gate_proj = nn.Linear(hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden_size, bias=False)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of the output (the whole output when tp.size == 1). bf16 on a GPU
        with the kernel library: silu(gate) * up in one kernel (pyllama4.kernels.fused, the same
        bf16 roundings)."""
        gate, up = self.gate_proj(x), self.up_proj(x)
        if fused.usable(gate, up):
            return self.down_proj(fused.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.partial(x))

    def shards(self) -> dict[str, Shard]:
        """This rank's parts of the checkpoint's weights, by relative name."""
        rows = Shard(0, (self.intermediate,), self.intermediate_size)
        return {
            "gate_proj.weight": rows,
            "up_proj.weight": rows,
            "down_proj.weight": Shard(1, (self.intermediate,), self.intermediate_size),
        }


class Experts(nn.Module):
    """Routed experts in transformers' fused, input-major layout."""

    prefers_one_by_one = False  # True: one_by_one beats grouped on the CPU at any batch

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.tp = tp
        self.all_intermediate_size = intermediate_size
        self.intermediate = tp.split(intermediate_size, "intermediate_size")  # [start, stop)
        self.intermediate_size = inter = self.intermediate[1] - self.intermediate[0]  # this rank's
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inter, hidden_size))

    def shards(self, full: int) -> dict[str, Shard]:
        """This rank's parts of the checkpoint's weights, by relative name (full: all ranks'
        intermediate_size)."""
        start, stop = self.intermediate
        return {
            "gate_up_proj": Shard(2, ((start, stop), (full + start, full + stop)), 2 * full),
            "down_proj": Shard(1, ((start, stop),), full),
        }

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on the rows routed to it (already scaled by their router scores)."""
        gate, up = self.gate_up(e, x).chunk(2, dim=-1)
        return self.down(e, up * F.silu(gate))

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, H] -> [n, 2I]: expert e's gate then up projection."""
        return x @ self.gate_up_proj[e]

    def down(self, e: int, a: torch.Tensor) -> torch.Tensor:
        """a [n, I] -> [n, H]: expert e's down projection."""
        return a @ self.down_proj[e]

    def one_by_one(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every expert on its rows of x (rows sorted by expert; counts[e]: expert e's rows), the
        matmuls expert by expert with empty experts skipped, SiLU(gate) * up once over all rows;
        equal to expert() run expert by expert (elementwise ops do not depend on the batch)."""
        runs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                runs.append((e, start, start + n))
                start += n
        gate, up = _cat([self.gate_up(e, x[lo:hi]) for e, lo, hi in runs]).chunk(2, dim=-1)
        a = up * F.silu(gate)
        return _cat([self.down(e, a[lo:hi]) for e, lo, hi in runs])

    def kernel_weights(self) -> Experts:
        """What the fused MoE kernels read (pyllama4.kernels.moe): these bf16 weights."""
        return self

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
        """Every expert on its rows of x (rows sorted by expert; offsets [E] int32: the end of
        each expert's rows) in two grouped matmuls, equal to expert() run expert by expert (bit
        for bit on the CPU), with no host sync for the counts; None where this device's torch
        has no grouped matmul for x's dtype (logged once; the caller loops over experts)."""
        key = (x.device.type, x.dtype)
        if not _GROUPED_MM.get(key, True):
            return None
        try:
            gate, up = torch._grouped_mm(x, self.gate_up_proj, offs=offsets).chunk(2, dim=-1)
            return torch._grouped_mm(up * F.silu(gate), self.down_proj, offs=offsets)
        except RuntimeError as error:
            _GROUPED_MM[key] = False
            log.info(
                "grouped matmul unavailable for %s %s (%s); experts run one by one", *key, error
            )
            return None


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Router(nn.Linear):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False)


class MoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.tp = tp
        self.intermediate_size = intermediate_size  # all ranks'
        self.top_k = top_k
        self.router = Router(hidden_size, num_experts)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, tp)
        self.shared_expert = SwiGLU(hidden_size, intermediate_size, tp)

    def shards(self) -> dict[str, Shard]:
        """This rank's parts of the checkpoint's expert weights, by relative name (the router is
        whole)."""
        parts = {f"experts.{k}": v for k, v in self.experts.shards(self.intermediate_size).items()}
        parts.update((f"shared_expert.{k}", v) for k, v in self.shared_expert.shards().items())
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, H]. On a GPU, bf16 batches of up to moe_gpu.MAX_TOKENS rows (decode)
        take the fused MoE kernels (pyllama4.kernels.moe; bf16 or FP8 experts, W8A16 or W8A8 as
        the experts module computes; the shared expert stays torch's);
        everything else, the CPU always, takes the torch path below. Under tensor parallelism
        both compute this rank's partial output, summed over the ranks at the end."""
        if x.is_cuda and moe_gpu.dispatches(
            x, weights := self.experts.kernel_weights(), self.top_k
        ):
            shared = self.shared_expert.partial(x)
            out = moe_gpu.fused_moe_gpu(x, self.router(x), weights, self.top_k, shared)
            return self.tp.all_reduce(out)
        logits = self.router(x)
        top_logits, top_experts = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)  # [N, k]
        # Group the N*k (token, expert) pairs by expert: one contiguous run per expert.
        flat_experts = top_experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        tokens = order // self.top_k if self.top_k > 1 else order
        routed_in = x[tokens] * scores.reshape(-1, 1)[order]
        if self._one_by_one(routed_in):
            routed_out = self._expert_by_expert(routed_in, flat_experts)
        else:
            routed_out = self._grouped(routed_in, flat_experts)
        out = self.shared_expert.partial(x)
        return self.tp.all_reduce(out.index_add_(0, tokens, routed_out))

    def _one_by_one(self, routed_in: torch.Tensor) -> bool:
        """Whether the routed experts run one by one (see CPU_EXPERT_LOOP); always for experts
        that are not Experts (fp8)."""
        if not isinstance(self.experts, Experts):
            return True
        if not (CPU_EXPERT_LOOP and routed_in.is_cpu):
            return False
        num_experts = self.experts.gate_up_proj.shape[0]
        return self.experts.prefers_one_by_one or routed_in.shape[0] < num_experts

    def _grouped(self, routed_in: torch.Tensor, flat_experts: torch.Tensor) -> torch.Tensor:
        """The routed rows (sorted by expert) through their experts in two grouped matmuls, or
        expert by expert where this device has none for the dtype."""
        # Tokens per expert by a scatter: torch.bincount would wait for the device (its size).
        num_experts = self.experts.gate_up_proj.shape[0]
        counts = torch.zeros(num_experts, dtype=torch.int64, device=routed_in.device)
        counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
        routed_out = self.experts.grouped(routed_in, counts.cumsum(0).to(torch.int32))
        if routed_out is None:
            return self._expert_by_expert(routed_in, flat_experts, counts)
        return routed_out

    def _expert_by_expert(
        self,
        routed_in: torch.Tensor,
        flat_experts: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routed rows (sorted by expert) through their experts one at a time, each on its
        contiguous run, empty experts skipped (the counts are read on the host)."""
        if counts is None:
            counts = torch.bincount(flat_experts, minlength=self.experts.gate_up_proj.shape[0])
        if isinstance(self.experts, Experts):
            return self.experts.one_by_one(routed_in, counts.tolist())
        routed_out = torch.empty_like(routed_in)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                stop = start + n
                routed_out[start:stop] = self.experts.expert(e, routed_in[start:stop])
                start = stop
        return routed_out
