/* Internal: block layouts (ggml-compatible, byte for byte) and the per-ISA kernel table.
 * One file per ISA (kernels_scalar.c, kernels_avx2.c, kernels_neon.c, ...) fills an
 * lq_kernels table; dispatch.c picks one at runtime. Drivers (matmul.c, moe.c) only
 * call through the table, so every ISA is tested against the scalar reference. */
#ifndef LARQL_KERNELS_H
#define LARQL_KERNELS_H

#include <math.h>
#include <string.h>

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

/* Several consecutive weight rows (row_bytes apart) against the same T activation rows: row r's
 * dot with activation row t goes to out[r * out_row_stride + t * out_stride]; n, x and x_stride as
 * for lq_row_fn. It must give exactly the bits of n_rows calls of the table's lq_row_fn (drivers
 * call lq_dot_rows, which falls back to those calls when a table has none). It exists for the
 * per-row fixed cost: a down row of the expert FFN is only 3 Q4_K blocks, and one call per row
 * (function pointer, T and column-group dispatch) was a large share of phase B at T = 8. */
typedef void (*lq_rows_fn)(int64_t n, const void *w, size_t row_bytes, int64_t n_rows, const void *x,
                           int64_t x_stride, int T, float *out, int64_t out_row_stride, int64_t out_stride);

typedef struct {
    const char *name;
    lq_row_fn dot[LQ_N_ROW_FORMATS]; /* by format id; NULL = no kernel (id 3, Q4_0) */
    void (*quantize_q8k)(const float *x, block_q8_K *y, int64_t n); /* n multiple of 256 */
    /* out = gelu_tanh(gate) * up: lq_gelu_mul_f32 compiled for this ISA (same bits in every table) */
    void (*gelu_mul)(const float *gate, const float *up, int64_t n, float *out);
    lq_rows_fn rows[LQ_N_ROW_FORMATS]; /* optional, by format id; NULL = one dot call per row */
} lq_kernels;

/* The row kernel of weight format fmt in table k; NULL if fmt is not a weight format. */
static inline lq_row_fn lq_row_kernel(const lq_kernels *k, int fmt) {
    return fmt >= 0 && fmt < LQ_N_ROW_FORMATS ? k->dot[fmt] : NULL;
}

/* n_rows rows through the table's rows kernel for fmt, or row by row through its dot (the
 * reference: the scalar table has no rows kernels). fmt must be a weight format of the table. */
static inline void lq_dot_rows(const lq_kernels *k, int fmt, int64_t n, const void *w, size_t row_bytes,
                               int64_t n_rows, const void *x, int64_t x_stride, int T, float *out,
                               int64_t out_row_stride, int64_t out_stride) {
    if (k->rows[fmt]) {
        k->rows[fmt](n, w, row_bytes, n_rows, x, x_stride, T, out, out_row_stride, out_stride);
        return;
    }
    const lq_row_fn dot = k->dot[fmt];
    for (int64_t r = 0; r < n_rows; r++)
        dot(n, (const uint8_t *)w + (size_t)r * row_bytes, x, x_stride, T, out + r * out_row_stride, out_stride);
}

extern const lq_kernels lq_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
/* The AVX-VNNI and AMX files, and cpuid's names for them, need GCC 11 or clang 13 (Apple's
 * numbering): say so here rather than fail on an intrinsic. */
#if !((defined(__clang__) && __clang_major__ >= 13) || \
      (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11))
#error "larql's x86 kernels need GCC 11 or newer, or clang 13 or newer (CC=... pip install .)"
#endif
/* Each x86 table with the cpuid (and OS state) check that says whether it can run here. */
extern const lq_kernels lq_kernels_avx2;
int lq_avx2_usable(void);
extern const lq_kernels lq_kernels_avxvnni; /* AVX-VNNI: 256-bit vpdpbusd (Alder Lake, SPR, Zen 5) */
int lq_avxvnni_usable(void);
extern const lq_kernels lq_kernels_avx512; /* AVX-512 F/BW/VL + VNNI: 512-bit vpdpbusd */
int lq_avx512_usable(void);
extern const lq_kernels lq_kernels_amx; /* AVX-512 VNNI + AMX int8 tiles for rows kernels at T >= 4 */
int lq_amx_usable(void);                 /* also asks the OS for the tile state (once) */
/* The AVX-512 VNNI K-quant row kernels, shared by the AMX table below its tile threshold. */
void lq_avx512_dot_q4k(int64_t nb, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os);
void lq_avx512_dot_q6k(int64_t nb, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os);
/* The AVX-512 Q4_K rows kernel (lq_rows_fn), which the AMX table uses below its tile threshold. */
void lq_avx512_rows_q4k(int64_t nb, const void *w, size_t row_bytes, int64_t n_rows, const void *x, int64_t xs,
                        int T, float *out, int64_t ors, int64_t os);
/* The AVX2 float-row kernels and Q8_K quantiser, shared by the wider x86 tables. */
void lq_avx2_dot_f32(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os);
void lq_avx2_dot_f16(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os);
void lq_avx2_dot_bf16(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os);
void lq_avx2_quantize_q8k(const float *x, block_q8_K *y, int64_t n);
void lq_avx2_gelu_mul(const float *gate, const float *up, int64_t n, float *out);
/* XCR0 (the register state the OS saves) has all of `mask`: 0x06 = xmm+ymm, 0xe6 = + zmm and
 * opmask. cpuid alone is not enough: an OS (or hypervisor) may not save the wider registers. */
int lq_os_saves_state(uint64_t mask);
#endif
#if defined(__aarch64__)
extern const lq_kernels lq_kernels_neon; /* int8 products with smull (every ARMv8.0 CPU) */
/* The sdot table (ARMv8.2 dotprod), or NULL if this build lacks it or the CPU cannot run it. */
const lq_kernels *lq_neon_sdot_table(void);
#endif

/* tanh of four f32, computed in double and rounded once: (1 - e) / (1 + e) with e = exp(-2|x|)
 * (|x| clamped at 20, where tanh is 1 in f32 by far), or |x| - |x|^3/3 below 2^-13 (there the
 * quotient loses digits to cancellation; the series' next term is below 2^-53 relative).
 * exp: k = round(y / ln 2) by the 1.5 * 2^52 trick (no float-to-int conversion), r = y - k ln 2
 * with ln 2 in two parts (|r| <= 0.35), Taylor to r^12 (error < 2^-50), times 2^k built from
 * bits. The double result is within ~2^-45 relative, so the f32 result is the correctly rounded
 * tanh but within that distance of a rounding tie (csrc/tests/test_lib.c checks it on 2^26
 * values against libm's double tanh: every one equal; glibc's tanhf differs on ~3%).
 * GCC's portable vector extension: element-wise IEEE operations whatever the ISA or vector
 * width the compiler picks (the library is built with -ffp-contract=off), so every build gives
 * the same bits, and no branch or libm call stops vectorisation: glibc's scalar tanhf was ~10%
 * of a T=8 expert FFN. */
typedef float lq_v4f __attribute__((vector_size(16)));
typedef float lq_v4fu __attribute__((vector_size(16), aligned(4))); /* lq_v4f at any float's address */
typedef int32_t lq_v4i __attribute__((vector_size(16)));
typedef double lq_v4d __attribute__((vector_size(32)));
typedef int64_t lq_v4l __attribute__((vector_size(32)));

/* m ? a : b per lane (m: a comparison's all-ones / zero lanes), by bits: C has no vector ?:.
 * Macros, and pointers below: a function taking or returning a 32-byte vector by value would
 * change the ABI without AVX (GCC warns), even inlined. */
#define LQ_SEL(m, a, b, T, I) ((T)(((I)(a) & (m)) | ((I)(b) & ~(m))))

/* out[0..3] = tanh(in[0..3]) */
static inline __attribute__((always_inline)) void lq_tanh4(const lq_v4f *in, lq_v4f *out) {
    const lq_v4f xf = *in;
    const lq_v4d x = __builtin_convertvector(xf, lq_v4d), zero = {0, 0, 0, 0};
    const lq_v4d a = (lq_v4d)((lq_v4l)x & 0x7fffffffffffffff);     /* |x| */
    const lq_v4d ac = LQ_SEL(a < 20.0, a, zero + 20.0, lq_v4d, lq_v4l); /* NaN -> 20: put back at the end */
    const lq_v4d y = -2.0 * ac, shifter = zero + 0x1.8p52;
    const lq_v4d kd = y * 1.4426950408889634 + shifter; /* 1 / ln 2: the low bits hold round(y / ln 2) */
    const lq_v4d k = kd - shifter;
    const lq_v4d r = (y - k * 0x1.62e42fee00000p-1) - k * 0x1.a39ef35793c76p-33; /* ln 2 = hi + lo */
    lq_v4d p = r * (1.0 / 479001600.0) + 1.0 / 39916800.0;                   /* 1/12!, 1/11! */
    p = p * r + 1.0 / 3628800.0, p = p * r + 1.0 / 362880.0, p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0, p = p * r + 1.0 / 720.0, p = p * r + 1.0 / 120.0, p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0, p = p * r + 0.5, p = p * r + 1.0, p = p * r + 1.0;
    const lq_v4l two_k_bits = ((lq_v4l)kd - (lq_v4l)shifter + 1023) << 52; /* 2^k, k in [-58, 0] */
    const lq_v4d e = p * (lq_v4d)two_k_bits;
    const lq_v4d quotient = (1.0 - e) / (1.0 + e), series = a - a * a * a * (1.0 / 3.0);
    const lq_v4d t = LQ_SEL(a < 0x1p-13, series, quotient, lq_v4d, lq_v4l);
    const lq_v4d signed_t = (lq_v4d)((lq_v4l)t | ((lq_v4l)x & (-0x7fffffffffffffff - 1))); /* x's sign */
    const lq_v4f tf = __builtin_convertvector(signed_t, lq_v4f);
    *out = LQ_SEL(xf == xf, tf, xf, lq_v4f, lq_v4i);
}

/* gelu with the tanh approximation as torch's gelu(approximate="tanh") computes it in f32 (the
 * cube grouped first; torch's vectorised tanh is within 1 ulp, lq_tanh4 correctly rounded):
 * out[i] = gelu_tanh(gate[i]) * up[i]. The one definition: the dense MLP (lq_gelu_mul) and the
 * experts (lq_moe_ffn) must round alike, bit for bit. Four at a time, the tail through the same
 * vector code, so a value's result does not depend on its position. */
static inline void lq_gelu_mul_f32(const float *gate, const float *up, int64_t n, float *out) {
    const float beta = 0.7978845608028654f; /* sqrt(2 / pi) */
    const float kappa = 0.044715f;
    for (int64_t i = 0; i < n; i += 4) {
        lq_v4f g = {0, 0, 0, 0}, u = {0, 0, 0, 0}, t;
        int64_t m = n - i < 4 ? n - i : 4;
        if (m == 4) {
            memcpy(&g, gate + i, sizeof g), memcpy(&u, up + i, sizeof u);
        } else {
            for (int64_t j = 0; j < m; j++) g[j] = gate[i + j], u[j] = up[i + j];
        }
        lq_v4f inner = beta * (g + kappa * (g * g * g));
        lq_tanh4(&inner, &t);
        lq_v4f h = 0.5f * g * (1.f + t) * u;
        if (m == 4) {
            memcpy(out + i, &h, sizeof h);
        } else {
            for (int64_t j = 0; j < m; j++) out[i + j] = h[j];
        }
    }
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
/* The same with guided chunks: each claim takes (what is left) / (2 threads), rounded up to whole
 * grains, at least one grain, so each thread first streams long contiguous runs (a hardware
 * prefetcher's best case) and the last chunks are small enough to balance. Ranges start at
 * multiples of grain. */
void lq_parallel_for_guided(int64_t n, int64_t grain, lq_range_fn fn, void *ctx);

/* Scalar block quantisers / dequantisers (quant.c); n is a multiple of QK_K. */
void lq_quantize_row_q4k(const float *x, block_q4_K *y, int64_t n);
void lq_quantize_row_q6k(const float *x, block_q6_K *y, int64_t n);
void lq_dequantize_row_q4k(const block_q4_K *x, float *y, int64_t n);
void lq_dequantize_row_q6k(const block_q6_K *x, float *y, int64_t n);

#endif
