// C++ tests of the core, run by ctest (CI builds them with ASan and UBSan).
// Each test exercises one part; the last drives random operations through the scheduler and
// checks every invariant after each one, so that the sanitizers see every code path.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv_pool.h"
#include "radix_cache.h"
#include "scheduler.h"

using namespace pyllama4;

namespace {

int failures = 0;

#define EXPECT(cond)                                                          \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                             \
    }                                                                         \
  } while (0)

#define EXPECT_OK(check_string)                                                       \
  do {                                                                                \
    const std::string msg_ = (check_string);                                          \
    if (!msg_.empty()) {                                                              \
      std::fprintf(stderr, "%s:%d: invariant violated: %s\n", __FILE__, __LINE__, msg_.c_str()); \
      ++failures;                                                                     \
    }                                                                                 \
  } while (0)

template <class E, class F>
bool throws(F&& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  }
  return false;
}

void test_kv_pool() {
  KVPool pool(4, 16);
  std::vector<int32_t> pages;
  EXPECT(pool.alloc(3, pages) && pages.size() == 3 && pool.num_free() == 1);
  EXPECT(!pool.alloc(2, pages) && pages.size() == 3 && pool.num_free() == 1);
  pool.ref(pages[0]);
  pool.unref(pages[0]);
  EXPECT(pool.num_free() == 1 && pool.ref_count(pages[0]) == 1);
  for (int32_t p : pages) pool.unref(p);
  EXPECT(pool.num_free() == 4);
  EXPECT(throws<std::logic_error>([&] { pool.unref(pages[0]); }));
  EXPECT(throws<std::logic_error>([&] { pool.ref(pages[0]); }));
  EXPECT(throws<std::out_of_range>([&] { pool.ref(4); }));
  EXPECT_OK(pool.check());
}

void test_radix_match_insert_split() {
  KVPool pool(16, 2);
  RadixCache cache(&pool, nullptr, 0);
  std::vector<int32_t> pages;
  pool.alloc(3, pages);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6};
  EXPECT(cache.insert(0, a.data(), 6, pages.data(), nullptr) == 0);
  for (int32_t p : pages) pool.unref(p);  // the tree keeps its own references
  EXPECT(cache.cached_global_pages() == 3 && pool.num_free() == 13);

  const std::vector<int32_t> b = {1, 2, 3, 9, 9, 9, 9};
  MatchResult m = cache.match_prefix(0, b.data(), 7);
  EXPECT(m.length == 2 && m.global_pages.size() == 1 && m.global_pages[0] == pages[0]);
  EXPECT(cache.num_nodes() == 2);  // split after the first page
  EXPECT(cache.match_prefix(1, a.data(), 6).length == 0);  // another extra key
  EXPECT(cache.match_prefix(0, a.data(), 5).length == 4);  // whole pages only

  cache.lock(m.node);
  EXPECT(cache.protected_global_pages() == 1 && cache.evictable_global_pages() == 2);
  EXPECT(cache.evict(10) == 2 && cache.cached_global_pages() == 1);
  EXPECT(cache.match_prefix(0, a.data(), 6).length == 2);
  cache.unlock(m.node);
  EXPECT(throws<std::logic_error>([&] { cache.unlock(m.node); }));
  EXPECT(cache.evict(10) == 1 && pool.num_free() == 16);
  EXPECT_OK(cache.check());
}

void test_radix_local_coverage() {
  // page 2, chunk 4: a prefix of L tokens needs local pages over [floor(L/4)*4, L).
  KVPool global(16, 2), local(16, 2);
  RadixCache cache(&global, &local, 4);
  std::vector<int32_t> g, l;
  global.alloc(4, g);
  local.alloc(2, l);
  const std::vector<int32_t> key = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<int32_t> local_ids = {-1, -1, l[0], l[1]};  // only the last chunk's pages
  cache.insert(0, key.data(), 8, g.data(), local_ids.data());
  for (int32_t p : g) global.unref(p);
  for (int32_t p : l) local.unref(p);
  EXPECT(cache.cached_local_pages() == 2);
  // 8 tokens: chunk starts at 8, no local pages needed.
  const std::vector<int32_t> longer = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  EXPECT(cache.peek_prefix(0, longer.data(), 9) == 8);
  // 6 tokens: needs local [4, 6) = page 2, which is cached.
  EXPECT(cache.peek_prefix(0, key.data(), 6) == 6);
  // Drop the local page of page 2 (tail first: page 3 then page 2).
  EXPECT(cache.evict_local(2) == 2 && cache.cached_local_pages() == 0);
  EXPECT(cache.peek_prefix(0, key.data(), 6) == 4);  // shortened to the chunk boundary
  EXPECT(cache.peek_prefix(0, longer.data(), 9) == 8);
  MatchResult m = cache.match_prefix(0, key.data(), 6);
  EXPECT(m.length == 4 && m.local_pages.empty() && m.local_first_page == 2);
  EXPECT_OK(cache.check());
}

// Runs a scheduler to completion with a deterministic fake model and returns each request's tokens.
std::vector<std::vector<int32_t>> run_to_end(Scheduler& s, const std::vector<std::vector<int32_t>>& prompts,
                                             int32_t max_new) {
  for (size_t i = 0; i < prompts.size(); ++i) s.add_request(static_cast<int64_t>(i), prompts[i], max_new, {}, 0, 0);
  std::vector<std::vector<int32_t>> out(prompts);
  std::set<int64_t> live;
  for (size_t i = 0; i < prompts.size(); ++i) live.insert(static_cast<int64_t>(i));
  for (int step = 0; step < 100000 && s.has_work(); ++step) {
    auto plan = s.schedule();
    std::vector<int32_t> sampled;
    for (int32_t i : plan->sample_requests) {
      const auto& seq = out[plan->request_ids[i]];
      uint32_t h = 2166136261u;
      for (int32_t t : seq) h = (h ^ static_cast<uint32_t>(t)) * 16777619u;
      sampled.push_back(static_cast<int32_t>(h % 7));
    }
    for (size_t k = 0; k < sampled.size(); ++k)
      out[plan->request_ids[plan->sample_requests[k]]].push_back(sampled[k]);
    for (const Finished& f : s.commit(sampled.data(), static_cast<int32_t>(sampled.size()), nullptr, 0))
      live.erase(f.request_id);
    EXPECT_OK(s.check());
  }
  EXPECT(live.empty());
  return out;
}

void test_scheduler_outputs_do_not_depend_on_memory() {
  std::vector<std::vector<int32_t>> prompts;
  std::mt19937 rng(7);
  for (int i = 0; i < 12; ++i) {
    std::vector<int32_t> p = {1, 2, 3, 4, 5, 6, 7, 8};  // a shared prefix
    const int extra = 1 + static_cast<int>(rng() % 20);
    for (int k = 0; k < extra; ++k) p.push_back(static_cast<int32_t>(rng() % 5));
    prompts.push_back(p);
  }
  SchedulerConfig roomy;
  roomy.page_size = 4;
  roomy.global_pages = 512;
  roomy.chunk_size = 8;
  roomy.local_pages = 256;
  roomy.context_len = 128;
  roomy.max_step_tokens = 16;
  SchedulerConfig tight = roomy;
  tight.global_pages = 24;
  tight.local_pages = 6;
  Scheduler a(roomy), b(tight);
  const auto out_a = run_to_end(a, prompts, 30);
  const auto out_b = run_to_end(b, prompts, 30);
  EXPECT(out_a == out_b);
  EXPECT(b.stats().num_retractions > 0);
  EXPECT(a.stats().cached_tokens > 0);  // later admissions share the running prefix
}

void test_scheduler_errors() {
  SchedulerConfig c;
  c.page_size = 4;
  c.global_pages = 8;
  c.context_len = 64;
  Scheduler s(c);
  EXPECT(throws<std::invalid_argument>([&] { s.add_request(1, {}, 4, {}, 0, 0); }));
  EXPECT(throws<std::invalid_argument>([&] { s.add_request(1, std::vector<int32_t>(64, 1), 4, {}, 0, 0); }));
  EXPECT(throws<std::invalid_argument>([&] { s.add_request(1, {1, 2}, 0, {}, 0, 0); }));
  EXPECT(throws<std::invalid_argument>([&] { s.add_request(1, std::vector<int32_t>(20, 1), 40, {}, 0, 0); }));
  s.add_request(1, {1, 2, 3}, 4, {9}, 0, 0);
  EXPECT(throws<std::invalid_argument>([&] { s.add_request(1, {1, 2}, 4, {}, 0, 0); }));
  auto plan = s.schedule();
  EXPECT(throws<std::logic_error>([&] { s.schedule(); }));
  const int32_t wrong[2] = {1, 2};
  EXPECT(throws<std::invalid_argument>([&] { s.commit(wrong, 2, nullptr, 0); }));
  const int32_t stop = 9;
  auto done = s.commit(&stop, 1, nullptr, 0);
  EXPECT(done.size() == 1 && done[0].reason == FinishReason::kStop && done[0].num_output_tokens == 1);
  EXPECT(!s.has_work());
  EXPECT_OK(s.check());
}

// Each request is counted once under the reason it ended with, whoever ended it and when.
void test_finish_reasons_are_counted() {
  SchedulerConfig c;
  c.page_size = 4;
  c.global_pages = 64;
  c.context_len = 64;
  Scheduler s(c);
  s.add_request(1, {1, 2, 3}, 2, {9}, 0, 0);  // ends in commit on its stop token
  s.add_request(2, {1, 2, 3}, 1, {}, 0, 0);   // ends in commit at max_new_tokens
  s.add_request(3, {1, 2, 3}, 8, {}, 0, 0);   // its caller sees a stop string while in flight
  s.add_request(4, {1, 2, 3}, 8, {}, 0, 0);   // abandoned while in flight
  s.add_request(5, {4, 5, 6}, 8, {}, 0, 0);   // its caller ends it between steps
  auto plan = s.schedule();
  EXPECT(plan->num_requests() == 5);
  EXPECT(s.end(3, FinishReason::kStop));
  EXPECT(!s.end(3, FinishReason::kStop));  // already ended: no second count
  EXPECT(s.abort(4));
  const int32_t tokens[5] = {9, 7, 7, 7, 7};
  auto done = s.commit(tokens, 5, nullptr, 0);
  EXPECT(done.size() == 2);  // 3 and 4 are released, not reported: their caller ended them
  EXPECT(s.end(5, FinishReason::kStop));
  EXPECT(!s.end(42, FinishReason::kStop));
  const SchedulerStats st = s.stats();
  EXPECT(st.num_finished_stop == 3);
  EXPECT(st.num_finished_length == 1);
  EXPECT(st.num_aborted == 1);
  EXPECT(!s.has_work());
  EXPECT(s.global_pool().num_free() + s.cache().cached_global_pages() == c.global_pages);
  EXPECT_OK(s.check());
}

void test_random_operations() {
  std::mt19937 rng(1234);
  for (int config = 0; config < 4; ++config) {
    SchedulerConfig c;
    c.page_size = 2;
    c.global_pages = 40;
    c.chunk_size = config % 2 ? 0 : 8;
    c.local_pages = config % 2 ? 0 : 10;
    c.context_len = 60;
    c.max_running = 6;
    c.max_step_tokens = 12;
    c.policy = config < 2 ? Policy::kFcfs : Policy::kLpm;
    Scheduler s(c);
    int64_t next_id = 0;
    std::set<int64_t> live;
    for (int op = 0; op < 4000; ++op) {
      const uint32_t r = rng() % 10;
      if (r < 3) {
        std::vector<int32_t> prompt(1 + rng() % 20);
        for (auto& t : prompt) t = static_cast<int32_t>(rng() % 3);
        s.add_request(next_id, prompt, 1 + static_cast<int32_t>(rng() % 15), {2}, rng() % 2,
                      static_cast<int32_t>(rng() % 3));
        live.insert(next_id++);
      } else if (r < 4 && !live.empty()) {
        auto it = live.begin();
        std::advance(it, rng() % live.size());
        EXPECT(s.abort(*it));
        live.erase(it);
      } else if (r < 5) {
        s.flush_cache();
      } else {
        auto plan = s.schedule();
        std::vector<int32_t> tokens, counts;
        for (size_t k = 0; k < plan->sample_requests.size(); ++k) {
          const int32_t i = plan->sample_requests[k];
          // Known tokens end at the sample index; the positions after it are speculative slots.
          const int32_t slots = plan->query_start[i + 1] - plan->sample_indices[k];
          const int32_t n = 1 + static_cast<int32_t>(rng() % std::max(1, slots));
          counts.push_back(std::min(n, slots));
          for (int32_t j = 0; j < counts.back(); ++j) tokens.push_back(static_cast<int32_t>(rng() % 3));
        }
        if (rng() % 4 == 0 && !live.empty()) {  // abort while the plan is in flight
          EXPECT(s.abort(*live.begin()));
          live.erase(live.begin());
        }
        for (const Finished& f : s.commit(tokens.data(), static_cast<int32_t>(tokens.size()),
                                          counts.data(), static_cast<int32_t>(counts.size())))
          live.erase(f.request_id);
      }
      EXPECT_OK(s.check());
      if (failures) return;
    }
    while (s.has_work()) {
      auto plan = s.schedule();
      std::vector<int32_t> tokens(plan->sample_requests.size(), 1);
      for (const Finished& f : s.commit(tokens.data(), static_cast<int32_t>(tokens.size()), nullptr, 0))
        live.erase(f.request_id);
    }
    EXPECT(live.empty());
    s.flush_cache();
    EXPECT(s.global_pool().num_free() == c.global_pages);
    EXPECT_OK(s.check());
  }
}

}  // namespace

// max_cached bounds what the prefix cache supplies at admission; without it the match is whole.
void test_max_cached_limits_the_match() {
  SchedulerConfig c;
  c.page_size = 4;
  c.global_pages = 64;
  c.context_len = 64;
  Scheduler s(c);
  const std::vector<int32_t> prompt = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17};
  EXPECT(throws<std::invalid_argument>([&] { s.add_request(9, prompt, 1, {}, 0, 0, -2); }));
  const int32_t token = 3;
  auto admit_and_finish = [&](int64_t id, int32_t max_cached) {
    s.add_request(id, prompt, 1, {}, 0, 0, max_cached);
    auto plan = s.schedule();
    EXPECT(plan->num_requests() == 1);
    const int32_t cached = s.request_info(id).cached_tokens;
    EXPECT(s.commit(&token, 1, nullptr, 0).size() == 1);
    EXPECT_OK(s.check());
    return cached;
  };
  EXPECT(admit_and_finish(1, -1) == 0);
  EXPECT(admit_and_finish(2, 6) == 4);   // whole pages within the limit
  EXPECT(admit_and_finish(3, 0) == 0);
  EXPECT(admit_and_finish(4, -1) == 16);
}

int main() {
  test_kv_pool();
  test_radix_match_insert_split();
  test_radix_local_coverage();
  test_scheduler_errors();
  test_finish_reasons_are_counted();
  test_max_cached_limits_the_match();
  test_scheduler_outputs_do_not_depend_on_memory();
  test_random_operations();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("core_test: all checks passed\n");
  return 0;
}
