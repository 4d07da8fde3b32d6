#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <tuple>

namespace pyllama4 {

struct Request {
  int64_t id = 0;
  int64_t arrival = 0;
  std::vector<int32_t> tokens;  // prompt + output
  int32_t prompt_len = 0;
  int32_t max_new_tokens = 0;   // already capped by the context length
  std::vector<int32_t> stop_ids;
  uint64_t extra_key = 0;
  int32_t reserve = 0;
  int32_t max_cached = -1;      // most prompt tokens a prefix match may supply (-1: no limit)
  bool running = false;
  bool in_plan = false;
  bool ended = false;           // ended while in the plan in flight; released at commit
  int32_t num_computed = 0;
  int32_t cached_tokens = 0;
  int32_t num_retractions = 0;
  std::vector<int32_t> global_pages;  // page i holds positions [i * P, (i + 1) * P)
  std::vector<int32_t> local_pages;   // local_pages[j] holds page local_first + j
  int32_t local_first = 0;
  RadixNode* node = nullptr;          // locked end of the cached prefix in use
  int32_t row = -1;                   // block table row while running

  int32_t num_tokens() const { return static_cast<int32_t>(tokens.size()); }
  int32_t output_len() const { return num_tokens() - prompt_len; }
  int32_t pending() const { return num_tokens() - num_computed; }
};

namespace {

int32_t ceil_div(int64_t a, int64_t b) { return static_cast<int32_t>((a + b - 1) / b); }

}  // namespace

void StepPlan::clear() {
  request_ids.clear();
  query_start.assign(1, 0);
  context_lens.clear();
  seq_lens.clear();
  token_ids.clear();
  positions.clear();
  global_slots.clear();
  local_slots.clear();
  rows.clear();
  global_table_index.clear();
  global_table_values.clear();
  local_table_index.clear();
  local_table_values.clear();
  sample_indices.clear();
  sample_requests.clear();
  num_decodes = 0;
  num_retracted = 0;
}

void StepPlan::reserve_like(const StepPlan& o) {
  const size_t R = o.request_ids.size() + 1, T = o.token_ids.size();
  request_ids.reserve(R);
  query_start.reserve(R + 1);
  context_lens.reserve(R);
  seq_lens.reserve(R);
  token_ids.reserve(T);
  positions.reserve(T);
  global_slots.reserve(T);
  local_slots.reserve(T);
  rows.reserve(R);
  sample_indices.reserve(R);
  sample_requests.reserve(R);
}

std::pair<int32_t, int32_t> Scheduler::table_widths(const SchedulerConfig& c) {
  const int32_t global = ceil_div(c.context_len, c.page_size);
  // Local pages held at once span [chunk start of num_computed, end of this step's tokens): fewer
  // than C/P + ceil(extend/P) page indices, extend <= max_step_tokens. A ring of that many
  // columns never maps two held pages to one column.
  const int32_t local =
      c.chunk_size > 0 ? c.chunk_size / c.page_size + ceil_div(c.max_step_tokens, c.page_size) : 0;
  return {global, local};
}

Scheduler::Scheduler(const SchedulerConfig& config) : config_(config) {
  const SchedulerConfig& c = config_;
  if (c.page_size <= 0) throw std::invalid_argument("page_size must be > 0");
  if (c.global_pages <= 0) throw std::invalid_argument("global_pages must be > 0");
  if (c.chunk_size < 0 || c.chunk_size % c.page_size != 0)
    throw std::invalid_argument("chunk_size must be 0 or a positive multiple of page_size");
  if (c.chunk_size > 0 && c.local_pages < c.chunk_size / c.page_size + 1)
    throw std::invalid_argument("local_pages must hold at least chunk_size / page_size + 1 pages");
  if (c.chunk_size == 0 && c.local_pages != 0)
    throw std::invalid_argument("local_pages must be 0 without chunk-local layers (chunk_size 0)");
  if (c.context_len <= 1) throw std::invalid_argument("context_len must be > 1");
  if (c.max_running <= 0) throw std::invalid_argument("max_running must be > 0");
  if (c.max_step_tokens <= 0) throw std::invalid_argument("max_step_tokens must be > 0");
  if (c.init_new_token_ratio < 0 || c.min_new_token_ratio_factor < 0 ||
      c.new_token_ratio_decay_steps <= 0 || c.clip_max_new_tokens < 0)
    throw std::invalid_argument("new-token-ratio settings must be non-negative");
  // A ratio above 1 would reserve more pages than a request can use: one that add_request accepts
  // could then never be admitted.
  if (!(c.init_new_token_ratio <= 1) || !(c.min_new_token_ratio_factor <= 1))
    throw std::invalid_argument("init_new_token_ratio and min_new_token_ratio_factor must be <= 1");
  global_ = std::make_unique<KVPool>(c.global_pages, c.page_size);
  if (c.chunk_size > 0) local_ = std::make_unique<KVPool>(c.local_pages, c.page_size);
  cache_ = std::make_unique<RadixCache>(global_.get(), local_.get(), c.chunk_size);
  std::tie(global_width_, local_width_) = table_widths(c);
  row_owner_.assign(c.max_running, nullptr);
  for (int32_t row = c.max_running - 1; row >= 0; --row) free_rows_.push_back(row);
  new_token_ratio_ = c.init_new_token_ratio;
  min_new_token_ratio_ = c.init_new_token_ratio * c.min_new_token_ratio_factor;
  new_token_ratio_decay_ =
      (c.init_new_token_ratio - min_new_token_ratio_) / c.new_token_ratio_decay_steps;
  plan_ = std::make_shared<StepPlan>();
  plan_->clear();
}

Scheduler::~Scheduler() = default;

void Scheduler::add_request(int64_t request_id, const std::vector<int32_t>& prompt,
                            int32_t max_new_tokens, const std::vector<int32_t>& stop_token_ids,
                            uint64_t extra_key, int32_t reserve, int32_t max_cached) {
  const int32_t P = config_.page_size;
  const int32_t n = static_cast<int32_t>(prompt.size());
  if (requests_.count(request_id))
    throw std::invalid_argument("request id " + std::to_string(request_id) + " is already in use");
  if (n == 0) throw std::invalid_argument("the prompt is empty");
  if (n >= config_.context_len)
    throw std::invalid_argument("the prompt has " + std::to_string(n) +
                                " tokens; the context length is " +
                                std::to_string(config_.context_len) +
                                ", which leaves no room to generate");
  if (max_new_tokens < 1) throw std::invalid_argument("max_new_tokens must be >= 1");
  if (reserve < 0) throw std::invalid_argument("reserve must be >= 0");
  if (max_cached < -1) throw std::invalid_argument("max_cached must be -1 (no limit) or >= 0");
  for (int32_t t : prompt)
    if (t < 0) throw std::invalid_argument("token ids must be >= 0");
  const int32_t max_new = std::min(max_new_tokens, config_.context_len - n);
  const int32_t global_need = ceil_div(static_cast<int64_t>(n) + max_new + reserve, P);
  if (global_need > config_.global_pages)
    throw std::invalid_argument("the request needs " + std::to_string(global_need) +
                                " KV pages of " + std::to_string(P) + " tokens; the pool holds " +
                                std::to_string(config_.global_pages));
  if (int64_t{reserve} + 1 > config_.max_step_tokens)
    throw std::invalid_argument("1 + reserve (" + std::to_string(int64_t{reserve} + 1) +
                                ") exceeds the step token budget " +
                                std::to_string(config_.max_step_tokens));
  if (local_) {
    const int32_t local_need = config_.chunk_size / P + ceil_div(1 + reserve, P);
    if (local_need > config_.local_pages)
      throw std::invalid_argument("reserve " + std::to_string(reserve) +
                                  " does not fit the chunk-local pool");
  }
  auto r = std::make_unique<Request>();
  r->id = request_id;
  r->arrival = arrivals_++;
  r->tokens = prompt;
  r->tokens.reserve(static_cast<size_t>(n) + max_new);
  r->prompt_len = n;
  r->max_new_tokens = max_new;
  r->stop_ids = stop_token_ids;
  r->max_cached = max_cached;
  r->extra_key = extra_key;
  r->reserve = reserve;
  waiting_.push_back(r.get());
  requests_.emplace(request_id, std::move(r));
}

// ---- page arithmetic -------------------------------------------------------------------------

Scheduler::Footprint Scheduler::footprint(const Request& r) {
  return {r.num_computed, static_cast<int32_t>(r.global_pages.size()), r.local_first,
          static_cast<int32_t>(r.local_pages.size())};
}

void Scheduler::pages_for(const Footprint& f, int32_t extend, int32_t* global, int32_t* local) const {
  const int32_t end_page = ceil_div(static_cast<int64_t>(f.num_computed) + extend, config_.page_size);
  *global = std::max(0, end_page - f.global_held);
  *local = local_ ? std::max(0, end_page - (f.local_first + f.local_held)) : 0;
}

int32_t Scheduler::max_extend(const Footprint& f, int32_t want, int32_t avail_global,
                              int32_t avail_local) const {
  const int64_t P = config_.page_size;
  int64_t n = std::min<int64_t>(want, (int64_t{f.global_held} + avail_global) * P - f.num_computed);
  if (local_)
    n = std::min<int64_t>(
        n, (int64_t{f.local_first} + f.local_held + avail_local) * P - f.num_computed);
  return static_cast<int32_t>(std::max<int64_t>(0, n));
}

int32_t Scheduler::future_pages(const Request& r, const Footprint& f, bool local) const {
  const int32_t P = config_.page_size;
  const int32_t remaining_new = std::max(0, r.max_new_tokens - r.output_len());
  const double est_new = std::min(remaining_new, config_.clip_max_new_tokens) * new_token_ratio_;
  const int64_t est_total = std::min<int64_t>(
      config_.context_len, r.num_tokens() + static_cast<int64_t>(std::ceil(est_new)));
  const int32_t end_page = ceil_div(est_total, P);
  if (!local) return std::max(0, end_page - f.global_held);
  // The most local pages a request needs at once, as add_request() checks it against the pool.
  const int32_t peak = config_.chunk_size / P + ceil_div(1 + r.reserve, P);
  return std::max(0, std::min(end_page - f.local_first, peak) - f.local_held);
}

int32_t Scheduler::decode_extend(const Request& r) const {
  return 1 + std::min(r.reserve, config_.context_len - r.num_tokens());
}

bool Scheduler::make_room(int32_t global, int32_t local) {
  if (global > global_->num_free()) cache_->evict(global - global_->num_free());
  if (local_ && local > local_->num_free()) cache_->evict_local(local - local_->num_free());
  return global <= global_->num_free() && (!local_ || local <= local_->num_free());
}

void Scheduler::allocate(Request& r, int32_t extend) {
  int32_t g, l;
  pages_for(footprint(r), extend, &g, &l);
  const int32_t global_from = static_cast<int32_t>(r.global_pages.size());
  const int32_t local_from = r.local_first + static_cast<int32_t>(r.local_pages.size());
  if (!make_room(g, l) || !global_->alloc(g, r.global_pages) ||
      (local_ && !local_->alloc(l, r.local_pages)))
    throw std::logic_error("Scheduler: allocation failed after the page check");
  log_pages(r, global_from, local_from);
}

void Scheduler::log_pages(const Request& r, int32_t global_from, int32_t local_from) {
  for (int32_t i = global_from; i < static_cast<int32_t>(r.global_pages.size()); ++i)
    global_writes_.emplace_back(r.row, i);
  for (int32_t i = local_from; i < r.local_first + static_cast<int32_t>(r.local_pages.size()); ++i)
    local_writes_.emplace_back(r.row, i);
}

void Scheduler::resolve_table_writes() {
  StepPlan& p = *plan_;
  for (const auto& [row, i] : global_writes_) {
    const Request* r = row_owner_[row];
    if (!r || i >= static_cast<int32_t>(r->global_pages.size())) continue;
    p.global_table_index.push_back(int64_t{row} * global_width_ + i);
    p.global_table_values.push_back(r->global_pages[i]);
  }
  for (const auto& [row, i] : local_writes_) {
    const Request* r = row_owner_[row];
    if (!r || i < r->local_first || i >= r->local_first + static_cast<int32_t>(r->local_pages.size()))
      continue;
    p.local_table_index.push_back(int64_t{row} * local_width_ + i % local_width_);
    p.local_table_values.push_back(r->local_pages[i - r->local_first]);
  }
  global_writes_.clear();
  local_writes_.clear();
}

// ---- plan building ---------------------------------------------------------------------------

void Scheduler::emit(Request& r, int32_t known, int32_t extend) {
  const int32_t P = config_.page_size;
  StepPlan& p = *plan_;
  const int32_t index = p.num_requests();
  const int32_t start = r.num_computed;
  const int32_t seq_len = start + extend;
  p.request_ids.push_back(r.id);
  p.context_lens.push_back(start);
  p.seq_lens.push_back(seq_len);
  for (int32_t pos = start; pos < seq_len; ++pos) {
    const int32_t page = pos / P, offset = pos % P;
    p.token_ids.push_back(pos < start + known ? r.tokens[pos] : r.tokens.back());
    p.positions.push_back(pos);
    p.global_slots.push_back(r.global_pages[page] * P + offset);
    p.local_slots.push_back(local_ ? r.local_pages[page - r.local_first] * P + offset : -1);
  }
  p.query_start.push_back(p.num_tokens());
  p.rows.push_back(r.row);
  if (start + known == r.num_tokens()) {
    p.sample_indices.push_back(p.query_start[index] + known - 1);
    p.sample_requests.push_back(index);
  }
  r.in_plan = true;
  plan_requests_.push_back(&r);
  plan_known_.push_back(known);
}

Request* Scheduler::pick_victim(const Request* keep) {
  Request* victim = nullptr;
  for (Request* r : running_) {
    if (r == keep) continue;
    if (!victim || r->output_len() < victim->output_len() ||
        (r->output_len() == victim->output_len() &&
         (r->prompt_len > victim->prompt_len ||
          (r->prompt_len == victim->prompt_len && r->arrival > victim->arrival))))
      victim = r;
  }
  return victim;
}

void Scheduler::insert_prefix(Request& r, int32_t full) {
  const int32_t P = config_.page_size;
  if (full == 0) return;
  std::vector<int32_t> local_aligned;
  if (local_) {
    local_aligned.assign(full, -1);
    const int32_t end = std::min(full, r.local_first + static_cast<int32_t>(r.local_pages.size()));
    for (int32_t i = r.local_first; i < end; ++i) local_aligned[i] = r.local_pages[i - r.local_first];
  }
  cache_->insert(r.extra_key, r.tokens.data(), full * P, r.global_pages.data(),
                 local_ ? local_aligned.data() : nullptr);
}

void Scheduler::cache_unfinished(Request& r) {
  const int32_t P = config_.page_size;
  // With chunk-local layers, share only whole chunks while running: local pages of the current
  // chunk put in the tree would stay locked by this request's path after it leaves the chunk, so
  // a running request would pin local pages of every chunk it has passed (O(prompt), not O(chunk)).
  // Its last chunk is cached when it finishes.
  const int32_t n =
      local_ ? cache_->chunk_first_page(r.num_computed) * P : r.num_computed / P * P;
  // Never shorten the locked path: the request shares every page on it.
  const int32_t locked = r.node ? r.node->end_page() * P : 0;
  if (n <= locked) return;
  insert_prefix(r, n / P);
  MatchResult m = cache_->match_prefix(r.extra_key, r.tokens.data(), n, /*count_lookup=*/false);
  if (m.length <= locked) return;
  cache_->lock(m.node);
  if (r.node) cache_->unlock(r.node);
  r.node = m.length > 0 ? m.node : nullptr;
  auto share = [&r](KVPool& pool, int32_t& mine, int32_t tree, int32_t index,
                    std::vector<std::pair<int32_t, int32_t>>& writes) {
    if (mine == tree) return;
    pool.ref(tree);
    pool.unref(mine);
    mine = tree;
    writes.emplace_back(r.row, index);
  };
  const int32_t pages = m.length / P;
  for (int32_t i = 0; i < pages; ++i)
    share(*global_, r.global_pages[i], m.global_pages[i], i, global_writes_);
  if (!local_) return;
  for (int32_t i = std::max(m.local_first_page, r.local_first); i < pages; ++i)
    share(*local_, r.local_pages[i - r.local_first], m.local_pages[i - m.local_first_page], i,
          local_writes_);
}

void Scheduler::release(Request& r, bool cache_prefix) {
  if (cache_prefix && config_.enable_prefix_cache)
    insert_prefix(r, r.num_computed / config_.page_size);
  for (int32_t page : r.global_pages) global_->unref(page);
  for (int32_t page : r.local_pages) local_->unref(page);
  r.global_pages.clear();
  r.local_pages.clear();
  r.local_first = 0;
  if (r.node) cache_->unlock(r.node);
  r.node = nullptr;
  if (r.row >= 0) {
    row_owner_[r.row] = nullptr;
    free_rows_.push_back(r.row);
    r.row = -1;
  }
}

void Scheduler::retract(Request& r) {
  release(r, /*cache_prefix=*/false);
  r.num_computed = 0;
  r.running = false;
  ++r.num_retractions;
  ++counters_.num_retractions;
  ++plan_->num_retracted;
  running_.erase(std::find(running_.begin(), running_.end(), &r));
  waiting_.push_front(&r);
}

bool Scheduler::admit(Request& r, int32_t budget, int32_t reserved_global, int32_t reserved_local) {
  MatchResult m;
  if (config_.enable_prefix_cache) {
    m = cache_->match_prefix(r.extra_key, r.tokens.data(), match_limit(r));
    cache_->lock(m.node);
  }
  // Judge the request as it would stand with the match applied: this step's chunk must fit what
  // is free or evictable now, and all the pages it is expected to need beyond the match must fit
  // beside the running requests' reservations.
  const Footprint f{m.length, static_cast<int32_t>(m.global_pages.size()), m.local_first_page,
                    static_cast<int32_t>(m.local_pages.size())};
  const int32_t avail_g = global_->num_free() + cache_->evictable_global_pages();
  const int32_t avail_l = local_ ? local_->num_free() + cache_->evictable_local_pages() : 0;
  const bool fits = future_pages(r, f, false) <= avail_g - reserved_global &&
                    (!local_ || future_pages(r, f, true) <= avail_l - reserved_local);
  const int32_t extend =
      fits ? max_extend(f, std::min(r.num_tokens() - m.length, budget), avail_g, avail_l) : 0;
  if (extend <= 0) {
    cache_->unlock(m.node);
    return false;
  }
  for (int32_t page : m.global_pages) global_->ref(page);
  for (int32_t page : m.local_pages) local_->ref(page);
  r.global_pages = std::move(m.global_pages);
  r.local_pages = std::move(m.local_pages);
  r.local_first = m.local_first_page;
  r.num_computed = m.length;
  r.node = m.length > 0 ? m.node : nullptr;
  r.cached_tokens = m.length;
  r.running = true;
  r.row = free_rows_.back();
  free_rows_.pop_back();
  row_owner_[r.row] = &r;
  log_pages(r, 0, r.local_first);
  counters_.prompt_tokens += r.num_tokens();
  counters_.cached_tokens += m.length;
  running_.push_back(&r);
  allocate(r, extend);
  emit(r, extend, extend);
  return true;
}

int32_t Scheduler::match_limit(const Request& r) {
  const int32_t all = r.num_tokens() - 1;  // the last known token is always computed
  return r.max_cached < 0 ? all : std::min(all, r.max_cached);
}

void Scheduler::order_waiting() {
  if (config_.policy != Policy::kLpm || waiting_.size() < 2 || waiting_.size() > 128 ||
      !config_.enable_prefix_cache)
    return;
  std::vector<std::pair<int32_t, Request*>> keyed;
  keyed.reserve(waiting_.size());
  for (Request* r : waiting_)
    keyed.emplace_back(cache_->peek_prefix(r->extra_key, r->tokens.data(), match_limit(*r)), r);
  std::stable_sort(keyed.begin(), keyed.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = 0; i < keyed.size(); ++i) waiting_[i] = keyed[i].second;
}

std::shared_ptr<const StepPlan> Scheduler::schedule() {
  if (in_flight_) throw std::logic_error("schedule(): the previous plan was not committed");
  // Reuse a plan buffer that no caller holds any more; allocate only while callers keep plans.
  std::shared_ptr<StepPlan> next;
  for (auto& buffer : plan_buffers_)
    if (buffer != plan_ && buffer.use_count() == 1) next = buffer;
  if (!next) {
    next = std::make_shared<StepPlan>();
    next->reserve_like(*plan_);
    if (plan_buffers_.size() < 4) plan_buffers_.push_back(next);
  }
  next->clear();
  plan_ = std::move(next);
  plan_requests_.clear();
  plan_known_.clear();
  ++counters_.num_steps;
  bool dropped_local = false;  // step 4's last resort ran in this call
  for (;;) {
    // 1. Decodes: every running request whose prompt is done. Retract until they all fit.
    std::vector<Request*>& decodes = decodes_;
    std::vector<Request*>& prefills = prefills_;
    decodes.clear();
    prefills.clear();
    int32_t need_g = 0, need_l = 0;
    for (Request* r : running_) {
      if (r->pending() != 1) {
        prefills.push_back(r);
        continue;
      }
      decodes.push_back(r);
      int32_t g, l;
      pages_for(footprint(*r), decode_extend(*r), &g, &l);
      need_g += g;
      need_l += l;
    }
    auto avail_g = [&] { return global_->num_free() + cache_->evictable_global_pages(); };
    auto avail_l = [&] { return local_ ? local_->num_free() + cache_->evictable_local_pages() : 0; };
    bool retracted = false;
    while (need_g > avail_g() || need_l > avail_l()) {
      // A lone request that does not fit can only be blocked by local pages its own locked path
      // pins (see step 4): retract it as well and let step 4 drop them.
      Request* victim = running_.size() > 1             ? pick_victim(nullptr)
                        : local_ && !dropped_local ? running_.front()
                                                   : nullptr;
      if (!victim) throw std::logic_error("Scheduler: a single request does not fit the KV pools");
      auto it = std::find(decodes.begin(), decodes.end(), victim);
      if (it != decodes.end()) {
        int32_t g, l;
        pages_for(footprint(*victim), decode_extend(*victim), &g, &l);
        need_g -= g;
        need_l -= l;
        decodes.erase(it);
      } else {
        prefills.erase(std::find(prefills.begin(), prefills.end(), victim));
      }
      retract(*victim);
      retracted = true;
    }
    if (retracted && !running_.empty()) {
      int64_t decoded = 0, max_new = 0;
      for (Request* r : running_) {
        decoded += r->output_len();
        max_new += r->max_new_tokens;
      }
      const double ratio = static_cast<double>(decoded + int64_t{config_.retract_decode_steps} *
                                                             static_cast<int64_t>(running_.size())) /
                           static_cast<double>(std::max<int64_t>(1, max_new));
      new_token_ratio_ = std::min(1.0, std::max(new_token_ratio_, ratio));
    }
    if (!make_room(need_g, need_l)) throw std::logic_error("Scheduler: decode pages vanished");
    int32_t budget = config_.max_step_tokens;
    for (Request* r : decodes) {
      const int32_t extend = decode_extend(*r);
      allocate(*r, extend);
      emit(*r, 1, extend);
      budget -= extend;
    }
    plan_->num_decodes = plan_->num_requests();
    budget = std::max(0, budget);

    // 2. Continuing prefill chunks, oldest admission first.
    for (Request* r : prefills) {
      if (budget == 0) break;
      const int32_t extend =
          max_extend(footprint(*r), std::min(r->pending(), budget), avail_g(), avail_l());
      if (extend == 0) continue;
      allocate(*r, extend);
      emit(*r, extend, extend);
      budget -= extend;
    }

    // 3. Admissions, unless this step had to retract.
    if (!retracted && budget > 0 && !waiting_.empty()) {
      int32_t reserved_g = 0, reserved_l = 0;
      for (Request* r : running_) {
        reserved_g += future_pages(*r, footprint(*r), false);
        if (local_) reserved_l += future_pages(*r, footprint(*r), true);
      }
      order_waiting();
      while (!waiting_.empty() && budget > 0 &&
             static_cast<int32_t>(running_.size()) < config_.max_running) {
        Request* r = waiting_.front();
        if (!admit(*r, budget, reserved_g, reserved_l)) break;
        waiting_.pop_front();
        budget -= plan_known_.back();
        reserved_g += future_pages(*r, footprint(*r), false);
        if (local_) reserved_l += future_pages(*r, footprint(*r), true);
      }
    }

    // 4. Nothing scheduled although requests wait or run.
    if (plan_->num_requests() > 0 || (running_.empty() && waiting_.empty())) break;
    // Running requests that cannot move at all hold each other's pages: free one and retry.
    if (running_.size() > 1) {
      retract(*pick_victim(running_.front()));
      continue;
    }
    // A lone running request, or the head of the queue with nothing running, always fits the pools
    // (add_request checked it) unless the cache pins what it needs: a locked path pins the local
    // pages of every node on it, including chunks that its requests have left. As a last resort,
    // retract the lone request, drop every unlocked local page of the cache and admit again; the
    // matches then end at chunk boundaries, which need no local pages.
    if (!local_ || dropped_local)
      throw std::logic_error("Scheduler: a single request does not fit the KV pools");
    if (!running_.empty()) retract(*running_.front());
    cache_->evict_local(cache_->evictable_local_pages());
    dropped_local = true;
  }
  if (plan_->num_requests() > 0) resolve_table_writes();
  in_flight_ = plan_->num_requests() > 0;
  return plan_;
}

// ---- commit ----------------------------------------------------------------------------------

void Scheduler::release_old_local_pages(Request& r) {
  if (!local_) return;
  const int32_t first = cache_->chunk_first_page(r.num_computed);
  const int32_t drop = std::min(first - r.local_first, static_cast<int32_t>(r.local_pages.size()));
  if (drop <= 0) return;
  for (int32_t i = 0; i < drop; ++i) local_->unref(r.local_pages[i]);
  r.local_pages.erase(r.local_pages.begin(), r.local_pages.begin() + drop);
  r.local_first = first;
}

void Scheduler::finish(Request& r, FinishReason reason) {
  finished_.push_back({r.id, reason, r.output_len()});
  count(reason);
  release(r, /*cache_prefix=*/true);
  r.running = false;
}

void Scheduler::count(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: ++counters_.num_finished_stop; break;
    case FinishReason::kLength: ++counters_.num_finished_length; break;
    case FinishReason::kAbort: ++counters_.num_aborted; break;
  }
}

std::vector<Finished> Scheduler::commit(const int32_t* tokens, int32_t num_tokens,
                                        const int32_t* counts, int32_t num_counts) {
  finished_.clear();
  if (!in_flight_) {
    if (num_tokens == 0 && num_counts == 0) return finished_;
    throw std::logic_error("commit(): no plan in flight");
  }
  const int32_t num_samples = static_cast<int32_t>(plan_->sample_requests.size());
  if (counts) {
    if (num_counts != num_samples)
      throw std::invalid_argument("commit(): expected " + std::to_string(num_samples) + " counts");
    int64_t total = 0;
    for (int32_t s = 0; s < num_samples; ++s) {
      const int32_t i = plan_->sample_requests[s];
      const int32_t slots = plan_->seq_lens[i] - plan_->context_lens[i] - plan_known_[i];
      if (counts[s] < 1 || counts[s] > 1 + slots)
        throw std::invalid_argument("commit(): count " + std::to_string(counts[s]) +
                                    " out of range for request " +
                                    std::to_string(plan_->request_ids[i]));
      total += counts[s];
    }
    if (total != num_tokens) throw std::invalid_argument("commit(): counts do not add up to tokens");
  } else if (num_tokens != num_samples) {
    throw std::invalid_argument("commit(): expected " + std::to_string(num_samples) +
                                " tokens, one per sampling request");
  }
  for (int32_t i = 0; i < num_tokens; ++i)
    if (tokens[i] < 0) throw std::invalid_argument("commit(): token ids must be >= 0");

  int32_t cursor = 0, s = 0;
  bool any_done = false;
  for (size_t i = 0; i < plan_requests_.size(); ++i) {
    Request& r = *plan_requests_[i];
    r.in_plan = false;
    int32_t k = 0;
    if (s < num_samples && plan_->sample_requests[s] == static_cast<int32_t>(i)) {
      k = counts ? counts[s] : 1;
      ++s;
    }
    const int32_t* fresh = tokens + cursor;
    cursor += k;
    if (r.ended) {
      release(r, /*cache_prefix=*/true);
      r.running = false;
      any_done = true;
      continue;
    }
    r.num_computed += plan_known_[i] + std::max(0, k - 1);
    bool done = false;
    FinishReason reason = FinishReason::kStop;
    for (int32_t j = 0; j < k && !done; ++j) {
      r.tokens.push_back(fresh[j]);
      if (std::find(r.stop_ids.begin(), r.stop_ids.end(), fresh[j]) != r.stop_ids.end()) {
        done = true;
      } else if (r.output_len() >= r.max_new_tokens || r.num_tokens() >= config_.context_len) {
        done = true;
        reason = FinishReason::kLength;
      }
    }
    r.num_computed = std::min(r.num_computed, r.num_tokens());
    if (done) {
      finish(r, reason);
      any_done = true;
      continue;
    }
    release_old_local_pages(r);
    if (static_cast<int32_t>(i) >= plan_->num_decodes && config_.enable_prefix_cache)
      cache_unfinished(r);
  }
  in_flight_ = false;
  if (any_done) {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const Request* r) { return !r->running; }),
                   running_.end());
    for (Request* r : plan_requests_)
      if (!r->running) requests_.erase(r->id);
  }
  plan_requests_.clear();
  if (plan_->num_decodes > 0)
    new_token_ratio_ = std::max(min_new_token_ratio_, new_token_ratio_ - new_token_ratio_decay_);
  if (!has_work()) new_token_ratio_ = config_.init_new_token_ratio;
  return finished_;
}

bool Scheduler::end(int64_t request_id, FinishReason reason) {
  auto it = requests_.find(request_id);
  if (it == requests_.end() || it->second->ended) return false;
  Request& r = *it->second;
  count(reason);
  if (!r.running) {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), &r));
    requests_.erase(it);
    return true;
  }
  if (r.in_plan) {
    r.ended = true;
    return true;
  }
  release(r, /*cache_prefix=*/true);
  running_.erase(std::find(running_.begin(), running_.end(), &r));
  requests_.erase(it);
  if (!has_work()) new_token_ratio_ = config_.init_new_token_ratio;
  return true;
}

// ---- queries ---------------------------------------------------------------------------------

RequestInfo Scheduler::request_info(int64_t request_id) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end())
    throw std::out_of_range("unknown request id " + std::to_string(request_id));
  const Request& r = *it->second;
  RequestInfo info;
  info.running = r.running;
  info.num_tokens = r.num_tokens();
  info.num_output_tokens = r.output_len();
  info.num_computed = r.num_computed;
  info.cached_tokens = r.cached_tokens;
  info.num_retractions = r.num_retractions;
  info.global_pages = static_cast<int32_t>(r.global_pages.size());
  info.local_pages = static_cast<int32_t>(r.local_pages.size());
  return info;
}

std::vector<int32_t> Scheduler::request_tokens(int64_t request_id) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end())
    throw std::out_of_range("unknown request id " + std::to_string(request_id));
  return it->second->tokens;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s = counters_;
  s.num_waiting = static_cast<int32_t>(waiting_.size());
  s.num_running = static_cast<int32_t>(running_.size());
  s.global_total = global_->num_pages();
  s.global_free = global_->num_free();
  s.global_cached = cache_->cached_global_pages();
  s.global_evictable = cache_->evictable_global_pages();
  if (local_) {
    s.local_total = local_->num_pages();
    s.local_free = local_->num_free();
    s.local_cached = cache_->cached_local_pages();
    s.local_evictable = cache_->evictable_local_pages();
  }
  s.new_token_ratio = new_token_ratio_;
  return s;
}

int32_t Scheduler::flush_cache() { return cache_->evict(cache_->evictable_global_pages()); }

std::string Scheduler::check() const {
  std::string e = global_->check();
  if (!e.empty()) return "global pool: " + e;
  if (local_ && !(e = local_->check()).empty()) return "local pool: " + e;
  if (!(e = cache_->check()).empty()) return "radix cache: " + e;

  const int32_t P = config_.page_size;
  struct Books {
    std::vector<int32_t> refs;    // expected reference count
    std::vector<char> in_tree;
    std::vector<int64_t> owner;   // request holding a page that is not in the tree (-1: none)
  };
  auto books_for = [](const KVPool& pool) {
    Books b;
    b.refs.assign(pool.num_pages(), 0);
    b.in_tree.assign(pool.num_pages(), 0);
    b.owner.assign(pool.num_pages(), -1);
    return b;
  };
  Books g = books_for(*global_);
  Books l = local_ ? books_for(*local_) : Books{};
  std::vector<int32_t> tree_g, tree_l;
  cache_->collect_pages(tree_g, tree_l);
  for (int32_t p : tree_g) g.refs[p]++, g.in_tree[p] = 1;
  for (int32_t p : tree_l) l.refs[p]++, l.in_tree[p] = 1;

  std::unordered_map<const RadixNode*, int32_t> locks;
  size_t num_running = 0;
  for (const auto& kv : requests_) {
    const Request& r = *kv.second;
    const std::string name = "request " + std::to_string(r.id);
    if (!r.running) {
      if (!r.global_pages.empty() || !r.local_pages.empty() || r.node || r.num_computed != 0)
        return name + " is waiting but holds KV";
      continue;
    }
    ++num_running;
    if (r.row < 0 || r.row >= config_.max_running || row_owner_[r.row] != &r)
      return name + " does not own its block table row";
    if (r.num_computed > r.num_tokens()) return name + " computed more tokens than it has";
    if (static_cast<int32_t>(r.global_pages.size()) < ceil_div(r.num_computed, P))
      return name + " lacks global pages for its computed tokens";
    if (local_) {
      if (r.local_first != cache_->chunk_first_page(r.num_computed))
        return name + " holds local pages of an earlier chunk";
      if (r.local_first + static_cast<int32_t>(r.local_pages.size()) < ceil_div(r.num_computed, P))
        return name + " lacks local pages for its current chunk";
    }
    auto take = [&](Books& b, const std::vector<int32_t>& pages, const char* pool) -> std::string {
      for (int32_t p : pages) {
        b.refs[p]++;
        if (b.in_tree[p]) continue;
        if (b.owner[p] != -1)
          return std::string(pool) + " page " + std::to_string(p) + " is owned twice";
        b.owner[p] = r.id;
      }
      return "";
    };
    if (!(e = take(g, r.global_pages, "global")).empty()) return e;
    if (!(e = take(l, r.local_pages, "local")).empty()) return e;
    for (const RadixNode* n = r.node; n && n != cache_->root(); n = n->parent) locks[n]++;
  }
  if (num_running != running_.size()) return "running queue does not match running requests";
  if (free_rows_.size() + num_running != row_owner_.size())
    return "block table rows leaked: " + std::to_string(free_rows_.size()) + " free, " +
           std::to_string(num_running) + " running";
  if (waiting_.size() + running_.size() != requests_.size()) return "queues lose requests";
  auto balance = [&](const KVPool& pool, const Books& b, int32_t cached, const char* name) {
    int32_t held = 0;
    for (int32_t p = 0; p < pool.num_pages(); ++p) {
      if (pool.ref_count(p) != b.refs[p])
        return std::string(name) + " page " + std::to_string(p) + " has " +
               std::to_string(pool.ref_count(p)) + " references but " + std::to_string(b.refs[p]) +
               " holders";
      held += b.refs[p] > 0 && !b.in_tree[p];
    }
    if (pool.num_free() + held + cached != pool.num_pages())
      return std::string(name) + ": free + held + cached != total";
    return std::string();
  };
  if (!(e = balance(*global_, g, cache_->cached_global_pages(), "global")).empty()) return e;
  if (local_ && !(e = balance(*local_, l, cache_->cached_local_pages(), "local")).empty()) return e;
  for (int32_t id = 1; id < cache_->id_limit(); ++id) {
    const RadixNode* n = cache_->node_by_id(id);
    if (!n) continue;
    auto it = locks.find(n);
    if (n->lock_ref != (it == locks.end() ? 0 : it->second))
      return "node " + std::to_string(id) + " lock count disagrees with its requests";
  }
  return "";
}

}  // namespace pyllama4
