/* Runtime choice of the kernel table: the best ISA this CPU supports, unless LARQL_ISA names
 * another (for tests and benchmarks) or lq_force_isa() is called. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static const lq_kernels *candidates[8];
static int n_candidates; /* usable tables, best last */
static char available[128];
static _Atomic(const lq_kernels *) active;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void add(const lq_kernels *k) {
    candidates[n_candidates++] = k;
    if (available[0]) strcat(available, " ");
    strcat(available, k->name);
}

static const lq_kernels *find(const char *name) {
    for (int i = 0; i < n_candidates; i++)
        if (strcmp(candidates[i]->name, name) == 0) return candidates[i];
    return NULL;
}

static void init(void) {
    add(&lq_kernels_scalar);
#if defined(__x86_64__) || defined(_M_X64)
    /* added worst first, so the best is last: ranked AVX-512 VNNI, AMX, AVX2, AVX-VNNI. Two
     * tables rank below a narrower one, by measurement (larql bench kernels; hot rows in docs/KERNELS.md):
     * - AVX-VNNI below AVX2: its exact per-row kernels ran the top-8 expert FFN at 0.55-0.59x the
     *   AVX2 table's speed on a Zen 5 EPYC.
     * - AMX below AVX-512: on its first real AMX machine (a 2-vCPU Xeon with amx-int8), its
     *   tile rows kernels took 1.6-4.2x the AVX-512 rows kernel's time per row-block-column for
     *   Q4_K at every T from 4 to 64, and 1.1-2.8x for Q6_K from 4 to 32 (one sub-block per
     *   tile op, then a tile store and the scales in vector code per sub-block).
     * Both are listed and can be forced (LARQL_ISA), and both are tested against scalar. */
    if (lq_avxvnni_usable()) add(&lq_kernels_avxvnni);
    if (lq_avx2_usable()) add(&lq_kernels_avx2);
    if (lq_amx_usable()) add(&lq_kernels_amx);
    if (lq_avx512_usable()) add(&lq_kernels_avx512);
#endif
#if defined(__aarch64__)
    add(&lq_kernels_neon); /* Advanced SIMD is part of the aarch64 baseline */
    if (lq_neon_sdot_table()) add(lq_neon_sdot_table());
#endif
    const lq_kernels *best = candidates[n_candidates - 1];
    const char *env = getenv("LARQL_ISA");
    if (env && *env && find(env)) best = find(env);
    atomic_store(&active, best);
}

const lq_kernels *lq_active_kernels(void) {
    pthread_once(&once, init);
    return atomic_load_explicit(&active, memory_order_acquire);
}

const char *lq_isa(void) { return lq_active_kernels()->name; }

const char *lq_available_isas(void) {
    pthread_once(&once, init);
    return available;
}

int lq_force_isa(const char *name) {
    pthread_once(&once, init);
    const lq_kernels *k = name ? find(name) : candidates[n_candidates - 1];
    if (!k) return LQ_E_ISA;
    atomic_store(&active, k);
    return LQ_OK;
}
