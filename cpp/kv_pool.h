// KVPool: a fixed set of KV-cache pages with reference counts.
//
// A page is `page_size` consecutive token slots; slot s of page p is the flat index p * page_size + s
// into the KV tensors that the model runner allocates for this pool.
//
// Invariants:
//   * every page is either free (ref_count 0, on the free list exactly once) or live (ref_count > 0,
//     not on the free list);
//   * each holder (a request's block table, a radix-tree node) owns exactly one reference per page
//     it lists, so a page returns to the free list when its last holder lets go;
//   * num_free() + (live pages) == num_pages().
// Slots past num_pages() * page_size are never handed out: a runner may allocate one extra page
// there as a sink for padded tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pyllama4 {

class KVPool {
 public:
  KVPool(int32_t num_pages, int32_t page_size);

  int32_t num_pages() const { return static_cast<int32_t>(ref_count_.size()); }
  int32_t page_size() const { return page_size_; }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_pages() - num_free(); }

  // Takes n free pages with one reference each and appends them to `out`.
  // Returns false, taking nothing, when fewer than n pages are free.
  bool alloc(int32_t n, std::vector<int32_t>& out);
  // Adds a reference to a live page.
  void ref(int32_t page);
  // Drops a reference; the page becomes free when its count reaches zero.
  void unref(int32_t page);
  int32_t ref_count(int32_t page) const;

  // Empty when the invariants hold, else a description of the first violation.
  std::string check() const;

 private:
  void check_page(int32_t page) const;

  int32_t page_size_;
  std::vector<int32_t> ref_count_;
  std::vector<int32_t> free_;  // a stack: the most recently freed page is reused first
};

}  // namespace pyllama4
