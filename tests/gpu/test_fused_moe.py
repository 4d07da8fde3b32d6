"""The fused MoE kernels (hip/fused_moe.hip) against the float32 torch reference, on a GPU.

Skipped without a GPU or without the built kernel library (the skip names which). Inputs are
random (never zeros): x and shared_out normal bf16; router logits a random permutation of
distinct bf16 values per token (no ties, so the routing is unambiguous); expert weights normal
bf16 scaled so outputs are O(1), or random fp8 bytes of every finite pattern with random
per-column scales. Shapes: Scout (H 5120, I 8192, E 16) and Maverick (E 128), plus a small odd
shape (column tiles cut short, more than 8 tokens per expert, top-3).

Reference: tests/oracles.py's moe_reference, the MoE module's computation in float32 from the same
bf16 (or dequantized fp8) weights. The kernels compute in fp32 too and round once to bf16
at the end, so an element may differ by the bf16 rounding of the output (2^-9 relative) and
fp32 summation order: tolerance 2^-8 * |ref| + 1e-3 * max |ref| per element. The torch path
(more than 64 tokens, bf16 matmuls with bf16 intermediates) is held to 2e-2 * max |ref| per
element and 1e-2 relative RMS.
"""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch
from oracles import moe_reference

from pyllama4 import fp8_format, kernels
from pyllama4.kernels import moe as moe_gpu
from pyllama4.layers.ffn import MoE

if not torch.cuda.is_available():
    pytest.skip("no GPU: torch.cuda.is_available() is False", allow_module_level=True)
if kernels.library() is None:
    pytest.skip(f"no GPU kernel library: {kernels.reason()}", allow_module_level=True)
if moe_gpu._functions() is None:
    pytest.skip("the kernel library predates the MoE kernels (rebuild it)", allow_module_level=True)

SHAPES = {"scout": (5120, 8192, 16), "maverick": (5120, 8192, 128), "small": (264, 136, 5)}
# The native fp8 format of the device is irrelevant here: the kernels decode both in software.
FP8_FORMATS = [fp8_format.E4M3FN, fp8_format.E4M3FNUZ]


def make_moe(shape: str, top_k: int = 1) -> MoE:
    """A bf16 MoE on the GPU (built on the meta device: Maverick's experts are 32 GB in bf16)."""
    hidden, inter, num_experts = SHAPES[shape]
    with torch.device("meta"):
        moe = MoE(hidden, inter, num_experts, top_k)
    moe = moe.to(torch.bfloat16).to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(len(shape))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            fan_in = p.shape[-2] if name.startswith("experts.") else p.shape[-1]
            p.normal_(0, fan_in**-0.5, generator=gen)
    return moe.eval()


@pytest.fixture(scope="module")
def moes() -> dict[str, MoE]:
    """One module per shape, built on first use and kept for the module's tests."""
    return {}


def get_moe(moes: dict[str, MoE], shape: str) -> MoE:
    if shape not in moes:
        moes[shape] = make_moe(shape)
    return moes[shape]


def random_fp8_experts(shape: str, fmt: int, seed: int = 0) -> moe_gpu.Fp8ExpertWeights:
    hidden, inter, num_experts = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def bits(*size: int) -> torch.Tensor:
        b = torch.randint(0, 256, size, dtype=torch.uint8, device="cuda", generator=gen)
        b[fp8_format.is_nan(b, fmt)] = 0x3C  # every finite pattern stays (1.5 * 2^(7 - bias))
        return b

    def scales(rows: int, *size: int) -> torch.Tensor:
        # |fp8| <= 448: scale so that a column's dot product with O(1) inputs is O(1).
        s = torch.rand(size, device="cuda", generator=gen) + 0.5
        return s / (100 * rows**0.5)

    return moe_gpu.Fp8ExpertWeights(
        bits(num_experts, hidden, 2 * inter),
        scales(hidden, num_experts, 2 * inter),
        bits(num_experts, inter, hidden),
        scales(inter, num_experts, hidden),
        fmt,
    )


def inputs(
    tokens: int, shape: str, seed: int = 0, hot_expert: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], router logits [T, E] (distinct per row: (permutation - E/2) / 16, exact in
    bf16; hot_expert: that expert on top for every token), shared_out [T, H]; bf16, nonzero."""
    hidden, _, num_experts = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    perm = torch.rand(tokens, num_experts, device="cuda", generator=gen).argsort(dim=1)
    logits = (perm.float() - num_experts // 2) / 16
    if hot_expert is not None:
        logits[:, hot_expert] = num_experts / 16
    shared = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    return x, logits.bfloat16(), shared


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, spread: float = 1e-3) -> None:
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.float() - ref).abs()
    bound = 2**-8 * ref.abs() + spread * ref.abs().max()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} (max |ref| {ref.abs().max().item():.3g})"


def assert_torch_path_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    err = out.float() - ref
    assert err.abs().max().item() <= 2e-2 * ref.abs().max().item()
    assert err.norm().item() <= 1e-2 * ref.norm().item()


# ---- Routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("shape", ["scout", "maverick", "small"])
@pytest.mark.parametrize("tokens", [1, 8, 64, 512, 4096])
def test_routing_is_exact(tokens, shape, top_k):
    num_experts = SHAPES[shape][2]
    if top_k > num_experts or tokens * top_k > 4096:
        pytest.skip("outside the routing kernel's limits")
    _, logits, _ = inputs(tokens, shape, seed=tokens + top_k)
    routing = moe_gpu.route_gpu(logits, top_k)
    top_logits, top_ids = torch.topk(logits.float(), top_k, dim=-1)
    assert torch.equal(routing.topk_ids.long(), top_ids)
    expected = torch.sigmoid(top_logits)
    torch.testing.assert_close(routing.scores, expected, rtol=1e-6, atol=0)
    assert torch.equal(routing.scores.bfloat16(), expected.bfloat16())
    flat = top_ids.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    assert torch.equal(routing.counts.long(), counts)
    assert routing.offsets[0].item() == 0
    assert torch.equal(routing.offsets[1:].long(), counts.cumsum(0))
    assert torch.equal(routing.order.long(), torch.argsort(flat, stable=True))


def test_routing_ties_and_nan():
    """Ties go to the lower expert index; a NaN logit ranks as -inf (and keeps its NaN score)."""
    logits = torch.tensor(
        [[1.0, 3.0, 3.0, -1.0], [float("nan"), -2.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]],
        device="cuda",
    ).bfloat16()
    routing = moe_gpu.route_gpu(logits, 2)
    assert routing.topk_ids.tolist() == [[1, 2], [2, 3], [0, 1]]
    routing = moe_gpu.route_gpu(logits, 4)
    assert routing.topk_ids[1].tolist() == [2, 3, 1, 0]
    assert torch.isnan(routing.scores[1, 3]).item()


# ---- The expert kernels ----------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("shape", ["scout", "maverick"])
def test_bf16_experts_match_the_reference(moes, shape, tokens, top_k):
    experts = get_moe(moes, shape).experts
    x, logits, shared = inputs(tokens, shape, seed=tokens)
    out = moe_gpu.fused_moe_gpu(x, logits, experts, top_k, shared)
    assert_kernel_close(out, moe_reference(x, logits, experts, top_k, shared))


@pytest.mark.parametrize(("tokens", "top_k"), [(1, 1), (3, 3), (13, 2), (64, 3), (64, 5)])
def test_small_odd_shape_matches_the_reference(moes, tokens, top_k):
    """H 264 and 2I 272 cut the 1024-column tiles short; with 5 experts most get more than 8
    pairs (several work items each); top-k up to 5; 3 tokens use the 4-token kernels."""
    experts = get_moe(moes, "small").experts
    x, logits, shared = inputs(tokens, "small", seed=tokens)
    out = moe_gpu.fused_moe_gpu(x, logits, experts, top_k, shared)
    assert_kernel_close(out, moe_reference(x, logits, experts, top_k, shared))


@pytest.mark.parametrize("shape", ["scout", "small"])
def test_every_token_on_one_expert(moes, shape):
    """64 tokens on one expert: 8 work items share its weights; the rest get one pair each."""
    experts = get_moe(moes, shape).experts
    x, logits, shared = inputs(64, shape, hot_expert=3)
    out = moe_gpu.fused_moe_gpu(x, logits, experts, 2, shared)
    assert_kernel_close(out, moe_reference(x, logits, experts, 2, shared))


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=fp8_format.NAMES.get)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("shape", ["scout", "small"])
def test_fp8_experts_match_the_dequantized_reference(shape, tokens, top_k, fmt):
    experts = random_fp8_experts(shape, fmt, seed=fmt)
    x, logits, shared = inputs(tokens, shape, seed=tokens)
    out = moe_gpu.fused_moe_gpu(x, logits, experts, top_k, shared)
    ref = moe_reference(x, logits, experts, top_k, shared)
    assert_kernel_close(out, ref)


@pytest.mark.parametrize("ub", [None, 1200.0, 0.5])
@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=fp8_format.NAMES.get)
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_w8a8_experts_match_the_reference(tokens, fmt, ub):
    """W8A8 (Fp8Experts' default, per-row activation quantization inside the kernels) at Scout's
    shape against moe_reference's W8A8 computation; shared_out zero so the tolerance is relative
    to the routed experts; spread 6e-3 as tests/test_kernels_emulated.py (a flipped rounding of
    one intermediate value)."""
    experts = dataclasses.replace(
        random_fp8_experts("scout", fmt, seed=fmt), quantize_input=True, activation_scale_ub=ub
    )
    x, logits, shared = inputs(tokens, "scout", seed=tokens)
    shared = torch.zeros_like(shared)
    out = moe_gpu.fused_moe_gpu(x, logits, experts, 1, shared)
    ref = moe_reference(x, logits, experts, 1, shared)
    assert_kernel_close(out, ref, spread=6e-3)


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=fp8_format.NAMES.get)
def test_fp8_dequantization_agrees_with_torch(fmt):
    """The reference's dequantization (fp8_format.decode) is torch's own float8 conversion."""
    experts = random_fp8_experts("small", fmt)
    gate_up, down = experts.dequantized(1)
    dtype = fp8_format.torch_dtype(fmt)
    torch.testing.assert_close(
        gate_up, experts.gate_up[1].view(dtype).float() * experts.gate_up_scale[1], rtol=0, atol=0
    )
    torch.testing.assert_close(
        down, experts.down[1].view(dtype).float() * experts.down_scale[1], rtol=0, atol=0
    )


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=fp8_format.NAMES.get)
def test_fp8_nan_weights_give_nan_outputs(fmt):
    """A NaN byte in an expert's gate column makes its tokens' whole output NaN; one in a down
    column makes that column NaN; other tokens stay finite (as the reference)."""
    experts = random_fp8_experts("small", fmt)
    nan_byte = 0x7F if fmt == fp8_format.E4M3FN else 0x80
    experts.gate_up[2, 17, 5] = nan_byte
    experts.down[4, 3, 100] = nan_byte
    x, logits, shared = inputs(20, "small", seed=5)
    out = moe_gpu.fused_moe_gpu(x, logits, experts, 1, shared)
    ref = moe_reference(x, logits, experts, 1, shared)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    routed = logits.float().argmax(dim=1)
    assert torch.isnan(out[routed == 2]).all() and (routed == 2).any()
    assert torch.isnan(out[routed == 4][:, 100]).all() and (routed == 4).any()
    finite = ~torch.isnan(ref)
    assert_kernel_close(out.where(finite, 0), ref.where(finite, 0))


# ---- Through MoE.forward (the dispatch) ------------------------------------------------------


def untied_rows(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th largest logits differ (the routing is unambiguous)."""
    top = torch.topk(logits.float(), top_k + 1, dim=-1).values
    return top[:, top_k - 1] != top[:, top_k]


@pytest.mark.parametrize("tokens", [1, 8, 64, 512, 4096])
@pytest.mark.parametrize("shape", ["scout", "maverick"])
def test_moe_forward_dispatch(moes, shape, tokens):
    """MoE.forward: the kernels up to 64 tokens, the torch path above (checked by which of them
    runs); both against the reference on the module's router logits and shared expert (rows
    with tied router logits, where the choice is the implementation's, are left out)."""
    moe = get_moe(moes, shape)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, SHAPES[shape][0], device="cuda", generator=gen).bfloat16()
    uses_kernel = tokens <= moe_gpu.MAX_TOKENS
    assert moe_gpu.dispatches(x, moe.experts, moe.top_k) == uses_kernel
    with torch.no_grad():
        out = moe(x)
        logits, shared = moe.router(x), moe.shared_expert(x)
    ref = moe_reference(x, logits, moe.experts, moe.top_k, shared)
    keep = untied_rows(logits, moe.top_k)
    assert keep.float().mean().item() > 0.5
    (assert_kernel_close if uses_kernel else assert_torch_path_close)(out[keep], ref[keep])


def test_repeated_calls_and_graph_capture(moes):
    """The workspace is re-zeroed on every call (a second call gives the same output), and the
    launches replay from a CUDA graph with new inputs."""
    experts = get_moe(moes, "scout").experts
    x, logits, shared = inputs(8, "scout", seed=1)
    first = moe_gpu.fused_moe_gpu(x, logits, experts, 1, shared)
    second = moe_gpu.fused_moe_gpu(x, logits, experts, 1, shared)
    assert_kernel_close(second, first.float())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_gpu.fused_moe_gpu(x, logits, experts, 1, shared)
    new_x, new_logits, new_shared = inputs(8, "scout", seed=2)
    for tensor, new in ((x, new_x), (logits, new_logits), (shared, new_shared)):
        tensor.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert_kernel_close(captured, moe_reference(x, logits, experts, 1, shared))


def test_bad_arguments_are_refused_with_a_message():
    lib = kernels.library()
    experts_fn = moe_gpu._functions()[2]
    route_fn = moe_gpu._functions()[1]
    p = ctypes.c_void_p(16)  # never dereferenced: the checks come before any launch
    assert route_fn(p, 4, 16, 9, p, p, p, p, p, p, 1 << 20, None) != 0
    assert lib.pyllama4_last_error().startswith(b"moe_route: top_k")
    args = [p] * 9 + [0, 4, 16, 1, 5120, 8196, 1, 1, p, 1 << 30, None]
    assert experts_fn(*args) != 0
    assert b"multiples of 8" in lib.pyllama4_last_error()
    args[9] = 3  # weight format
    assert experts_fn(*args) != 0
    assert b"weight_format" in lib.pyllama4_last_error()
