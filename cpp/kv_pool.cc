#include "kv_pool.h"

#include <stdexcept>
#include <string>

namespace pyllama4 {

KVPool::KVPool(int32_t num_pages, int32_t page_size) : page_size_(page_size) {
  if (num_pages < 0) throw std::invalid_argument("KVPool: num_pages must be >= 0");
  if (page_size <= 0) throw std::invalid_argument("KVPool: page_size must be > 0");
  ref_count_.assign(num_pages, 0);
  free_.reserve(num_pages);
  // Pushed in reverse so that a fresh pool hands out pages 0, 1, 2, ...
  for (int32_t p = num_pages - 1; p >= 0; --p) free_.push_back(p);
}

void KVPool::check_page(int32_t page) const {
  if (page < 0 || page >= num_pages())
    throw std::out_of_range("KVPool: page " + std::to_string(page) + " out of range");
}

bool KVPool::alloc(int32_t n, std::vector<int32_t>& out) {
  if (n < 0) throw std::invalid_argument("KVPool::alloc: n must be >= 0");
  if (n > num_free()) return false;
  for (int32_t i = 0; i < n; ++i) {
    int32_t page = free_.back();
    free_.pop_back();
    ref_count_[page] = 1;
    out.push_back(page);
  }
  return true;
}

void KVPool::ref(int32_t page) {
  check_page(page);
  if (ref_count_[page] == 0)
    throw std::logic_error("KVPool::ref: page " + std::to_string(page) + " is free");
  ++ref_count_[page];
}

void KVPool::unref(int32_t page) {
  check_page(page);
  if (ref_count_[page] == 0)
    throw std::logic_error("KVPool::unref: page " + std::to_string(page) + " is already free");
  if (--ref_count_[page] == 0) free_.push_back(page);
}

int32_t KVPool::ref_count(int32_t page) const {
  check_page(page);
  return ref_count_[page];
}

std::string KVPool::check() const {
  std::vector<char> on_free_list(ref_count_.size(), 0);
  for (int32_t page : free_) {
    if (page < 0 || page >= num_pages()) return "free list holds an out-of-range page";
    if (on_free_list[page]) return "page " + std::to_string(page) + " is on the free list twice";
    on_free_list[page] = 1;
    if (ref_count_[page] != 0) return "free page " + std::to_string(page) + " has references";
  }
  for (int32_t p = 0; p < num_pages(); ++p)
    if (!on_free_list[p] && ref_count_[p] <= 0)
      return "page " + std::to_string(p) + " is neither free nor referenced";
  return "";
}

}  // namespace pyllama4
