/* Which x86 kernel tables this CPU and OS can run (compiled for the baseline: these checks run
 * before anything wider may execute). cpuid says what the CPU has; XCR0 says which register
 * state the OS saves on a context switch. Without the OS's ymm/zmm state a table would fault or
 * corrupt registers, so both must agree. */
#if defined(__x86_64__) || defined(_M_X64)

#include <cpuid.h>

#include "kernels.h"

int lq_os_saves_state(uint64_t mask) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return 0;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((((uint64_t)hi << 32) | lo) & mask) == mask;
}

#define XCR0_YMM 0x06 /* sse + avx state */
#define XCR0_ZMM 0xe6 /* + opmask, upper halves of zmm0-15, zmm16-31 */

int lq_avx2_usable(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           lq_os_saves_state(XCR0_YMM);
}

int lq_avxvnni_usable(void) {
    __builtin_cpu_init();
    return lq_avx2_usable() && __builtin_cpu_supports("avxvnni");
}

int lq_avx512_usable(void) {
    __builtin_cpu_init();
    return lq_avx2_usable() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           lq_os_saves_state(XCR0_ZMM);
}

#endif
