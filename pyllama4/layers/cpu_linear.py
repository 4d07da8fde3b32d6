"""CPU matmuls: oneDNN-prepacked bf16 linears and routed experts, and the CPU's serving dtype.

Invariant: preparing a model for the CPU (`prepare_cpu`) changes how its bf16 products are
computed, never what it holds. A `PackedLinear` keeps nn.Linear's `weight` parameter (so the
state_dict, weight loading and every reader of `.weight` are unchanged) and computes with a
oneDNN-packed copy derived from it, re-derived whenever the weight is reassigned or written in
place (load_state_dict after packing included); `PackedExperts` does the same per expert. The
products are bf16 x bf16 summed in fp32 and rounded once to bf16, as F.linear's; only the order
of the sums differs (bf16 tolerance). Anything else (fp32, another device, autograd) takes
F.linear / the plain matmuls. Memory: the packed copies add the packed weights' bytes once more.
Packing applies only where the CPU has native bf16 dot products (AVX-512 BF16 or AMX), where
oneDNN's packed bf16 GEMM beats fp32; elsewhere `prepare_cpu` leaves the model as it is.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pyllama4.layers.ffn import Experts

FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags, the faster first
PACK_BATCH_HINT = 16  # the row count oneDNN chooses the packed layout for
# Narrower linears (routers) stay with F.linear: oneDNN's packed linear costs ~20 us a call on
# top of the product, more than F.linear's whole bf16 product for so few outputs.
MIN_PACKED_OUT_FEATURES = 64


def fast_bf16_flag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's native bf16 dot-product flag (amx_bf16 or avx512_bf16), None without one (or
    without /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return next((flag for flag in FAST_BF16_FLAGS if flag in flags), None)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] bf16 -> oneDNN's packed copy for _linear_pointwise."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


def _packed_mm(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@functools.cache
def packing_available() -> bool:
    """Whether this CPU has native bf16 dot products and this torch the oneDNN packed linear."""
    if fast_bf16_flag() is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool(
            torch.equal(
                _packed_mm(torch.ones(2, 8, dtype=torch.bfloat16), _pack(w)),
                torch.full((2, 8), 8.0, dtype=torch.bfloat16),
            )
        )
    except (AttributeError, RuntimeError):
        return False


def _version_key(t: torch.Tensor) -> tuple[int, int]:
    """Changes when t is reassigned or written in place."""
    return t.data_ptr(), 0 if t.is_inference() else t._version


def _uses_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.is_cpu
        and weight.is_cpu
        and not (torch.is_grad_enabled() and weight.requires_grad)
    )


class PackedLinear(nn.Linear):
    """An nn.Linear computing bf16 on the CPU with a oneDNN-packed copy of its weight."""

    _packed: torch.Tensor | None = None
    _key: tuple[int, int] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A PackedLinear holding linear's own weight and bias parameters (not copies)."""
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _uses_packed(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        if self._key != (key := _version_key(self.weight)):
            self._packed, self._key = _pack(self.weight), key
        out = _packed_mm(x, self._packed)
        return out if self.bias is None else out + self.bias


class PackedExperts(Experts):
    """layers.ffn.Experts computing each expert's two bf16 matmuls on the CPU with oneDNN-packed
    copies of its weights ([out, in], derived from the input-major parameters)."""

    prefers_one_by_one = True  # the packed matmuls beat torch._grouped_mm at any batch
    _packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    _key: tuple[tuple[int, int], tuple[int, int]] | None = None

    @classmethod
    def from_experts(cls, experts: Experts) -> PackedExperts:
        """PackedExperts holding experts' own parameters (not copies)."""
        num, hidden, _ = experts.gate_up_proj.shape
        with torch.device("meta"):
            module = cls(num, hidden, experts.all_intermediate_size, experts.tp)
        module.gate_up_proj, module.down_proj = experts.gate_up_proj, experts.down_proj
        return module

    def _packed_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (_version_key(self.gate_up_proj), _version_key(self.down_proj))
        if self._packed is None or self._key != key:
            gate_up, down = self.gate_up_proj, self.down_proj
            self._packed = [(_pack(gate_up[e].T), _pack(down[e].T)) for e in range(len(gate_up))]
            self._key = key
        return self._packed

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not _uses_packed(x, self.gate_up_proj):
            return super().gate_up(e, x)
        return _packed_mm(x, self._packed_weights()[e][0])

    def down(self, e: int, a: torch.Tensor) -> torch.Tensor:
        if not _uses_packed(a, self.down_proj):
            return super().down(e, a)
        return _packed_mm(a, self._packed_weights()[e][1])


def prepare_cpu(model: nn.Module) -> int:
    """Swaps model's bf16 CPU nn.Linear modules (subclasses too) of at least
    MIN_PACKED_OUT_FEATURES outputs for PackedLinear and its bf16 CPU Experts for PackedExperts,
    in place, where packing_available(); the number swapped. Idempotent."""
    if not packing_available():
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear | PackedExperts):
                continue
            if (
                isinstance(child, nn.Linear)
                and child.out_features >= MIN_PACKED_OUT_FEATURES
                and _is_cpu_bf16(child.weight)
            ):
                setattr(parent, name, PackedLinear.from_linear(child))
            elif type(child) is Experts and _is_cpu_bf16(child.gate_up_proj):
                setattr(parent, name, PackedExperts.from_experts(child))
            else:
                continue
            swapped += 1
    return swapped


def _is_cpu_bf16(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def _median_us(fn: object, repeats: int = 7, calls: int = 5) -> float:
    fn()  # warm-up (packing, oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


@functools.cache
def cpu_auto_dtype() -> tuple[torch.dtype, str]:
    """The CPU's serving dtype and why: bfloat16 where the CPU has native bf16 dot products and a
    packed bf16 linear beats an fp32 one (256 -> 1024 at 16 rows, median of a few; a few ms),
    else float32. Decided once per process."""
    flag = fast_bf16_flag()
    if flag is None:
        return torch.float32, "float32: the CPU has no native bf16 (avx512_bf16 / amx_bf16)"
    if not packing_available():
        return torch.float32, f"float32: CPU has {flag}, but torch has no oneDNN packed linear"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=generator)
    w = torch.randn(1024, 256, generator=generator)
    xb, packed = x.bfloat16(), _pack(w.bfloat16())
    with torch.inference_mode():
        fp32 = _median_us(lambda: F.linear(x, w))
        bf16 = _median_us(lambda: _packed_mm(xb, packed))
    speedup = fp32 / bf16
    if speedup > 1.0:
        return torch.bfloat16, f"bfloat16: CPU has {flag}; bf16 matmul {speedup:.1f}x fp32"
    return torch.float32, f"float32: CPU has {flag}, but bf16 matmul only {speedup:.2f}x fp32"
