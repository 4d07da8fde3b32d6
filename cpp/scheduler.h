// Scheduler: continuous batching over the KV pools and the radix cache.
//
// Requests wait in a queue, are admitted (with their cached prefix applied), run prefill in chunks
// under a per-step token budget, then decode one token (plus `reserve` speculative slots) per step
// until they hit a stop token, their max_new_tokens or the context length. Each schedule() builds
// one StepPlan; commit() applies the tokens sampled for it. Exactly one plan is in flight at a time.
//
// A step schedules, in order: every running decode (never starved), then continuing prefill
// chunks, then admissions from the waiting queue (`fcfs`, or `lpm`: longest cached prefix first)
// while the token budget and the running limit allow. Admission reserves the pages of its first
// chunk now and an estimate of its future pages (remaining prompt + new_token_ratio * remaining new
// tokens, as SGLang does), so that decodes rarely run out. When they do, retraction frees victims
// (fewest generated tokens first, then longest prompt): a victim drops the pages it does not share
// with the cache, keeps its cached prefix, and goes back to the front of the queue to be recomputed;
// no admission happens in a step that retracted. Last resort: when nothing at all can be scheduled
// although requests wait or run, and at most one runs, what blocks it is local pages that the
// cache keeps on a locked path for chunks its requests have left (a lock pins every page of the
// path). Then the running request is retracted too, every unlocked local page of the cache is
// dropped, and admission runs again in the same step.
//
// Prefix caching: after each prefill chunk a request inserts its computed whole pages into the
// radix cache and switches to the tree's copies of any pages that were already cached, so that
// requests admitted later share the prefix while it is still running. With chunk-local layers
// it shares only whole chunks while running, since local pages of its current chunk in the tree
// would stay pinned by its lock after it moves on. At the end (finish or abort) it inserts
// everything it computed. Retraction drops only what the tree does not hold.
//
// Chunk-local KV: with chunk size C, a request holds local pages only for [floor(n/C)*C, n) once n
// tokens are computed (at most ceil(C/page)+1 pages outside a step); earlier ones are released
// when it crosses a boundary. Global pages cover [0, n).
//
// Block tables: each running request owns one row of two persistent tables (see StepPlan) from
// admission to release. A plan lists only the entries written since the previous plan (new pages,
// a new admission's cached prefix, pages swapped for the cache's copies), so a decode step costs
// O(1) per request whatever the context length.
//
// Invariants (check() verifies them): for each pool free + held_by_requests + cached_in_tree ==
// total; a page is in at most one of {free list, tree, one request}, except that requests may share
// tree pages on locked paths; every page's reference count equals its holders; every request that
// add_request() accepted ends exactly once: in commit() (a stop token or the length limit), or by
// end() (its caller saw a stop the core cannot: a stop string, a completed grammar; or abandoned
// it), and is counted once under its FinishReason.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kv_pool.h"
#include "radix_cache.h"

namespace pyllama4 {

enum class Policy { kFcfs, kLpm };
enum class FinishReason { kStop, kLength, kAbort };

struct SchedulerConfig {
  int32_t page_size = 16;
  int32_t global_pages = 0;        // capacity of the global (full-history, NoPE) pool
  int32_t local_pages = 0;         // capacity of the chunk-local (RoPE) pool; 0 when chunk_size is 0
  int32_t chunk_size = 0;          // attention chunk size C in tokens; 0: no chunk-local layers
  int32_t context_len = 8192;      // most tokens (prompt + output) one sequence may hold
  int32_t max_running = 256;       // most requests admitted at once
  int32_t max_step_tokens = 8192;  // token budget per step (chunked-prefill size)
  Policy policy = Policy::kFcfs;
  bool enable_prefix_cache = true;
  double init_new_token_ratio = 0.7;
  double min_new_token_ratio_factor = 0.14;  // min ratio = init * factor
  int32_t new_token_ratio_decay_steps = 600;
  int32_t clip_max_new_tokens = 4096;        // cap on the per-request decode estimate
  int32_t retract_decode_steps = 20;         // headroom used when re-estimating the ratio
};

// One step's inputs, as flat arrays (Python views them zero-copy). R requests, T tokens, S samples.
// Decodes come first (num_decodes of them), then prefill chunks.
struct StepPlan {
  std::vector<int64_t> request_ids;    // [R]
  std::vector<int32_t> query_start;    // [R+1] offsets of each request's tokens in the flat arrays
  std::vector<int32_t> context_lens;   // [R] tokens already in the KV cache before this step
  std::vector<int32_t> seq_lens;       // [R] context_lens + query length
  std::vector<int32_t> token_ids;      // [T] (speculative slots hold the last known token)
  std::vector<int32_t> positions;      // [T]
  std::vector<int32_t> global_slots;   // [T] page * page_size + offset in the global pool
  std::vector<int32_t> local_slots;    // [T] same in the local pool (-1 without a local pool)
  std::vector<int32_t> rows;           // [R] each request's row in the block tables
  // Block tables live with the model runner: global [max_running, global_table_width] maps a row's
  // page index i (positions [i * P, (i + 1) * P)) to a global page; local [max_running,
  // local_table_width] maps absolute page index i of the current chunk window to a local page at
  // column i % local_table_width (width C/P + ceil(max_step_tokens/P)). A plan carries only the entries that changed since the last one:
  // table.flat[index[u]] = values[u] for each u (repeated indices carry equal values), applied
  // before the step runs. Entries a request does not hold are stale and never read.
  std::vector<int64_t> global_table_index;   // [U] row * global_table_width + page index
  std::vector<int32_t> global_table_values;  // [U] global page ids
  std::vector<int64_t> local_table_index;    // [V] row * local_table_width + page % width
  std::vector<int32_t> local_table_values;   // [V] local page ids
  std::vector<int32_t> sample_indices;      // [S] flat index of the last known token of each sampling request
  std::vector<int32_t> sample_requests;     // [S] request index (0..R-1) of each sample
  int32_t num_decodes = 0;
  int32_t num_retracted = 0;                // requests retracted while building this plan

  int32_t num_requests() const { return static_cast<int32_t>(request_ids.size()); }
  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  void clear();
  void reserve_like(const StepPlan& other);  // capacity for a plan of the same size
};

struct Finished {
  int64_t request_id;
  FinishReason reason;
  int32_t num_output_tokens;
};

struct RequestInfo {
  bool running = false;
  int32_t num_tokens = 0;         // prompt + output
  int32_t num_output_tokens = 0;
  int32_t num_computed = 0;       // tokens whose KV is in the cache
  int32_t cached_tokens = 0;      // prefix tokens taken from the radix cache at the last admission
  int32_t num_retractions = 0;
  int32_t global_pages = 0;
  int32_t local_pages = 0;
};

struct SchedulerStats {
  int32_t num_waiting = 0, num_running = 0;
  int32_t global_total = 0, global_free = 0, global_cached = 0, global_evictable = 0;
  int32_t local_total = 0, local_free = 0, local_cached = 0, local_evictable = 0;
  int64_t prompt_tokens = 0;      // prompt tokens admitted (re-admissions count again)
  int64_t cached_tokens = 0;      // of which taken from the radix cache
  int64_t num_retractions = 0;
  int64_t num_steps = 0;
  int64_t num_finished_stop = 0;    // requests ended by a stop (a stop token, or end(kStop))
  int64_t num_finished_length = 0;  // requests ended by max_new_tokens or the context length
  int64_t num_aborted = 0;          // requests abandoned (abort(), end(kAbort))
  double new_token_ratio = 0;
};

struct Request;

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerConfig& config() const { return config_; }

  // Queues a request. Throws std::invalid_argument (naming the problem) when the request can never
  // run: duplicate id, empty prompt, prompt not shorter than context_len, max_new_tokens < 1, a
  // sequence that would need more pages than a pool holds, or a reserve that is negative
  // or leaves 1 + reserve above max_step_tokens, or a negative max_cached other than -1.
  // max_cached: the most prompt tokens the radix cache may supply at admission (-1: no limit); a
  // request that must compute positions from p on (prompt logprobs) passes p.
  void add_request(int64_t request_id, const std::vector<int32_t>& prompt, int32_t max_new_tokens,
                   const std::vector<int32_t>& stop_token_ids, uint64_t extra_key, int32_t reserve,
                   int32_t max_cached = -1);
  // Ends a request in any state for `reason` and releases its pages (caching its computed prefix).
  // A request in the plan in flight is released at commit(), which skips it (and does not report
  // it as finished). Returns false if unknown or already ended.
  bool end(int64_t request_id, FinishReason reason);
  bool abort(int64_t request_id) { return end(request_id, FinishReason::kAbort); }

  // Builds the next step. Throws std::logic_error if the previous plan was not committed.
  // The returned plan stays valid (and unchanged) after later steps for whoever holds it.
  std::shared_ptr<const StepPlan> schedule();
  // Applies the sampled tokens of the plan in flight. Without counts, tokens holds one token per
  // sample (plan order). With counts (one per sample, each in [1, 1 + reserve]), the request's
  // speculative slots accepted counts[i] - 1 tokens and tokens holds them all, concatenated.
  std::vector<Finished> commit(const int32_t* tokens, int32_t num_tokens, const int32_t* counts,
                               int32_t num_counts);

  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  bool plan_in_flight() const { return in_flight_; }
  bool has_request(int64_t request_id) const { return requests_.count(request_id) != 0; }
  RequestInfo request_info(int64_t request_id) const;
  std::vector<int32_t> request_tokens(int64_t request_id) const;
  SchedulerStats stats() const;
  int32_t flush_cache();  // evicts every unlocked cached page; returns the global pages freed
  // Block table shapes: max_running rows of these widths (local: 0 without chunk-local layers).
  int32_t global_table_width() const { return global_width_; }
  int32_t local_table_width() const { return local_width_; }
  // The widths a scheduler with this configuration uses (whoever allocates the tables needs them
  // before, or without, a scheduler): {global, local}.
  static std::pair<int32_t, int32_t> table_widths(const SchedulerConfig& c);

  KVPool& global_pool() { return *global_; }
  KVPool* local_pool() { return local_.get(); }
  RadixCache& cache() { return *cache_; }

  // Empty when every invariant holds, else a description of the first violation.
  std::string check() const;

 private:
  // Where a request's KV stands: what page arithmetic needs, for a request or a would-be one.
  struct Footprint {
    int32_t num_computed;
    int32_t global_held;  // pages for [0, global_held * page_size)
    int32_t local_first;  // first page index held in the local pool
    int32_t local_held;
  };
  static Footprint footprint(const Request& r);
  int32_t max_extend(const Footprint& f, int32_t want, int32_t avail_global, int32_t avail_local) const;
  void pages_for(const Footprint& f, int32_t extend, int32_t* global, int32_t* local) const;
  int32_t future_pages(const Request& r, const Footprint& f, bool local) const;
  int32_t decode_extend(const Request& r) const;
  bool make_room(int32_t global, int32_t local);
  void allocate(Request& r, int32_t extend);
  void emit(Request& r, int32_t known, int32_t extend);
  bool admit(Request& r, int32_t budget, int32_t reserved_global, int32_t reserved_local);
  void retract(Request& r);
  Request* pick_victim(const Request* keep);
  void insert_prefix(Request& r, int32_t full_pages);  // caches r's pages [0, full_pages)
  void cache_unfinished(Request& r);
  void release(Request& r, bool cache_prefix);
  void release_old_local_pages(Request& r);
  void log_pages(const Request& r, int32_t global_from, int32_t local_from);
  void resolve_table_writes();
  void finish(Request& r, FinishReason reason);  // in commit(): reports r as Finished
  void count(FinishReason reason);
  void order_waiting();
  static int32_t match_limit(const Request& r);  // tokens a prefix match may cover

  SchedulerConfig config_;
  std::unique_ptr<KVPool> global_;
  std::unique_ptr<KVPool> local_;
  std::unique_ptr<RadixCache> cache_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;
  std::shared_ptr<StepPlan> plan_;
  std::vector<std::shared_ptr<StepPlan>> plan_buffers_;  // reused once nobody else holds them
  std::vector<Request*> decodes_, prefills_;             // scratch for schedule()
  std::vector<Request*> plan_requests_;
  std::vector<int32_t> plan_known_;  // known tokens computed by the plan, per plan request
  std::vector<Finished> finished_;   // filled by commit
  int32_t global_width_ = 0, local_width_ = 0;
  std::vector<Request*> row_owner_;     // [max_running] running request in each row, or null
  std::vector<int32_t> free_rows_;
  // Table entries written since the last plan: (row, page index). Values are read when the plan
  // is built, from whoever owns the row then; entries it does not hold are dropped.
  std::vector<std::pair<int32_t, int32_t>> global_writes_, local_writes_;
  bool in_flight_ = false;
  int64_t arrivals_ = 0;
  double new_token_ratio_;
  double min_new_token_ratio_;
  double new_token_ratio_decay_;
  SchedulerStats counters_;
};

}  // namespace pyllama4
