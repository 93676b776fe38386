// Transparent-huge-page advice for large, freshly allocated outputs (see bond/cpu.h).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "bond/cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bond {
namespace cpu {
namespace {

bool enabled() {
  static const bool on = [] {
    const char* env = std::getenv("BOND_KERNELS_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return on;
}

}  // namespace

std::size_t advise_huge_pages(void* ptr, std::size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  if (ptr == nullptr || nbytes < 4 * kHuge || !enabled()) return 0;
  const std::uintptr_t begin = reinterpret_cast<std::uintptr_t>(ptr);
  const std::uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t last = (begin + nbytes) & ~(kHuge - 1);
  if (last <= first) return 0;
  if (madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) != 0) return 0;
  return last - first;
#else
  (void)ptr;
  (void)nbytes;
  return 0;
#endif
}

}  // namespace cpu
}  // namespace bond
