// pyllama4_kernels.h: the C ABI of libpyllama4_kernels (hip/), called from Python with ctypes.
//
// Every launcher takes raw device pointers, sizes and a stream (hipStream_t / cudaStream_t as
// void*), enqueues its kernels on that stream and returns at once: 0 on success, else a nonzero
// code with pyllama4_last_error() describing it (bad arguments are refused before any launch).
// The library does not link against torch; it works with ROCm and CUDA builds of torch alike
// and inside graph capture (no allocation, no synchronisation).
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

// The ABI version: Python refuses a library whose version differs from what it was written for.
int32_t pyllama4_abi_version(void);
// The message of the last failed call on this thread ("" if none).
const char* pyllama4_last_error(void);
// "hip" or "cuda": the runtime the library was built for (the loader refuses a mismatch).
const char* pyllama4_platform(void);

// Attention of T query tokens over the paged KV cache of one layer (bf16 in and out, fp32
// accumulation). Query token t (head h, GQA: kv head h / (num_q_heads / num_kv_heads)) attends to
// its request's keys at positions [start_t, positions[t]], start_t = 0 when chunk_size == 0 and
// floor(positions[t] / chunk_size) * chunk_size otherwise. Key position j of token t lives at
// slot page * page_size + j % page_size of k_cache / v_cache ([slots, num_kv_heads, head_dim]),
// page = block_table[token_rows[t] * table_width + col], col = j / page_size, or
// (j / page_size) % table_width when chunk_size != 0 (the chunk-local ring table).
// Split-K: keys are cut into num_splits ranges of split_len positions from start_t (split_len
// 0: each token's own keys cut evenly, ceil(keys_t / num_splits) each, as a captured graph
// needs); partial
// results go to workspace (num_tokens * num_q_heads * num_splits * (head_dim + 2) floats) and a
// second kernel combines them into out. head_dim must be a multiple of the warp width (32 or 64
// lanes) and at most 256; num_q_heads / num_kv_heads at most 8; num_tokens at most 65535 (a
// grid dimension).
int pyllama4_paged_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                             const int64_t* block_table, int32_t table_width,
                             const int64_t* token_rows, const int64_t* positions,
                             int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
                             int32_t head_dim, int32_t page_size, int32_t chunk_size, float scale,
                             float* workspace, int32_t num_splits, int32_t split_len,
                             void* stream);

// ---- Fused MoE (fused_moe.hip): Llama 4 routing and the routed experts of small batches ----
// The reference is pyllama4.layers.ffn.MoE: top-k router logits per token, score = sigmoid of
// the selected logit in fp32 (cast to bf16 where it scales), the score multiplies the expert's
// INPUT (x_scaled = bf16(x * score)), expert = (silu(x_scaled @ G) * (x_scaled @ U)) @ D, out =
// shared expert output + the sum of the token's routed experts. The shared expert is NOT computed
// here: the caller computes it (torch, dense) and passes its output in.
// A pair p = (token p / top_k, rank p % top_k) is one token's i-th choice (i < top_k).
// Both launchers share one workspace (pyllama4_moe_workspace_bytes, 16-byte aligned): route
// writes the per-expert work list there, experts reads it and keeps its fp32 accumulators there.
// Limits: 1 <= num_experts <= 1024, 1 <= top_k <= min(8, num_experts), num_tokens * top_k <=
// 4096.

// Workspace bytes for these sizes (hidden = intermediate = 0: what pyllama4_moe_route alone
// needs); 0 for sizes that are not positive.
int64_t pyllama4_moe_workspace_bytes(int32_t num_tokens, int32_t top_k, int32_t num_experts,
                                     int32_t hidden, int32_t intermediate);

// Routing of num_tokens tokens, one launch: router_logits [T, E] bf16 (row-major) ->
//   topk_ids [T * k] int32: pair p's expert, per token in descending logit order (ties: the
//     lower expert index first; NaN logits rank as -inf);
//   topk_scores [T * k] fp32: sigmoid of pair p's logit, 1 / (1 + exp(-logit)) in fp32;
//   expert_counts [E] int32: pairs per expert; expert_offsets [E + 1] int32: their exclusive
//     prefix sum (offsets[E] = T * k);
//   sorted_pairs [T * k] int32: the pairs ordered by expert, stably (pair order within an
//     expert), i.e. torch.argsort(topk_ids, stable=True);
//   and the experts' work list in workspace (workspace_bytes >= the route-only size).
int pyllama4_moe_route(const void* router_logits, int32_t num_tokens, int32_t num_experts,
                       int32_t top_k, int32_t* topk_ids, float* topk_scores,
                       int32_t* expert_counts, int32_t* expert_offsets, int32_t* sorted_pairs,
                       void* workspace, int64_t workspace_bytes, void* stream);

// The routed experts of the pairs that pyllama4_moe_route (same stream, same workspace, same
// num_tokens, num_experts, top_k) wrote, plus shared_out:
//   out [T, H] bf16 = bf16(shared_out + sum over pairs p of token t of
//                          (silu(xs_p @ G_e) * (xs_p @ U_e)) @ D_e),
//   xs_p = bf16(x[t] * bf16(topk_scores[p])), e = the pair's expert, computed in fp32.
// x, shared_out, out: [T, H] bf16 row-major (out may be shared_out). Weights stay in the
// checkpoint's input-major layout (no re-layout): gate_up [E, H, 2I] (columns: gate, then up),
// down [E, I, H], either bf16 (weight_format 0) or fp8 raw bytes (1: e4m3fn, 2: e4m3fnuz) with
// per-output-column fp32 scales gate_up_scale [E, 2I] and down_scale [E, H] (W = fp8 * scale;
// null for bf16). H and I: multiples of 8, at most 2^20; weights 16-byte (bf16) or 8-byte (fp8)
// aligned. gate_up_splits / down_splits cut the H / I input rows of each GEMV into that many
// slices run by separate blocks (1 <= splits <= rows; more splits: more blocks, more fp32
// atomics); the caller sizes them to fill the device. Meant for small batches (decode): each
// expert's weights are read once for up to 8 of its tokens; prefill is better served by
// grouped GEMMs. Four launches; fp32 atomics make the summation order vary between runs.
// quantize_input != 0 (fp8 weights only; W8A8, pyllama4.quant.fp8.Fp8Experts): each GEMV's
// input row (xs_p; then a_p = bf16(bf16(up) * bf16(silu(bf16(gate)))), the reference's bf16
// SwiGLU) is quantized per pair into the weights' format, scale = clamp(max |row|, 1e-12, ub) /
// fmax (activation_scale_ub <= 0: no upper clamp), and the GEMV takes fp8(row / scale) * scale;
// two more launches.
int pyllama4_moe_experts(void* out, const void* x, const void* shared_out,
                         const float* topk_scores, const int32_t* sorted_pairs,
                         const void* gate_up, const float* gate_up_scale, const void* down,
                         const float* down_scale, int32_t weight_format,
                         int32_t quantize_input, float activation_scale_ub, int32_t num_tokens,
                         int32_t num_experts, int32_t top_k, int32_t hidden,
                         int32_t intermediate, int32_t gate_up_splits, int32_t down_splits,
                         void* workspace, int64_t workspace_bytes, void* stream);

// ---- FP8 linear (fp8_gemm.hip): Fp8Linear for decode (a few tokens) ------------------------
// The reference is pyllama4.quant.fp8 (Fp8Linear, _scaled_mm, quantize_activation):
//   y [T, out] bf16 = bf16(fp32(x_q . W_q^T) * x_scale[t] * w_scale[o]),
// x [T, in] bf16 row-major, weight [out, in] fp8 raw bytes (nn.Linear layout; weight_format 1:
// e4m3fn, 2: e4m3fnuz), weight_scale [out] fp32. quantize_input != 0: x is quantized per token
// into the weight's format, x_scale[t] = clamp(max |x[t]|, 1e-12, ub) / fmax (fmax 448 or 240;
// activation_scale_ub <= 0: no upper clamp), x_q = fp8(clamp(x / x_scale, -fmax, fmax)) rounded
// to nearest even (bytes and scales written to workspace); quantize_input == 0 (weight-only):
// x_q = x, x_scale = 1. Sums in fp32 (order differs from the reference's exact sum).
// Limits: 1 <= num_tokens <= 16, in_features a positive multiple of 16; x and weight 16-byte
// aligned, workspace 16-byte aligned (only read with quantize_input). Two launches at most.

// Workspace bytes of pyllama4_fp8_linear (scales at 0, bytes [T, in] at 256); 0 for sizes that
// are not positive.
int64_t pyllama4_fp8_linear_workspace_bytes(int32_t num_tokens, int32_t in_features);

// The per-token activation quantization alone (what pyllama4_fp8_linear runs first):
// x [T, in] bf16 -> x_q [T, in] fp8 bytes, x_scale [T] fp32, as described above. num_tokens >= 1
// (no upper limit), in_features a positive multiple of 16; x 16-byte aligned, x_q 8-byte.
int pyllama4_fp8_quantize_per_token(void* x_q, float* x_scale, const void* x,
                                    int32_t weight_format, int32_t num_tokens,
                                    int32_t in_features, float activation_scale_ub,
                                    void* stream);

int pyllama4_fp8_linear(void* y, const void* x, const void* weight, const float* weight_scale,
                        int32_t weight_format, int32_t num_tokens, int32_t in_features,
                        int32_t out_features, float activation_scale_ub, int32_t quantize_input,
                        void* workspace, int64_t workspace_bytes, void* stream);

// ---- Fused small ops of a decode step (fused_ops.hip) -------------------------------------------
// Each equals its bf16 torch reference with every intermediate bf16 rounding at the same point;
// only fp32 details the reference leaves open may differ (the summation order of a norm's
// squares; the device's cosf / sinf / expf), which moves a result by 1 bf16 ulp at most, rarely.
// One launch each; no workspace.

// Residual add + RMSNorm (pyllama4.layers.norm.RMSNorm on the bf16 sum), per token t:
//   residual != null: residual[t] <- s = bf16(residual[t] + x[t]);  residual == null: s = x[t];
//   out[t, i] = bf16(bf16(s_i / sqrt(sum_j s_j^2 / hidden + eps)) * weight[i]), statistics fp32.
// x, residual, out: [T, hidden] bf16 row-major; weight [hidden] bf16. out may be x, not residual
// (refused). num_tokens, hidden >= 1.
int pyllama4_add_rms_norm(void* out, void* residual, const void* x, const void* weight,
                          int32_t num_tokens, int32_t hidden, float eps, void* stream);

// One attention layer's q and k after projection, as pyllama4.model.llama4.Attention.forward
// computes them, and the KV cache write of pyllama4.layers.attention.paged_attention:
//   use_rope: q, k rows <- bf16(apply_rope): pair (2i, 2i+1) times exp(j * angle), angle =
//     float(positions[t]) * inv_freq[i] in fp32 (cosf / sinf), each product rounded (no FMA);
//   qk_norm: q, k rows <- bf16(l2_norm) = bf16(x / sqrt(mean(x^2) + eps)), fp32 statistics;
//   q_scale != null (temperature tuning): q <- bf16(q * q_scale[t]), q_scale [T] fp32;
// in that order, each step on the previous one's bf16 result. Then q_out [T, Hq, D] (contiguous;
// may be q itself when q is contiguous) gets q, and k_cache / v_cache [slots, Hkv, D] get the
// final k row and the v row (its bits) at slot slots[t] (a negative slot: that token's k and v
// are not written). q [T, Hq, D], k and v [T, Hkv, D] bf16 with heads and head_dim contiguous
// and rows (tokens) q_row_stride / k_row_stride / v_row_stride elements apart (views of a fused
// qkv projection are fine). positions [T] and slots [T] int64, inv_freq [D / 2] fp32 (read
// only with use_rope). head_dim even, 2..256; num_tokens, num_q_heads, num_kv_heads >= 1.
int pyllama4_rope_qk_norm_kv_write(void* q_out, const void* q, const void* k, const void* v,
                                   int64_t q_row_stride, int64_t k_row_stride,
                                   int64_t v_row_stride, void* k_cache, void* v_cache,
                                   const int64_t* slots, const int64_t* positions,
                                   const float* inv_freq, const float* q_scale,
                                   int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
                                   int32_t head_dim, int32_t use_rope, int32_t qk_norm, float eps,
                                   void* stream);

// The SwiGLU activation of pyllama4.layers.ffn.SwiGLU.partial in bf16:
//   out[t, i] = bf16(bf16(silu(g)) * up[t, i]), g = gate[t, i], silu(g) = g / (1 + exp(-g)) fp32.
// gate and up [T, intermediate] bf16, rows gate_row_stride / up_row_stride elements apart (the
// halves of a fused gate_up output are fine); out [T, intermediate] contiguous, not overlapping
// them. num_tokens, intermediate >= 1.
int pyllama4_silu_mul(void* out, const void* gate, const void* up, int64_t gate_row_stride,
                      int64_t up_row_stride, int32_t num_tokens, int32_t intermediate,
                      void* stream);
}
