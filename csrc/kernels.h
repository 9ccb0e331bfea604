/* Internal: block layouts (ggml-compatible, byte for byte) and the per-ISA kernel table.
 * One file per ISA (kernels_scalar.c, kernels_avx2.c, kernels_neon.c, ...) fills an
 * lq_kernels table; dispatch.c picks one at runtime. Drivers (matmul.c, moe.c) only
 * call through the table, so every ISA is tested against the scalar reference. */
#ifndef LARQL_KERNELS_H
#define LARQL_KERNELS_H

#include <math.h>

#include "larql.h"

#define QK_K 256

typedef struct {
    uint16_t d;          /* f16 super-block scale for the 6-bit scales */
    uint16_t dmin;       /* f16 super-block scale for the 6-bit mins */
    uint8_t scales[12];  /* 8 scales + 8 mins, 6 bits each, ggml packing */
    uint8_t qs[128];     /* per 64 values: 32 bytes, low nibble = value i, high nibble = value i+32 */
} block_q4_K;            /* 144 bytes */

typedef struct {
    uint8_t ql[128];     /* low 4 bits */
    uint8_t qh[64];      /* high 2 bits */
    int8_t scales[16];   /* one per 16 values */
    uint16_t d;          /* f16 */
} block_q6_K;            /* 210 bytes */

typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16]; /* sum of each group of 16 quants: folds the Q4_K min term */
} block_q8_K;            /* 292 bytes */

#define LQ_MAX_T 64 /* activation rows one row-kernel call takes; drivers split larger T */

/* A row-times-activations kernel: one weight row against T activation rows (1 <= T <= LQ_MAX_T).
 * K-quant rows: n = blocks per row, x = block_q8_K rows with x_stride in blocks.
 * Float rows (F32, F16, BF16): n = values used, x = f32 rows with x_stride in floats.
 * Activation row t starts at x + t * x_stride; out[t * out_stride] receives its dot product. */
typedef void (*lq_row_fn)(int64_t n, const void *w_row, const void *x, int64_t x_stride, int T, float *out,
                          int64_t out_stride);

#define LQ_N_ROW_FORMATS 6 /* row kernels are indexed by format id: F32..Q6_K */

typedef struct {
    const char *name;
    lq_row_fn dot[LQ_N_ROW_FORMATS]; /* by format id; NULL = no kernel (id 3, Q4_0) */
    void (*quantize_q8k)(const float *x, block_q8_K *y, int64_t n); /* n multiple of 256 */
} lq_kernels;

/* The row kernel of weight format fmt in table k; NULL if fmt is not a weight format. */
static inline lq_row_fn lq_row_kernel(const lq_kernels *k, int fmt) {
    return fmt >= 0 && fmt < LQ_N_ROW_FORMATS ? k->dot[fmt] : NULL;
}

extern const lq_kernels lq_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
/* Each x86 table with the cpuid (and OS state) check that says whether it can run here. */
extern const lq_kernels lq_kernels_avx2;
int lq_avx2_usable(void);
extern const lq_kernels lq_kernels_avxvnni; /* AVX-VNNI: 256-bit vpdpbusd (Alder Lake, SPR, Zen 5) */
int lq_avxvnni_usable(void);
extern const lq_kernels lq_kernels_avx512; /* AVX-512 F/BW/VL + VNNI: 512-bit vpdpbusd */
int lq_avx512_usable(void);
/* The AVX2 float-row kernels and Q8_K quantiser, shared by the wider x86 tables. */
void lq_avx2_dot_f32(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os);
void lq_avx2_dot_f16(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os);
void lq_avx2_dot_bf16(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os);
void lq_avx2_quantize_q8k(const float *x, block_q8_K *y, int64_t n);
/* XCR0 (the register state the OS saves) has all of `mask`: 0x06 = xmm+ymm, 0xe6 = + zmm and
 * opmask. cpuid alone is not enough: an OS (or hypervisor) may not save the wider registers. */
int lq_os_saves_state(uint64_t mask);
#endif
#if defined(__aarch64__)
extern const lq_kernels lq_kernels_neon; /* int8 products with smull (every ARMv8.0 CPU) */
/* The sdot table (ARMv8.2 dotprod), or NULL if this build lacks it or the CPU cannot run it. */
const lq_kernels *lq_neon_sdot_table(void);
#endif

/* gelu with the tanh approximation as torch's gelu(approximate="tanh") computes it in f32 (the
 * cube grouped first). The one definition: the dense MLP (lq_gelu_mul) and the experts
 * (lq_moe_ffn) must round alike, bit for bit. */
static inline float lq_gelu_tanh(float x) {
    const float beta = 0.7978845608028654f; /* sqrt(2 / pi) */
    const float kappa = 0.044715f;
    float inner = beta * (x + kappa * (x * x * x));
    return 0.5f * x * (1.f + tanhf(inner));
}

/* Software prefetch of weight bytes LQ_PREFETCH_AHEAD past the block a row kernel is reading
 * (the scalar reference does not prefetch). Past the end of a row it fetches the next row, which
 * is the one the same thread reads next; past the end of the matrix it is harmless (a prefetch
 * never faults). Measured on a cold bank 4x the LLC (AMD EPYC Zen 3, AVX2, shared 2 vCPU; ratio
 * to a C read of the same cold bytes timed call by call, two runs each):
 *   Q4_K gate_up matvec, 1 thread  0.70-0.72 -> 0.90-0.92;  down 0.69-0.73 -> 0.76-0.77
 *   top-8 expert FFN T=1, 2 threads 0.59-0.65 -> 0.69-0.80
 *   f16 2112x2816 matvec           0.63-0.70 -> 0.67-0.72 (within the noise; kept)
 *   f32 rows: 0.80-0.91 -> 0.72-0.82, worse: the hardware prefetcher keeps up, so not used there.
 * 2, 4 and 8 KiB ahead measured alike (within the noise); T0 and NTA hints alike. */
#define LQ_PREFETCH_AHEAD 4096
#define LQ_PREFETCH(p, off) __builtin_prefetch((const char *)(p) + LQ_PREFETCH_AHEAD + (off), 0, 3)

/* The table in use (dispatch.c). */
const lq_kernels *lq_active_kernels(void);

/* f16 <-> f32 without relying on hardware support (exact for every f16 value). */
float lq_fp16_to_fp32(uint16_t h);
uint16_t lq_fp32_to_fp16(float f);

/* ---- Internals shared by the C files (added to the contract; nothing above changes) ---- */

static inline int lq_is_kquant(int fmt) { return fmt == LQ_Q4_K || fmt == LQ_Q6_K; }
static inline int lq_is_weight_fmt(int fmt) { return lq_row_kernel(&lq_kernels_scalar, fmt) != NULL; }

/* Persistent thread pool (threadpool.c). fn(ctx, begin, end, thread_id) is called on disjoint
 * ranges covering [0, n), each at most `grain` long; the calling thread works too. Jobs from
 * concurrent callers are serialised. 0 <= thread_id < lq_get_num_threads(). */
typedef void (*lq_range_fn)(void *ctx, int64_t begin, int64_t end, int thread_id);
#define LQ_MAX_THREADS 256 /* thread_id < LQ_MAX_THREADS always */
void lq_parallel_for(int64_t n, int64_t grain, lq_range_fn fn, void *ctx);

/* Scalar block quantisers / dequantisers (quant.c); n is a multiple of QK_K. */
void lq_quantize_row_q4k(const float *x, block_q4_K *y, int64_t n);
void lq_quantize_row_q6k(const float *x, block_q6_K *y, int64_t n);
void lq_dequantize_row_q4k(const block_q4_K *x, float *y, int64_t n);
void lq_dequantize_row_q6k(const block_q6_K *x, float *y, int64_t n);

#endif
