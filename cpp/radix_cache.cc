#include "radix_cache.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pyllama4 {

namespace {

uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h ^= h >> 31;
  h *= 0xbf58476d1ce4e5b9ULL;
  return h ^ (h >> 29);
}

}  // namespace

RadixCache::RadixCache(KVPool* global, KVPool* local, int32_t chunk_size)
    : global_(global), local_(local), page_size_(global ? global->page_size() : 0),
      chunk_size_(chunk_size) {
  if (!global) throw std::invalid_argument("RadixCache: a global pool is required");
  if (chunk_size < 0) throw std::invalid_argument("RadixCache: chunk_size must be >= 0");
  if ((chunk_size == 0) != (local == nullptr))
    throw std::invalid_argument("RadixCache: a local pool is needed exactly when chunk_size > 0");
  if (local && local->page_size() != page_size_)
    throw std::invalid_argument("RadixCache: both pools must have the same page size");
  if (chunk_size % page_size_ != 0)
    throw std::invalid_argument("RadixCache: chunk_size must be a multiple of the page size");
  nodes_.push_back(std::make_unique<RadixNode>());
  root_ = nodes_[0].get();
}

RadixCache::~RadixCache() = default;

int32_t RadixCache::chunk_first_page(int32_t position) const {
  if (chunk_size_ == 0) return 0;
  return position / chunk_size_ * (chunk_size_ / page_size_);
}

bool RadixCache::page_equal(const int32_t* a, const int32_t* b) const {
  return std::memcmp(a, b, sizeof(int32_t) * page_size_) == 0;
}

uint64_t RadixCache::child_hash(uint64_t extra_key, bool at_root, const int32_t* page) const {
  uint64_t h = at_root ? mix(0x6a09e667f3bcc909ULL, extra_key) : 0x6a09e667f3bcc909ULL;
  for (int32_t i = 0; i < page_size_; ++i) h = mix(h, static_cast<uint32_t>(page[i]));
  return h;
}

RadixNode* RadixCache::node_by_id(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(nodes_.size())) return nullptr;
  return nodes_[id].get();
}

RadixNode* RadixCache::new_node(RadixNode* parent, uint64_t extra_key, int32_t start_page) {
  int32_t id;
  if (!free_ids_.empty()) {
    id = free_ids_.back();
    free_ids_.pop_back();
    nodes_[id] = std::make_unique<RadixNode>();
  } else {
    id = static_cast<int32_t>(nodes_.size());
    nodes_.push_back(std::make_unique<RadixNode>());
  }
  RadixNode* node = nodes_[id].get();
  node->id = id;
  node->parent = parent;
  node->extra_key = extra_key;
  node->start_page = start_page;
  return node;
}

void RadixCache::forget(RadixNode* node) {
  if (node->in_leaf_set) leaf_set_.erase(node->leaf_entry);
  if (node->in_local_set) local_set_.erase(node->local_entry);
  int32_t id = node->id;
  nodes_[id].reset();
  free_ids_.push_back(id);
}

void RadixCache::refresh(RadixNode* node) {
  if (node == root_) return;
  if (node->in_leaf_set) leaf_set_.erase(node->leaf_entry);
  if (node->in_local_set) local_set_.erase(node->local_entry);
  node->in_leaf_set = node->in_local_set = false;
  if (node->lock_ref > 0) return;
  if (node->children.empty()) {
    node->leaf_entry = {node->last_access, -node->end_page(), node->id};
    leaf_set_.insert(node->leaf_entry);
    node->in_leaf_set = true;
  }
  if (node->num_local > 0) {
    int32_t last = node->num_pages() - 1;
    while (node->local_pages[last] < 0) --last;
    node->local_entry = {node->last_access, -(node->start_page + last + 1), node->id};
    local_set_.insert(node->local_entry);
    node->in_local_set = true;
  }
}

void RadixCache::touch_path(RadixNode* node) {
  for (; node != root_; node = node->parent) {
    node->last_access = clock_;
    refresh(node);
  }
}

void RadixCache::add_counts(RadixNode* node, int32_t global, int32_t local) {
  cached_global_ += global;
  cached_local_ += local;
  if (node->lock_ref == 0) {
    evictable_global_ += global;
    evictable_local_ += local;
  }
}

RadixCache::Walk RadixCache::walk(uint64_t extra_key, const int32_t* tokens,
                                  int32_t num_pages) const {
  Walk w;
  w.node = root_;
  RadixNode* node = root_;
  int32_t pos = 0;
  while (pos < num_pages) {
    auto it = node->children.find(child_hash(extra_key, node == root_, tokens + pos * page_size_));
    if (it == node->children.end()) break;
    RadixNode* child = it->second;
    if (child->extra_key != extra_key) break;
    int32_t limit = std::min(child->num_pages(), num_pages - pos);
    int32_t k = 0;
    while (k < limit &&
           page_equal(child->key.data() + k * page_size_, tokens + (pos + k) * page_size_))
      ++k;
    if (k == 0) break;  // hash collision: treat as a miss
    w.node = child;
    w.pages_in_node = k;
    pos += k;
    if (k < child->num_pages()) break;
    node = child;
  }
  w.pages = pos;
  return w;
}

int32_t RadixCache::usable_pages(const Walk& w) const {
  if (!local_ || w.pages == 0) return w.pages;
  const int32_t first = chunk_first_page(w.pages * page_size_);
  int32_t first_missing = w.pages;
  const RadixNode* node = w.node;
  for (int32_t idx = w.pages - 1; idx >= first;) {
    while (idx < node->start_page) node = node->parent;
    if (node->num_local == node->num_pages()) {
      idx = node->start_page - 1;
      continue;
    }
    if (node->local_pages[idx - node->start_page] < 0) first_missing = idx;
    --idx;
  }
  return first_missing;
}

RadixNode* RadixCache::split(RadixNode* node, int32_t k) {
  RadixNode* parent = node->parent;
  RadixNode* mid = new_node(parent, node->extra_key, node->start_page);
  const int32_t tokens = k * page_size_;
  mid->key.assign(node->key.begin(), node->key.begin() + tokens);
  mid->global_pages.assign(node->global_pages.begin(), node->global_pages.begin() + k);
  mid->local_pages.assign(node->local_pages.begin(), node->local_pages.begin() + k);
  mid->num_local = static_cast<int32_t>(
      std::count_if(mid->local_pages.begin(), mid->local_pages.end(), [](int32_t p) { return p >= 0; }));
  mid->lock_ref = node->lock_ref;
  mid->last_access = node->last_access;
  mid->link = node->link;
  parent->children[mid->link] = mid;

  node->key.erase(node->key.begin(), node->key.begin() + tokens);
  node->global_pages.erase(node->global_pages.begin(), node->global_pages.begin() + k);
  node->local_pages.erase(node->local_pages.begin(), node->local_pages.begin() + k);
  node->num_local -= mid->num_local;
  node->start_page += k;
  node->parent = mid;
  node->link = child_hash(node->extra_key, false, node->key.data());
  mid->children[node->link] = node;
  refresh(mid);
  refresh(node);
  return mid;
}

int32_t RadixCache::peek_prefix(uint64_t extra_key, const int32_t* tokens, int32_t n) const {
  return usable_pages(walk(extra_key, tokens, n / page_size_)) * page_size_;
}

MatchResult RadixCache::match_prefix(uint64_t extra_key, const int32_t* tokens, int32_t n,
                                     bool count_lookup) {
  MatchResult result;
  const Walk w = walk(extra_key, tokens, n / page_size_);
  const int32_t pages = usable_pages(w);
  if (count_lookup) {
    ++stats_.lookups;
    stats_.lookup_tokens += int64_t{n / page_size_} * page_size_;
    stats_.hit_tokens += int64_t{pages} * page_size_;
  }
  RadixNode* node = w.node;
  while (node != root_ && node->start_page >= pages) node = node->parent;
  if (node != root_ && node->end_page() > pages) node = split(node, pages - node->start_page);
  result.node = node;
  result.length = pages * page_size_;
  if (pages == 0) return result;
  ++clock_;
  touch_path(node);

  result.global_pages.resize(pages);
  result.local_first_page = chunk_first_page(result.length);
  if (local_) result.local_pages.resize(pages - result.local_first_page);
  for (RadixNode* n2 = node; n2 != root_; n2 = n2->parent) {
    std::copy(n2->global_pages.begin(), n2->global_pages.end(),
              result.global_pages.begin() + n2->start_page);
    if (!local_) continue;
    for (int32_t i = std::max(0, result.local_first_page - n2->start_page); i < n2->num_pages(); ++i)
      result.local_pages[n2->start_page + i - result.local_first_page] = n2->local_pages[i];
  }
  return result;
}

int32_t RadixCache::insert(uint64_t extra_key, const int32_t* tokens, int32_t n,
                           const int32_t* global_pages, const int32_t* local_pages) {
  if (n < 0 || n % page_size_ != 0)
    throw std::invalid_argument("RadixCache::insert: length must be a multiple of the page size");
  const int32_t num_pages = n / page_size_;
  // Every page must be live (the caller holds it): check them all before changing anything, so
  // that a bad id throws (out_of_range / logic_error, as KVPool::ref would) with the tree intact.
  for (int32_t i = 0; i < num_pages; ++i) {
    if (global_->ref_count(global_pages[i]) == 0)
      throw std::logic_error("RadixCache::insert: global page " + std::to_string(global_pages[i]) +
                             " is free");
    if (local_ && local_pages && local_pages[i] >= 0 && local_->ref_count(local_pages[i]) == 0)
      throw std::logic_error("RadixCache::insert: local page " + std::to_string(local_pages[i]) +
                             " is free");
  }
  ++clock_;
  RadixNode* node = root_;
  int32_t pos = 0, present = 0;
  while (pos < num_pages) {
    const int32_t* page = tokens + pos * page_size_;
    const uint64_t h = child_hash(extra_key, node == root_, page);
    auto it = node->children.find(h);
    if (it == node->children.end()) {
      RadixNode* leaf = new_node(node, extra_key, pos);
      leaf->link = h;
      node->children[h] = leaf;
      leaf->key.assign(page, tokens + n);
      leaf->global_pages.assign(global_pages + pos, global_pages + num_pages);
      leaf->local_pages.assign(num_pages - pos, -1);
      for (int32_t i = pos; i < num_pages; ++i) {
        global_->ref(global_pages[i]);
        if (local_ && local_pages && local_pages[i] >= 0) {
          local_->ref(local_pages[i]);
          leaf->local_pages[i - pos] = local_pages[i];
          ++leaf->num_local;
        }
      }
      add_counts(leaf, leaf->num_pages(), leaf->num_local);
      stats_.inserted_tokens += int64_t{leaf->num_pages()} * page_size_;
      node = leaf;
      break;
    }
    RadixNode* child = it->second;
    if (child->extra_key != extra_key) break;
    const int32_t limit = std::min(child->num_pages(), num_pages - pos);
    int32_t k = 0;
    while (k < limit &&
           page_equal(child->key.data() + k * page_size_, tokens + (pos + k) * page_size_))
      ++k;
    if (k == 0) break;  // hash collision: leave the rest uncached
    if (k < child->num_pages()) child = split(child, k);
    if (local_ && local_pages) {
      for (int32_t i = 0; i < k; ++i) {
        const int32_t page_id = local_pages[pos + i];
        if (child->local_pages[i] >= 0 || page_id < 0) continue;
        local_->ref(page_id);
        child->local_pages[i] = page_id;
        ++child->num_local;
        add_counts(child, 0, 1);
      }
    }
    pos += k;
    present = pos;
    node = child;
  }
  touch_path(node);
  return present * page_size_;
}

void RadixCache::lock(RadixNode* node) {
  for (; node && node != root_; node = node->parent) {
    if (node->lock_ref++ == 0) {
      evictable_global_ -= node->num_pages();
      evictable_local_ -= node->num_local;
      refresh(node);
    }
  }
}

void RadixCache::unlock(RadixNode* node) {
  for (; node && node != root_; node = node->parent) {
    if (node->lock_ref <= 0) throw std::logic_error("RadixCache::unlock: node is not locked");
    if (--node->lock_ref == 0) {
      evictable_global_ += node->num_pages();
      evictable_local_ += node->num_local;
      refresh(node);
    }
  }
}

void RadixCache::delete_leaf(RadixNode* node) {
  RadixNode* parent = node->parent;
  parent->children.erase(node->link);
  forget(node);
  refresh(parent);
}

int32_t RadixCache::evict(int32_t n) {
  int32_t freed = 0;
  while (freed < n && !leaf_set_.empty()) {
    RadixNode* leaf = nodes_[std::get<2>(*leaf_set_.begin())].get();
    const int32_t keep = std::max(0, leaf->num_pages() - (n - freed));
    int32_t dropped_local = 0;
    for (int32_t i = keep; i < leaf->num_pages(); ++i) {
      global_->unref(leaf->global_pages[i]);
      if (leaf->local_pages[i] >= 0) {
        local_->unref(leaf->local_pages[i]);
        ++dropped_local;
      }
    }
    const int32_t dropped = leaf->num_pages() - keep;
    stats_.evicted_global_pages += dropped;
    stats_.evicted_local_pages += dropped_local;
    cached_global_ -= dropped;
    evictable_global_ -= dropped;
    cached_local_ -= dropped_local;
    evictable_local_ -= dropped_local;
    freed += dropped;
    if (keep == 0) {
      delete_leaf(leaf);
      continue;
    }
    leaf->num_local -= dropped_local;
    leaf->global_pages.resize(keep);
    leaf->local_pages.resize(keep);
    leaf->key.resize(static_cast<size_t>(keep) * page_size_);
    refresh(leaf);
  }
  return freed;
}

int32_t RadixCache::evict_local(int32_t n) {
  int32_t freed = 0;
  while (freed < n && !local_set_.empty()) {
    RadixNode* node = nodes_[std::get<2>(*local_set_.begin())].get();
    for (int32_t i = node->num_pages() - 1; i >= 0 && freed < n; --i) {
      if (node->local_pages[i] < 0) continue;
      local_->unref(node->local_pages[i]);
      node->local_pages[i] = -1;
      --node->num_local;
      --cached_local_;
      --evictable_local_;
      ++stats_.evicted_local_pages;
      ++freed;
    }
    refresh(node);
  }
  return freed;
}

void RadixCache::collect_pages(std::vector<int32_t>& global, std::vector<int32_t>& local) const {
  for (const auto& node : nodes_) {
    if (!node) continue;
    global.insert(global.end(), node->global_pages.begin(), node->global_pages.end());
    for (int32_t p : node->local_pages)
      if (p >= 0) local.push_back(p);
  }
}

std::string RadixCache::check() const {
  int32_t cached_g = 0, cached_l = 0, evict_g = 0, evict_l = 0;
  size_t leaves = 0, locals = 0;
  for (const auto& holder : nodes_) {
    const RadixNode* node = holder.get();
    if (!node || node == root_) continue;
    const std::string name = "node " + std::to_string(node->id);
    if (node->num_pages() == 0) return name + " is empty";
    if (node->key.size() != static_cast<size_t>(node->num_pages()) * page_size_ ||
        node->local_pages.size() != node->global_pages.size())
      return name + " has inconsistent sizes";
    if (node->start_page != (node->parent == root_ ? 0 : node->parent->end_page()))
      return name + " does not start where its parent ends";
    auto it = node->parent->children.find(node->link);
    if (it == node->parent->children.end() || it->second != node) return name + " is not linked";
    if (node->link != child_hash(node->extra_key, node->parent == root_, node->key.data()))
      return name + " is linked under the wrong hash";
    if (node->parent != root_ && node->parent->extra_key != node->extra_key)
      return name + " has a different extra key than its parent";
    int32_t locks_below = 0;
    for (const auto& kv : node->children) locks_below += kv.second->lock_ref;
    if (node->lock_ref < locks_below) return name + " is locked less than its children";
    int32_t num_local = 0;
    for (size_t i = 0; i < node->global_pages.size(); ++i) {
      if (global_->ref_count(node->global_pages[i]) < 1) return name + " holds a free global page";
      if (node->local_pages[i] >= 0) {
        ++num_local;
        if (!local_ || local_->ref_count(node->local_pages[i]) < 1)
          return name + " holds a free local page";
      }
    }
    if (num_local != node->num_local) return name + " miscounts its local pages";
    cached_g += node->num_pages();
    cached_l += num_local;
    const bool unlocked = node->lock_ref == 0;
    if (unlocked) {
      evict_g += node->num_pages();
      evict_l += num_local;
    }
    if (node->in_leaf_set != (unlocked && node->children.empty()))
      return name + " is wrongly in or out of the leaf set";
    if (node->in_local_set != (unlocked && num_local > 0))
      return name + " is wrongly in or out of the local set";
    leaves += node->in_leaf_set;
    locals += node->in_local_set;
  }
  if (leaves != leaf_set_.size() || locals != local_set_.size())
    return "eviction sets hold stale entries";
  if (cached_g != cached_global_ || cached_l != cached_local_) return "cached counters are wrong";
  if (evict_g != evictable_global_ || evict_l != evictable_local_)
    return "evictable counters are wrong";
  std::vector<int32_t> g, l;
  collect_pages(g, l);
  std::sort(g.begin(), g.end());
  std::sort(l.begin(), l.end());
  if (std::adjacent_find(g.begin(), g.end()) != g.end()) return "a global page is in the tree twice";
  if (std::adjacent_find(l.begin(), l.end()) != l.end()) return "a local page is in the tree twice";
  return "";
}

}  // namespace pyllama4
