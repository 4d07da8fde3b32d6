// RadixCache: a radix tree of cached KV pages keyed by page-aligned token sequences.
//
// Keys are token ids in whole pages, namespaced by a 64-bit extra key (image content hashes, a
// cache salt): sequences with equal tokens but different extra keys never share KV.
// Every node holds, for each page of its key, one global-pool page (KV of the full-history / NoPE
// layers) and optionally one local-pool page (KV of the chunk-local / RoPE layers; -1 when that
// page's local KV is not cached). The tree owns one pool reference per page it lists.
//
// Llama 4's chunk-local layers (chunk size C, a multiple of the page size) let a query at position p
// see only keys in [floor(p/C)*C, p]. So a cached prefix of L tokens is usable only if global pages
// cover [0, L) and local pages cover [floor(L/C)*C, L); match_prefix shortens a match to the longest
// such L (at worst the chunk boundary). With C == 0 there are no chunk-local layers and no local pool.
//
// Invariants:
//   * a node's lock_ref counts the locks held on it or on any node below it: a locked node's pages
//     are never evicted, and unlocked nodes have only unlocked descendants;
//   * evictable_* + protected_* == cached_* for each pool, where protected pages are on locked nodes;
//   * eviction is LRU by last access and page-granular, tail first: evict(n) frees exactly
//     min(n, evictable) global pages by trimming the least recently used unlocked leaf from its
//     end; evict_local(n) drops local pages (never global ones) of the least recently used unlocked
//     nodes, from each node's end. Ties between nodes touched by one operation go to the deeper one.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kv_pool.h"

namespace pyllama4 {

struct RadixNode {
  int32_t id = 0;
  RadixNode* parent = nullptr;
  uint64_t link = 0;  // this node's key in parent->children
  std::unordered_map<uint64_t, RadixNode*> children;  // hash of the child's first page -> child
  uint64_t extra_key = 0;
  int32_t start_page = 0;                // absolute page index of this node's first page
  std::vector<int32_t> key;              // tokens, a whole number of pages
  std::vector<int32_t> global_pages;     // one per page of key
  std::vector<int32_t> local_pages;      // one per page of key, -1 where not cached
  int32_t num_local = 0;                 // entries of local_pages that are >= 0
  int32_t lock_ref = 0;
  uint64_t last_access = 0;
  // Current entries in the eviction sets (valid when the flags are set).
  bool in_leaf_set = false;
  bool in_local_set = false;
  std::tuple<uint64_t, int32_t, int32_t> leaf_entry{};
  std::tuple<uint64_t, int32_t, int32_t> local_entry{};

  int32_t num_pages() const { return static_cast<int32_t>(global_pages.size()); }
  int32_t end_page() const { return start_page + num_pages(); }
};

struct MatchResult {
  int32_t length = 0;                  // matched tokens, a multiple of the page size
  std::vector<int32_t> global_pages;   // pages for [0, length)
  std::vector<int32_t> local_pages;    // pages for [local_first_page * page_size, length)
  int32_t local_first_page = 0;        // floor(length / C) * C / page_size (0 without a local pool)
  RadixNode* node = nullptr;           // the node that ends at `length` (the root when length == 0)
};

// Running totals since construction.
struct RadixCacheStats {
  int64_t lookups = 0;          // counted match_prefix calls
  int64_t lookup_tokens = 0;    // whole-page tokens they asked for
  int64_t hit_tokens = 0;       // tokens they matched
  int64_t inserted_tokens = 0;  // tokens insert() added to the tree (not already present)
  int64_t evicted_global_pages = 0;
  int64_t evicted_local_pages = 0;  // by evict() with their global pages, or by evict_local()
};

class RadixCache {
 public:
  // `local` may be null only when chunk_size == 0. The pools must outlive the cache.
  RadixCache(KVPool* global, KVPool* local, int32_t chunk_size);
  ~RadixCache();
  RadixCache(const RadixCache&) = delete;
  RadixCache& operator=(const RadixCache&) = delete;

  int32_t page_size() const { return page_size_; }
  int32_t chunk_size() const { return chunk_size_; }
  bool has_local() const { return local_ != nullptr; }
  // floor(position / C) * C / page_size: the first page a query at `position` sees on local layers.
  int32_t chunk_first_page(int32_t position) const;

  // Longest usable cached prefix of tokens[0, n) (n is rounded down to whole pages). Splits a node
  // so that the match ends on a node boundary and marks the path as used now. Does not lock and
  // takes no references: lock result.node before anything can evict. A lookup is counted in
  // stats() unless count_lookup is false (the owner re-matching what it just inserted).
  MatchResult match_prefix(uint64_t extra_key, const int32_t* tokens, int32_t n,
                           bool count_lookup = true);
  // The length match_prefix would return, without changing the tree.
  int32_t peek_prefix(uint64_t extra_key, const int32_t* tokens, int32_t n) const;

  // Caches tokens[0, n) (n a multiple of the page size) with its pages: global_pages[i] and
  // local_pages[i] (-1: not cached) hold page i. Pages already present are kept; the tree adopts
  // (takes a reference on) the new ones, including local pages that fill gaps in existing nodes.
  // Returns the number of tokens whose global pages were already cached; the caller drops its own
  // references as usual, which frees its duplicates. Every page passed must be live: an id out of
  // range (std::out_of_range) or free (std::logic_error) throws before anything changes.
  int32_t insert(uint64_t extra_key, const int32_t* tokens, int32_t n, const int32_t* global_pages,
                 const int32_t* local_pages);

  void lock(RadixNode* node);
  void unlock(RadixNode* node);

  // Frees min(n, evictable_global_pages()) global pages (and their local pages); returns the count.
  int32_t evict(int32_t n);
  // Frees min(n, evictable_local_pages()) local pages, keeping global ones; returns the count.
  int32_t evict_local(int32_t n);

  const RadixCacheStats& stats() const { return stats_; }
  int32_t cached_global_pages() const { return cached_global_; }
  int32_t cached_local_pages() const { return cached_local_; }
  int32_t evictable_global_pages() const { return evictable_global_; }
  int32_t evictable_local_pages() const { return evictable_local_; }
  int32_t protected_global_pages() const { return cached_global_ - evictable_global_; }
  int32_t protected_local_pages() const { return cached_local_ - evictable_local_; }
  // Live nodes other than the root (dead ids waiting for reuse are not nodes).
  int32_t num_nodes() const {
    return static_cast<int32_t>(nodes_.size() - free_ids_.size()) - 1;
  }

  RadixNode* root() const { return root_; }
  RadixNode* node_by_id(int32_t id) const;  // null when no live node has this id
  int32_t id_limit() const { return static_cast<int32_t>(nodes_.size()); }  // ids are below this

  // Appends every page the tree references (for accounting checks).
  void collect_pages(std::vector<int32_t>& global, std::vector<int32_t>& local) const;
  // Empty when the tree's invariants hold, else a description of the first violation.
  std::string check() const;

 private:
  struct Walk {
    RadixNode* node = nullptr;  // last node entered (root when nothing matched)
    int32_t pages_in_node = 0;  // pages of `node` matched (all of them unless the walk ended inside)
    int32_t pages = 0;          // total pages matched
  };
  Walk walk(uint64_t extra_key, const int32_t* tokens, int32_t num_pages) const;
  int32_t usable_pages(const Walk& w) const;
  RadixNode* split(RadixNode* node, int32_t k);
  RadixNode* new_node(RadixNode* parent, uint64_t extra_key, int32_t start_page);
  void delete_leaf(RadixNode* node);
  void touch_path(RadixNode* node);
  void refresh(RadixNode* node);
  void forget(RadixNode* node);
  bool page_equal(const int32_t* a, const int32_t* b) const;
  uint64_t child_hash(uint64_t extra_key, bool at_root, const int32_t* page) const;
  void add_counts(RadixNode* node, int32_t global, int32_t local);

  KVPool* global_;
  KVPool* local_;
  int32_t page_size_;
  int32_t chunk_size_;
  uint64_t clock_ = 0;
  RadixNode* root_;
  std::vector<std::unique_ptr<RadixNode>> nodes_;  // index = node id; null for dead ids
  std::vector<int32_t> free_ids_;
  // (last_access, -end_page, id): LRU order, deeper first among equal times.
  std::set<std::tuple<uint64_t, int32_t, int32_t>> leaf_set_;   // unlocked leaves
  std::set<std::tuple<uint64_t, int32_t, int32_t>> local_set_;  // unlocked nodes with local pages
  int32_t cached_global_ = 0, cached_local_ = 0;
  int32_t evictable_global_ = 0, evictable_local_ = 0;
  RadixCacheStats stats_;
};

}  // namespace pyllama4
