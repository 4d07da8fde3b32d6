"""GPU fused MoE (hip/fused_moe.hip) behind the torch reference's interface.

Invariant: `fused_moe_gpu(x, router_logits, experts, top_k, shared_out)` gives what
pyllama4.layers.ffn.MoE gives for those router logits and that shared-expert output (top-k,
score = sigmoid of the selected logit in fp32 cast to bf16, the score scaling the expert INPUT,
SwiGLU experts, summed onto the shared expert), computed in fp32 from the same weights and
rounded to bf16 once at the end (tests/gpu/test_fused_moe.py compares it with
tests/oracles.py's `moe_reference`, that computation in torch). It enqueues on the current
stream and never synchronises.

Scope: small batches (at most MAX_TOKENS = 64 rows: decode), where the kernels read each
touched expert's weights once for up to 8 of its tokens. Larger batches (prefill) stay on the
torch path of MoE.forward (per-expert matmuls on the tokens sorted by expert, vendor BLAS): with
no GPU to measure on, the GEMV kernels are not assumed faster there. The shared expert is always
torch's (dense); overlapping it with the routed experts is the runtime's job.

Expert weights are bf16 (the `Experts` module's parameters) or fp8 (`Fp8ExpertWeights`: raw
bytes, per-output-column scales and the format code, pyllama4.fp8_format), both in the
checkpoint's input-major layout.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pyllama4 import fp8_format
from pyllama4.kernels import check, declare, library
from pyllama4.kernels import workspace as scratch

MAX_TOKENS = 64  # the most rows MoE.forward sends to the kernels; more take the torch path
MAX_EXPERTS = 1024  # hip/fused_moe.hip kMaxExperts
MAX_TOP_K = 8  # kMaxTopK
MAX_DIM = 1 << 20  # kMaxDim: hidden and intermediate
TILE_COLS = 1024  # kTileCols: output columns per block of the expert GEMVs
BLOCKS_PER_UNIT = 2  # row splits aim at this many GEMV blocks per multiprocessor / CU
MIN_SPLIT_ROWS = 64  # ... with no split shorter than this many input rows

_c = ctypes
_ROUTE = [_c.c_void_p, _c.c_int32, _c.c_int32, _c.c_int32] + [_c.c_void_p] * 6
_ROUTE += [_c.c_int64, _c.c_void_p]
_EXPERTS = [_c.c_void_p] * 9 + [_c.c_int32] * 2 + [_c.c_float] + [_c.c_int32] * 7
_EXPERTS += [_c.c_void_p, _c.c_int64, _c.c_void_p]
_WORKSPACE = [_c.c_int32] * 5


class Experts(Protocol):
    """What the kernels read of bf16 routed experts (pyllama4.layers.ffn.Experts): gate_up_proj
    [E, H, 2I] and down_proj [E, I, H], input-major."""

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor


@dataclass(frozen=True)
class Fp8ExpertWeights:
    """Routed experts in fp8: raw bits plus fp32 scales per output column, W = fp8 * scale.

    Input-major like `Experts`: gate_up [E, H, 2I] uint8 (gate columns, then up), down
    [E, I, H] uint8, gate_up_scale [E, 2I] and down_scale [E, H] float32; `format` is
    fp8_format.E4M3FN or fp8_format.E4M3FNUZ. A checkpoint stored per expert in nn.Linear layout
    ([out, in]) is transposed into this layout once, at load. quantize_input=False: weight-only
    (W8A16), the bf16 activations multiply the dequantized weights. True (W8A8, Fp8Experts'
    default): each expert's input rows are quantized per row into the weights' format first, amax
    clamped to activation_scale_ub (None: no upper clamp), as
    pyllama4.quant.fp8.quantize_activation.
    """

    gate_up: torch.Tensor
    gate_up_scale: torch.Tensor
    down: torch.Tensor
    down_scale: torch.Tensor
    format: int
    quantize_input: bool = False
    activation_scale_ub: float | None = None

    def __post_init__(self) -> None:
        if self.format not in (fp8_format.E4M3FN, fp8_format.E4M3FNUZ):
            raise ValueError(
                f"Fp8ExpertWeights: format must be E4M3FN or E4M3FNUZ, not {self.format}"
            )
        for name in ("gate_up", "down"):
            if getattr(self, name).dtype != torch.uint8:
                raise TypeError(f"Fp8ExpertWeights.{name} must hold raw uint8 bits")
        for name in ("gate_up_scale", "down_scale"):
            if getattr(self, name).dtype != torch.float32:
                raise TypeError(f"Fp8ExpertWeights.{name} must be float32")
        e, h, i2 = self.gate_up.shape
        expected = {
            "down": (e, i2 // 2, h),
            "gate_up_scale": (e, i2),
            "down_scale": (e, h),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape or i2 % 2:
                raise ValueError(
                    f"Fp8ExpertWeights.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {shape} for gate_up {tuple(self.gate_up.shape)}"
                )

    @classmethod
    def from_float8(
        cls,
        gate_up: torch.Tensor,
        gate_up_scale: torch.Tensor,
        down: torch.Tensor,
        down_scale: torch.Tensor,
        *,
        quantize_input: bool = False,
        activation_scale_ub: float | None = None,
    ) -> Fp8ExpertWeights:
        """From torch float8 tensors (float8_e4m3fn or float8_e4m3fnuz, both the same) in this
        layout, e.g. pyllama4.layers.fp8.Fp8Experts' parameters; the bytes are viewed, not
        copied."""
        if down.dtype != gate_up.dtype:
            raise TypeError(f"gate_up is {gate_up.dtype} but down is {down.dtype}")
        fmt = fp8_format.format_of_dtype(gate_up.dtype)
        return cls(
            gate_up.view(torch.uint8),
            gate_up_scale,
            down.view(torch.uint8),
            down_scale,
            fmt,
            quantize_input,
            activation_scale_ub,
        )

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def dequantized(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's float32 weights (gate_up [H, 2I], down [I, H]), by fp8_format.dequantize."""
        return (
            fp8_format.dequantize(self.gate_up[e], self.gate_up_scale[e], self.format),
            fp8_format.dequantize(self.down[e], self.down_scale[e], self.format),
        )


@dataclass(frozen=True)
class Routing:
    """pyllama4_moe_route's outputs; pair p is token p // k's (p % k)-th choice."""

    topk_ids: torch.Tensor  # [T, k] int32, descending logits (ties: lower expert first)
    scores: torch.Tensor  # [T, k] float32 sigmoid of the selected logits
    counts: torch.Tensor  # [E] int32 pairs per expert
    offsets: torch.Tensor  # [E + 1] int32 exclusive prefix sum of counts
    order: torch.Tensor  # [T * k] int32 pairs sorted by expert, stably


def _fn(lib: ctypes.CDLL, name: str, argtypes: list[Any], restype: Any = _c.c_int) -> Any:
    fn = getattr(lib, name)
    return fn if fn.argtypes is not None else declare(lib, name, argtypes, restype)


def launchers(lib: ctypes.CDLL) -> tuple[Any, Any, Any]:
    """(workspace_bytes, route, experts): lib's MoE functions, their C signatures declared."""
    return (
        _fn(lib, "pyllama4_moe_workspace_bytes", _WORKSPACE, _c.c_int64),
        _fn(lib, "pyllama4_moe_route", _ROUTE),
        _fn(lib, "pyllama4_moe_experts", _EXPERTS),
    )


def _functions() -> tuple[Any, Any, Any] | None:
    """launchers() of the loaded library, or None (no library, or one built before the MoE
    kernels)."""
    lib = library()
    if lib is None or not hasattr(lib, "pyllama4_moe_experts"):
        return None
    return launchers(lib)


def _weights(
    experts: Experts | Fp8ExpertWeights,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, int]:
    """(gate_up, gate_up_scale, down, down_scale, format) as the kernel reads them."""
    if isinstance(experts, Fp8ExpertWeights):
        return (
            experts.gate_up,
            experts.gate_up_scale,
            experts.down,
            experts.down_scale,
            experts.format,
        )
    return experts.gate_up_proj, None, experts.down_proj, None, fp8_format.BF16


def usable(experts: Experts | Fp8ExpertWeights) -> bool:
    """The kernels run these experts: a loaded kernel library with the MoE launchers, weights on
    the GPU (bf16 for `Experts`, i.e. a bf16 model; fp8 for `Fp8ExpertWeights`), contiguous, with
    hidden and intermediate sizes the kernels take."""
    if _functions() is None:
        return False
    gate_up, gate_up_scale, down, down_scale, fmt = _weights(experts)
    tensors = [gate_up, down] + [s for s in (gate_up_scale, down_scale) if s is not None]
    if not all(t.is_cuda and t.is_contiguous() for t in tensors):
        return False
    if fmt == fp8_format.BF16 and (gate_up.dtype != torch.bfloat16 or down.dtype != torch.bfloat16):
        return False
    num_experts, hidden, two_inter = gate_up.shape
    inter = two_inter // 2
    return (
        num_experts <= MAX_EXPERTS
        and all(8 <= d <= MAX_DIM and d % 8 == 0 for d in (hidden, inter))
        and gate_up.data_ptr() % 16 == 0
        and down.data_ptr() % 16 == 0
    )


def dispatches(x: torch.Tensor, experts: Experts | Fp8ExpertWeights, top_k: int) -> bool:
    """MoE.forward sends x [N, H] to the kernels: bf16 on the GPU, 1 <= N <= MAX_TOKENS, and
    usable experts."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and x.dim() == 2
        and 1 <= x.shape[0] <= MAX_TOKENS
        and 1 <= top_k <= MAX_TOP_K
        and usable(experts)
    )


@functools.cache
def _units(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(rows: int, cols: int, slots: int, device: torch.device) -> int:
    """Row splits of a GEMV over [rows, cols] weights for `slots` experts at most: about
    BLOCKS_PER_UNIT blocks per multiprocessor, no split under MIN_SPLIT_ROWS rows."""
    units = _units(device.index if device.index is not None else torch.cuda.current_device())
    tiles = -(-cols // TILE_COLS)
    want = -(-BLOCKS_PER_UNIT * units // (tiles * max(slots, 1)))
    return max(1, min(want, rows // MIN_SPLIT_ROWS))


def _workspace_for(device: torch.device, nbytes: int) -> torch.Tensor:
    return scratch("fused_moe", device, nbytes, torch.uint8)


def _route(
    router_logits: torch.Tensor, top_k: int, workspace: torch.Tensor, fns: tuple[Any, Any, Any]
) -> Routing:
    tokens, num_experts = router_logits.shape
    pairs = tokens * top_k
    logits = router_logits.contiguous()
    if logits.dtype != torch.bfloat16:
        raise TypeError(f"router logits must be bf16, not {logits.dtype}")
    buf = torch.empty(3 * pairs + 2 * num_experts + 1, dtype=torch.int32, device=logits.device)
    ids, scores = buf[:pairs], buf[pairs : 2 * pairs].view(torch.float32)
    order = buf[2 * pairs : 3 * pairs]
    counts = buf[3 * pairs : 3 * pairs + num_experts]
    offsets = buf[3 * pairs + num_experts :]
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    check(
        fns[1](
            logits.data_ptr(),
            tokens,
            num_experts,
            top_k,
            ids.data_ptr(),
            scores.data_ptr(),
            counts.data_ptr(),
            offsets.data_ptr(),
            order.data_ptr(),
            workspace.data_ptr(),
            workspace.numel(),
            stream,
        )
    )
    return Routing(ids.view(tokens, top_k), scores.view(tokens, top_k), counts, offsets, order)


def route_gpu(router_logits: torch.Tensor, top_k: int) -> Routing:
    """Routing of router_logits [T, E] bf16 on the GPU (what fused_moe_gpu does first)."""
    fns = _functions()
    assert fns is not None, "route_gpu called without the kernel library"
    tokens, num_experts = router_logits.shape
    nbytes = fns[0](tokens, top_k, num_experts, 0, 0)
    return _route(router_logits, top_k, _workspace_for(router_logits.device, nbytes), fns)


def fused_moe_gpu(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    experts: Experts | Fp8ExpertWeights,
    top_k: int,
    shared_out: torch.Tensor,
) -> torch.Tensor:
    """x [T, H] bf16, router_logits [T, E] bf16, shared_out [T, H] bf16 (the shared expert of
    x) -> [T, H] bf16: shared_out plus the routed experts."""
    fns = _functions()
    assert fns is not None, "fused_moe_gpu called without the kernel library"
    gate_up = _weights(experts)[0]
    tokens, hidden = x.shape
    num_experts, _, two_inter = gate_up.shape
    inter = two_inter // 2
    if router_logits.shape != (tokens, num_experts) or shared_out.shape != x.shape:
        raise ValueError(
            f"fused_moe_gpu: x {tuple(x.shape)}, router_logits {tuple(router_logits.shape)}, "
            f"shared_out {tuple(shared_out.shape)} for {num_experts} experts"
        )
    x = x.contiguous()
    shared_out = shared_out.contiguous()
    nbytes = fns[0](tokens, top_k, num_experts, hidden, inter)
    workspace = _workspace_for(x.device, nbytes)
    routing = _route(router_logits, top_k, workspace, fns)
    slots = min(num_experts, tokens * top_k)  # the most experts a step can touch
    splits = (
        split_plan(hidden, 2 * inter, slots, x.device),
        split_plan(inter, hidden, slots, x.device),
    )
    out = torch.empty_like(x)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    args = experts_arguments(out, x, shared_out, routing, experts, top_k, splits, workspace)
    check(fns[2](*args, stream))
    return out


def experts_arguments(
    out: torch.Tensor,
    x: torch.Tensor,
    shared_out: torch.Tensor,
    routing: Routing,
    experts: Experts | Fp8ExpertWeights,
    top_k: int,
    splits: tuple[int, int],
    workspace: torch.Tensor,
) -> tuple[Any, ...]:
    """pyllama4_moe_experts' arguments but the stream, for these tensors (contiguous, on the
    kernels' device) and (gate_up, down) row splits."""
    gate_up, gate_up_scale, down, down_scale, fmt = _weights(experts)
    quantize = isinstance(experts, Fp8ExpertWeights) and experts.quantize_input
    ub = experts.activation_scale_ub if quantize else None
    tokens, hidden = x.shape
    return (
        out.data_ptr(),
        x.data_ptr(),
        shared_out.data_ptr(),
        routing.scores.data_ptr(),
        routing.order.data_ptr(),
        gate_up.data_ptr(),
        0 if gate_up_scale is None else gate_up_scale.data_ptr(),
        down.data_ptr(),
        0 if down_scale is None else down_scale.data_ptr(),
        fmt,
        int(quantize),
        0.0 if ub is None else float(ub),
        tokens,
        gate_up.shape[0],
        top_k,
        hidden,
        gate_up.shape[2] // 2,
        splits[0],
        splits[1],
        workspace.data_ptr(),
        workspace.numel(),
    )
