// pybind11 bindings of the core: the one place where C++ meets Python.
// C++ exceptions map to Python ones: std::invalid_argument -> ValueError, std::out_of_range ->
// IndexError (KeyError for unknown request ids), anything else -> RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "kv_pool.h"
#include "radix_cache.h"
#include "scheduler.h"

namespace py = pybind11;
using namespace pyllama4;

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// A writable numpy view of a vector owned by `owner` (kept alive by the array).
template <class T>
py::array_t<T> view(const std::vector<T>& v, py::handle owner) {
  return py::array_t<T>({static_cast<py::ssize_t>(v.size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        v.data(), owner);
}

const char* reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
  }
  return "?";
}

FinishReason parse_reason(const std::string& name) {
  if (name == "stop") return FinishReason::kStop;
  if (name == "length") return FinishReason::kLength;
  if (name == "abort") return FinishReason::kAbort;
  throw std::invalid_argument("unknown finish reason '" + name + "' (expected stop, length or abort)");
}

Policy parse_policy(const std::string& name) {
  if (name == "fcfs") return Policy::kFcfs;
  if (name == "lpm") return Policy::kLpm;
  throw std::invalid_argument("unknown schedule policy '" + name + "' (expected fcfs or lpm)");
}

RadixNode* node_or_raise(const RadixCache& cache, int32_t id) {
  RadixNode* node = cache.node_by_id(id);
  if (!node) throw py::key_error("no radix node with id " + std::to_string(id));
  return node;
}

void require_request(const Scheduler& s, int64_t id) {
  if (!s.has_request(id)) throw py::key_error("unknown request id " + std::to_string(id));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyllama4's compiled core: paged KV pools, the radix prefix cache and the scheduler.";

  py::class_<KVPool>(m, "KVPool", R"doc(
Fixed-size KV pages with reference counts. Slot s of page p is the flat index p * page_size + s.
Invariant: every page is free (ref 0, on the free list once) or live (ref > 0); each holder owns
one reference per page it lists.)doc")
      .def(py::init<int32_t, int32_t>(), py::arg("num_pages"), py::arg("page_size") = 16)
      .def_property_readonly("num_pages", &KVPool::num_pages)
      .def_property_readonly("page_size", &KVPool::page_size)
      .def_property_readonly("num_free", &KVPool::num_free)
      .def_property_readonly("num_used", &KVPool::num_used)
      .def(
          "alloc",
          [](KVPool& pool, int32_t n) -> py::object {
            std::vector<int32_t> out;
            if (!pool.alloc(n, out)) return py::none();
            return py::cast(out);
          },
          py::arg("n"), "Takes n free pages (ref 1 each); None, taking nothing, if fewer are free.")
      .def("ref", &KVPool::ref, py::arg("page"))
      .def("unref", &KVPool::unref, py::arg("page"), "Drops a reference; frees the page at zero.")
      .def("ref_count", &KVPool::ref_count, py::arg("page"))
      .def("check", &KVPool::check, "Empty string when the invariants hold, else the violation.");

  py::class_<RadixCacheStats>(m, "RadixCacheStats", "Radix cache running totals since construction.")
      .def_readonly("lookups", &RadixCacheStats::lookups)
      .def_readonly("lookup_tokens", &RadixCacheStats::lookup_tokens)
      .def_readonly("hit_tokens", &RadixCacheStats::hit_tokens)
      .def_readonly("inserted_tokens", &RadixCacheStats::inserted_tokens)
      .def_readonly("evicted_global_pages", &RadixCacheStats::evicted_global_pages)
      .def_readonly("evicted_local_pages", &RadixCacheStats::evicted_local_pages);

  py::class_<RadixCache>(m, "RadixCache", R"doc(
Radix tree of cached KV pages over page-aligned token keys, namespaced by an extra key.
Each page of a node has a global-pool page and, with chunk-local layers (chunk_size > 0), an
optional local-pool page (-1 when not cached). A prefix of L tokens is usable only if local pages
cover [floor(L / chunk_size) * chunk_size, L); matches are shortened to that. Eviction is LRU and
page-granular from the tail of the least recently used unlocked leaf; evict_local drops local
pages only. The tree owns one pool reference per page it lists.)doc")
      .def(py::init([](KVPool* global, KVPool* local, int32_t chunk_size) {
             return std::make_unique<RadixCache>(global, local, chunk_size);
           }),
           py::arg("global_pool"), py::arg("local_pool") = nullptr, py::arg("chunk_size") = 0,
           py::keep_alive<1, 2>(), py::keep_alive<1, 3>())
      .def(
          "match_prefix",
          [](RadixCache& c, IntArray tokens, uint64_t extra_key) {
            MatchResult r = c.match_prefix(extra_key, tokens.data(), static_cast<int32_t>(tokens.size()));
            py::dict d;
            d["length"] = r.length;
            d["global_pages"] = r.global_pages;
            d["local_pages"] = r.local_pages;
            d["local_first_page"] = r.local_first_page;
            d["node"] = r.node->id;
            return d;
          },
          py::arg("tokens"), py::arg("extra_key") = 0,
          "Longest usable cached prefix: dict(length, global_pages, local_pages, local_first_page, "
          "node). Marks the path as used; takes no references and does not lock.")
      .def(
          "peek_prefix",
          [](const RadixCache& c, IntArray tokens, uint64_t extra_key) {
            return c.peek_prefix(extra_key, tokens.data(), static_cast<int32_t>(tokens.size()));
          },
          py::arg("tokens"), py::arg("extra_key") = 0)
      .def(
          "insert",
          [](RadixCache& c, IntArray tokens, IntArray global_pages, py::object local_pages,
             uint64_t extra_key) {
            const int32_t n = static_cast<int32_t>(tokens.size());
            if (n % c.page_size() != 0)
              throw std::invalid_argument("insert: the key must be a whole number of pages");
            const py::ssize_t pages = n / c.page_size();
            if (global_pages.size() != pages)
              throw std::invalid_argument("insert: need one global page per page of tokens");
            IntArray local;
            if (!local_pages.is_none()) {
              local = local_pages.cast<IntArray>();
              if (local.size() != pages)
                throw std::invalid_argument("insert: need one local page (or -1) per page of tokens");
            }
            return c.insert(extra_key, tokens.data(), n, global_pages.data(),
                            local_pages.is_none() ? nullptr : local.data());
          },
          py::arg("tokens"), py::arg("global_pages"), py::arg("local_pages") = py::none(),
          py::arg("extra_key") = 0,
          "Caches the pages; returns how many tokens were already cached. The tree takes its own "
          "references on pages it adopts.")
      .def("lock", [](RadixCache& c, int32_t node) { c.lock(node_or_raise(c, node)); }, py::arg("node"))
      .def("unlock", [](RadixCache& c, int32_t node) { c.unlock(node_or_raise(c, node)); },
           py::arg("node"))
      .def("evict", &RadixCache::evict, py::arg("num_pages"),
           "Frees min(num_pages, evictable) global pages (with their local pages).")
      .def("evict_local", &RadixCache::evict_local, py::arg("num_pages"))
      .def_property_readonly("page_size", &RadixCache::page_size)
      .def_property_readonly("chunk_size", &RadixCache::chunk_size)
      .def_property_readonly("cached_global_pages", &RadixCache::cached_global_pages)
      .def_property_readonly("cached_local_pages", &RadixCache::cached_local_pages)
      .def_property_readonly("evictable_global_pages", &RadixCache::evictable_global_pages)
      .def_property_readonly("evictable_local_pages", &RadixCache::evictable_local_pages)
      .def_property_readonly("protected_global_pages", &RadixCache::protected_global_pages)
      .def_property_readonly("protected_local_pages", &RadixCache::protected_local_pages)
      .def_property_readonly("num_nodes", &RadixCache::num_nodes)
      .def("stats", &RadixCache::stats, "Running totals: lookups, hit tokens, insertions, evictions.")
      .def("check", &RadixCache::check);

  py::class_<StepPlan, std::shared_ptr<StepPlan>>(m, "StepPlan", R"doc(
One step's inputs as flat arrays, viewed zero-copy (numpy; torch.from_numpy shares them).
R requests (decodes first, then prefill chunks), T tokens, S sampling requests.
Slots are page * page_size + offset; local_slots is -1 without chunk-local layers.
Block tables are persistent and live with the model runner: global
[max_running, Scheduler.global_table_width] (row r, column i: the global page of positions
[i * page_size, (i + 1) * page_size)) and local [max_running, Scheduler.local_table_width]
(column i % width: the local page of absolute page index i in the current chunk window).
Request j uses row rows[j]. Before running a plan, apply its writes:
table.view(-1)[global_table_index] = global_table_values, and the same for the local table
(repeated indices carry equal values). A plan never changes after schedule() returns it.)doc")
#define PLAN_ARRAY(name) \
  .def_property_readonly(#name, [](py::object self) { return view(self.cast<StepPlan&>().name, self); })
      PLAN_ARRAY(request_ids) PLAN_ARRAY(query_start) PLAN_ARRAY(context_lens) PLAN_ARRAY(seq_lens)
      PLAN_ARRAY(token_ids) PLAN_ARRAY(positions) PLAN_ARRAY(global_slots) PLAN_ARRAY(local_slots)
      PLAN_ARRAY(rows) PLAN_ARRAY(global_table_index) PLAN_ARRAY(global_table_values)
      PLAN_ARRAY(local_table_index) PLAN_ARRAY(local_table_values) PLAN_ARRAY(sample_indices)
      PLAN_ARRAY(sample_requests)
#undef PLAN_ARRAY
      .def_property_readonly("num_requests", &StepPlan::num_requests)
      .def_property_readonly("num_tokens", &StepPlan::num_tokens)
      .def_property_readonly("num_samples",
                             [](const StepPlan& p) { return static_cast<int32_t>(p.sample_indices.size()); })
      .def_readonly("num_decodes", &StepPlan::num_decodes)
      .def_readonly("num_retracted", &StepPlan::num_retracted)
      .def("__len__", &StepPlan::num_requests);

  py::class_<Finished>(m, "Finished", "A request that ended in commit(): id, reason, output length.")
      .def_readonly("request_id", &Finished::request_id)
      .def_property_readonly("reason", [](const Finished& f) { return reason_name(f.reason); })
      .def_readonly("num_output_tokens", &Finished::num_output_tokens)
      .def("__repr__", [](const Finished& f) {
        return "Finished(request_id=" + std::to_string(f.request_id) + ", reason='" +
               reason_name(f.reason) + "', num_output_tokens=" + std::to_string(f.num_output_tokens) + ")";
      });

  py::class_<RequestInfo>(m, "RequestInfo")
      .def_readonly("running", &RequestInfo::running)
      .def_readonly("num_tokens", &RequestInfo::num_tokens)
      .def_readonly("num_output_tokens", &RequestInfo::num_output_tokens)
      .def_readonly("num_computed", &RequestInfo::num_computed)
      .def_readonly("cached_tokens", &RequestInfo::cached_tokens)
      .def_readonly("num_retractions", &RequestInfo::num_retractions)
      .def_readonly("global_pages", &RequestInfo::global_pages)
      .def_readonly("local_pages", &RequestInfo::local_pages);

  py::class_<SchedulerStats>(m, "SchedulerStats")
      .def_readonly("num_waiting", &SchedulerStats::num_waiting)
      .def_readonly("num_running", &SchedulerStats::num_running)
      .def_readonly("global_total", &SchedulerStats::global_total)
      .def_readonly("global_free", &SchedulerStats::global_free)
      .def_readonly("global_cached", &SchedulerStats::global_cached)
      .def_readonly("global_evictable", &SchedulerStats::global_evictable)
      .def_readonly("local_total", &SchedulerStats::local_total)
      .def_readonly("local_free", &SchedulerStats::local_free)
      .def_readonly("local_cached", &SchedulerStats::local_cached)
      .def_readonly("local_evictable", &SchedulerStats::local_evictable)
      .def_readonly("prompt_tokens", &SchedulerStats::prompt_tokens)
      .def_readonly("cached_tokens", &SchedulerStats::cached_tokens)
      .def_readonly("num_retractions", &SchedulerStats::num_retractions)
      .def_readonly("num_steps", &SchedulerStats::num_steps)
      .def_readonly("num_finished_stop", &SchedulerStats::num_finished_stop)
      .def_readonly("num_finished_length", &SchedulerStats::num_finished_length)
      .def_readonly("num_aborted", &SchedulerStats::num_aborted)
      .def_readonly("new_token_ratio", &SchedulerStats::new_token_ratio);

  py::class_<Scheduler>(m, "Scheduler", R"doc(
Continuous batching over two KV pools (global / chunk-local) and the radix cache.
Each schedule() returns a StepPlan: every running decode first, then prefill chunks within the
token budget (max_step_tokens), then admissions (fcfs or lpm) that fit the pages they are
expected to need. When decodes run out of pages, victims (fewest outputs first) are retracted:
they keep their cached prefix and are recomputed later; outputs never change. commit(tokens)
applies the sampled tokens and returns the requests that finished ("stop": a stop token,
"length": max_new_tokens or the context length). Exactly one plan is in flight at a time.
Invariant (check()): per pool, free + held by requests + cached in the tree == total; no page
owned twice; reference counts equal holders; locked tree pages are never evicted.)doc")
      .def(py::init([](int32_t global_pages, int32_t page_size, int32_t local_pages,
                       int32_t chunk_size, int32_t context_len, int32_t max_running,
                       int32_t max_step_tokens, const std::string& policy,
                       bool enable_prefix_cache, double init_new_token_ratio,
                       double min_new_token_ratio_factor, int32_t new_token_ratio_decay_steps,
                       int32_t clip_max_new_tokens) {
             SchedulerConfig c;
             c.global_pages = global_pages;
             c.page_size = page_size;
             c.local_pages = local_pages;
             c.chunk_size = chunk_size;
             c.context_len = context_len;
             c.max_running = max_running;
             c.max_step_tokens = max_step_tokens;
             c.policy = parse_policy(policy);
             c.enable_prefix_cache = enable_prefix_cache;
             c.init_new_token_ratio = init_new_token_ratio;
             c.min_new_token_ratio_factor = min_new_token_ratio_factor;
             c.new_token_ratio_decay_steps = new_token_ratio_decay_steps;
             c.clip_max_new_tokens = clip_max_new_tokens;
             return std::make_unique<Scheduler>(c);
           }),
           py::arg("global_pages"), py::kw_only(), py::arg("page_size") = 16,
           py::arg("local_pages") = 0, py::arg("chunk_size") = 0, py::arg("context_len") = 8192,
           py::arg("max_running") = 256, py::arg("max_step_tokens") = 8192,
           py::arg("policy") = "fcfs", py::arg("enable_prefix_cache") = true,
           py::arg("init_new_token_ratio") = 0.7, py::arg("min_new_token_ratio_factor") = 0.14,
           py::arg("new_token_ratio_decay_steps") = 600, py::arg("clip_max_new_tokens") = 4096)
      .def(
          "add_request",
          [](Scheduler& s, int64_t request_id, IntArray prompt, int32_t max_new_tokens,
             std::vector<int32_t> stop_token_ids, uint64_t extra_key, int32_t reserve,
             int32_t max_cached) {
            std::vector<int32_t> ids(prompt.data(), prompt.data() + prompt.size());
            s.add_request(request_id, ids, max_new_tokens, stop_token_ids, extra_key, reserve,
                          max_cached);
          },
          py::arg("request_id"), py::arg("prompt"), py::arg("max_new_tokens"),
          py::arg("stop_token_ids") = std::vector<int32_t>{}, py::arg("extra_key") = 0,
          py::arg("reserve") = 0, py::arg("max_cached") = -1,
          "Queues a request; ValueError names the problem when it can never run. max_cached: "
          "the most prompt tokens the prefix cache may supply at admission (-1: no limit).")
      .def("abort", &Scheduler::abort, py::arg("request_id"),
           "Ends a request in any state, caching its computed prefix; False if unknown.")
      .def(
          "finish",
          [](Scheduler& s, int64_t id, const std::string& reason) {
            return s.end(id, parse_reason(reason));
          },
          py::arg("request_id"), py::arg("reason"),
          "Ends a request whose caller saw it finish ('stop': a stop string, a completed "
          "grammar) or abandoned it ('abort'); as abort() otherwise, counted under its reason. "
          "False if unknown or already ended.")
      .def("schedule", [](Scheduler& s) { return std::const_pointer_cast<StepPlan>(s.schedule()); },
           "Builds the next step (empty when there is nothing to run).")
      .def(
          "commit",
          [](Scheduler& s, IntArray tokens, py::object counts) {
            if (counts.is_none())
              return s.commit(tokens.data(), static_cast<int32_t>(tokens.size()), nullptr, 0);
            IntArray c = counts.cast<IntArray>();
            return s.commit(tokens.data(), static_cast<int32_t>(tokens.size()), c.data(),
                            static_cast<int32_t>(c.size()));
          },
          py::arg("tokens"), py::arg("counts") = py::none(),
          "Applies the plan's sampled tokens (one per sample, or counts[i] each for speculative "
          "requests); returns the requests that finished.")
      .def_static(
          "table_widths",
          [](int32_t page_size, int32_t chunk_size, int32_t context_len, int32_t max_step_tokens) {
            if (page_size <= 0) throw std::invalid_argument("page_size must be > 0");
            SchedulerConfig c;
            c.page_size = page_size;
            c.chunk_size = chunk_size;
            c.context_len = context_len;
            c.max_step_tokens = max_step_tokens;
            return Scheduler::table_widths(c);
          },
          py::arg("page_size"), py::arg("chunk_size"), py::arg("context_len"),
          py::arg("max_step_tokens"),
          "(global, local) block-table widths a scheduler so configured uses: what the KV "
          "cache's tables are allocated with.")
      .def("has_work", &Scheduler::has_work)
      .def_property_readonly("plan_in_flight", &Scheduler::plan_in_flight)
      .def("has_request", &Scheduler::has_request, py::arg("request_id"))
      .def(
          "request_info",
          [](const Scheduler& s, int64_t id) {
            require_request(s, id);
            return s.request_info(id);
          },
          py::arg("request_id"))
      .def(
          "request_tokens",
          [](const Scheduler& s, int64_t id) {
            require_request(s, id);
            return s.request_tokens(id);
          },
          py::arg("request_id"))
      .def("stats", &Scheduler::stats)
      .def("flush_cache", &Scheduler::flush_cache)
      .def_property_readonly("global_pool", &Scheduler::global_pool, py::return_value_policy::reference_internal)
      .def_property_readonly("local_pool", &Scheduler::local_pool, py::return_value_policy::reference_internal)
      .def_property_readonly("cache", &Scheduler::cache, py::return_value_policy::reference_internal)
      .def_property_readonly("page_size", [](const Scheduler& s) { return s.config().page_size; })
      .def_property_readonly("chunk_size", [](const Scheduler& s) { return s.config().chunk_size; })
      .def_property_readonly("context_len", [](const Scheduler& s) { return s.config().context_len; })
      .def_property_readonly("max_running", [](const Scheduler& s) { return s.config().max_running; })
      .def_property_readonly("global_table_width", &Scheduler::global_table_width)
      .def_property_readonly("local_table_width", &Scheduler::local_table_width)
      .def("check", &Scheduler::check, "Empty string when every invariant holds, else the violation.");
}
