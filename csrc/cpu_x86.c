/* Which x86 kernel tables this CPU and OS can run (compiled for the baseline: these checks run
 * before anything wider may execute). cpuid says what the CPU has; XCR0 says which register
 * state the OS saves on a context switch. Without the OS's ymm/zmm state a table would fault or
 * corrupt registers, so both must agree. */
#if defined(__x86_64__) || defined(_M_X64)

#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
#define XCR0_TILE 0x60000 /* XTILECFG (bit 17) and XTILEDATA (bit 18) */

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

/* AMX: cpuid amx-tile and amx-int8 on top of AVX-512 VNNI, XCR0's tile bits, and the OS's
 * permission to use the 8 KiB tile data state, which Linux (>= 5.16) grants a process only on
 * request (arch_prctl ARCH_REQ_XCOMP_PERM): without it the first tile instruction faults. The
 * request is made once; a refusal (older kernel, seccomp, another OS, or a thread's alternate
 * signal stack too small for the larger signal frame: ENOSPC) leaves the table unlisted and the
 * AVX-512 table the best. */
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_granted(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    unsigned long features = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &features) != 0) return 0;
    return (int)((features >> XFEATURE_XTILEDATA) & 1);
#else
    return 0;
#endif
}

int lq_amx_usable(void) {
#if defined(LQ_TEST_EMULATE_AMX)
    return lq_avx2_usable(); /* test builds: kernels_amx.c does the tile instructions in C */
#endif
    static int granted = -1; /* dispatch.c asks under pthread_once; test harnesses from one thread */
    __builtin_cpu_init();
    if (!lq_avx512_usable() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8") ||
        !lq_os_saves_state(XCR0_TILE))
        return 0;
    if (granted < 0) granted = amx_granted();
    return granted;
}

#endif
