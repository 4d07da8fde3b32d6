"""The paged attention kernel (hip/paged_attention.hip) against the fp32 reference, on a GPU.

Skipped without a GPU or without the built kernel library (the skip names which). Inputs are
random normal bf16 (never zeros); the kernel reads bf16 and accumulates in fp32, so its output
differs from the fp32 reference by bf16 rounding of the output (|out| <= ~3 here): tolerance
2e-2 absolute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu.paged_cases import decode_case, reference

from pyllama4 import kernels
from pyllama4.kernels import attention as gpu

if not torch.cuda.is_available():
    pytest.skip("no GPU: torch.cuda.is_available() is False", allow_module_level=True)
if kernels.library() is None:
    pytest.skip(f"no GPU kernel library: {kernels.reason()}", allow_module_level=True)

TOL = 2e-2
SCALE = 128**-0.5


def run(case) -> torch.Tensor:
    tokens = gpu.kernel_tokens(
        case.rows,
        case.query_start,
        case.seq_lens,
        case.positions,
        case.chunk,
        (0, len(case.seq_lens)),
        case.k_cache.shape[1],
    )
    return gpu.paged_attention_gpu(
        case.q, case.k_cache, case.v_cache, case.table, tokens, case.page_size, case.chunk, SCALE
    )


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("chunk", [None, 8192])
@pytest.mark.parametrize(
    "contexts",
    [[1], [1000], [1, 17, 300, 4096, 9000], [131072], [32768] * 4, list(range(1, 4097, 64))],
    ids=["1", "1k", "mixed", "128k", "4x32k", "batch64"],
)
def test_decode_matches_the_reference(contexts, chunk, page_size):
    case = decode_case(contexts, page_size=page_size, chunk=chunk, seed=len(contexts))
    out = run(case)
    torch.cuda.synchronize()
    assert (out.float() - reference(case, SCALE)).abs().max().item() <= TOL


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"), [(40, 8, 128), (32, 8, 64), (8, 8, 256)]
)
def test_other_head_layouts(q_heads, kv_heads, head_dim):
    case = decode_case([5, 700, 2500], q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)
    out = run(case)
    assert (out.float() - reference(case, SCALE)).abs().max().item() <= TOL


def test_bad_arguments_are_refused_with_a_message():
    case = decode_case([10], head_dim=128)
    q = case.q[:, :7]  # 7 query heads over 8 kv heads
    tokens = gpu.kernel_tokens(
        case.rows, np.arange(2, dtype=np.int32), np.array([10]), case.positions, None, (0, 1), 8
    )
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        gpu.paged_attention_gpu(
            q.contiguous(), case.k_cache, case.v_cache, case.table, tokens, 16, None, SCALE
        )


def test_the_model_gives_the_same_logits_with_and_without_the_kernel(monkeypatch):
    """A small Llama 4 with head_dim 128 (the kernel's shape; chunk 64, so both global and
    chunk-local layers decode across chunk boundaries), bf16 on the GPU: decode logits with the
    kernel equal the SDPA path's within bf16 tolerance (the same tokens are fed to both)."""
    from transformers import Llama4ForCausalLM as HFLlama4
    from transformers import Llama4TextConfig

    from pyllama4.config import TextConfig
    from pyllama4.model.llama4 import Llama4ForCausalLM
    from pyllama4.runner import ModelRunner

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=256,
        intermediate_size_mlp=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        num_local_experts=4,
        interleave_moe_layer_step=2,
        attention_chunk_size=64,
        max_position_embeddings=1024,
    )
    state = HFLlama4(cfg).state_dict()
    model = Llama4ForCausalLM(TextConfig.from_dict(cfg.to_dict()))
    model.load_state_dict(state, strict=False)
    model = model.to("cuda", torch.bfloat16).eval()

    def decode_logits() -> torch.Tensor:
        runner = ModelRunner(model, context_len=512, kv_tokens=4096, page_size=16)
        sched = runner.new_scheduler()
        for i in range(4):
            sched.add_request(i, np.arange(10 + 37 * i, dtype=np.int32) % 500, max_new_tokens=40)
        rows = []
        while sched.has_work():
            plan = sched.schedule()
            logits = runner.forward(plan)
            if plan.num_decodes == plan.num_requests:
                rows.append(logits.float())
            sched.commit(np.full(plan.num_samples, 7, dtype=np.int32))
        return torch.cat(rows)

    with_kernel = decode_logits()
    monkeypatch.setattr(gpu, "usable", lambda k_cache: False)
    without = decode_logits()
    assert with_kernel.shape == without.shape
    assert (with_kernel - without).abs().max().item() <= 5e-2
