/* The decode step's wire messages (larql_wire.h): a reader for exactly the msgpack this
 * protocol's hot messages use, their validation, and the writers. Every parse failure is a
 * decline, never an error: protocol.py then decides, and words, what was wrong. */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>

#include "kernels.h" /* block_q8_K */
#include "larql_wire.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "wire.c reads the frames' little-endian payloads in place"
#endif

#define D LQ_WIRE_DECLINED
#define MAX_TOKEN_SLOTS 16 /* the client planner's LEAN_MAX_K: a decode step's top-k */

/* ---- reading ------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *p, *end;
} reader;

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

/* A length or value of n big-endian bytes after the type byte. */
static int take(reader *r, int n, uint64_t *v) {
    if (r->end - r->p < n) return 0;
    *v = be(r->p, n);
    r->p += n;
    return 1;
}

/* A non-negative integer in any of msgpack's unsigned forms (what msgpack-python writes). */
static int read_uint(reader *r, uint64_t *v) {
    if (r->p >= r->end) return 0;
    uint8_t t = *r->p++;
    if (t <= 0x7f) return *v = t, 1;
    if (t >= 0xcc && t <= 0xcf) return take(r, 1 << (t - 0xcc), v);
    return 0;
}

/* A str (fixstr, str8, str16) or, with bin set, a bin (bin8/16/32): its bytes in place. */
static int read_bytes(reader *r, int bin, const uint8_t **s, uint64_t *len) {
    if (r->p >= r->end) return 0;
    uint8_t t = *r->p++;
    if (!bin && t >= 0xa0 && t <= 0xbf) {
        *len = t & 0x1f;
    } else if (!bin && (t == 0xd9 || t == 0xda)) {
        if (!take(r, t == 0xd9 ? 1 : 2, len)) return 0;
    } else if (bin && t >= 0xc4 && t <= 0xc6) {
        if (!take(r, 1 << (t - 0xc4), len)) return 0;
    } else {
        return 0;
    }
    if ((uint64_t)(r->end - r->p) < *len) return 0;
    *s = r->p;
    r->p += *len;
    return 1;
}

static int read_map(reader *r, uint64_t *n) {
    if (r->p >= r->end) return 0;
    uint8_t t = *r->p++;
    if (t >= 0x80 && t <= 0x8f) return *n = t & 0x0f, 1;
    if (t == 0xde) return take(r, 2, n);
    return 0;
}

static int is(const uint8_t *s, uint64_t len, const char *word) {
    return len == strlen(word) && memcmp(s, word, len) == 0;
}

static int all_finite_f32(const uint8_t *p, int64_t n) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, p + 4 * i, 4);
        bad |= (u & 0x7f800000u) == 0x7f800000u; /* exponent all ones: Inf or NaN */
    }
    return !bad;
}

static int all_finite_f64(const uint8_t *p, int64_t n) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t u;
        memcpy(&u, p + 8 * i, 8);
        bad |= (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    }
    return !bad;
}

#define Q8K_VALUES QK_K
#define Q8K_BYTES ((int64_t)sizeof(block_q8_K)) /* f32 d, 256 int8 quants, 16 int16 sums of 16 quants */

static int64_t x_row_bytes(int32_t enc, int64_t hidden) {
    return enc == LQ_WIRE_Q8K ? (hidden + Q8K_VALUES - 1) / Q8K_VALUES * Q8K_BYTES : 4 * hidden;
}

/* Q8_K blocks as protocol.decode_work accepts them: each scale finite, each group sum the sum
 * of its 16 quants (the kernel uses the sums as they are: its min term). */
static int q8k_blocks_ok(const uint8_t *p, int64_t blocks) {
    for (int64_t b = 0; b < blocks; b++, p += Q8K_BYTES) {
        if (!all_finite_f32(p, 1)) return 0;
        const int8_t *q = (const int8_t *)(p + 4);
        for (int g = 0; g < Q8K_VALUES / 16; g++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += q[16 * g + l];
            int16_t want;
            memcpy(&want, p + 4 + Q8K_VALUES + 2 * g, 2);
            if (sum != want) return 0;
        }
    }
    return 1;
}

/* ids in [-1, num_experts), each token's ids >= 0 distinct (protocol._check_slots). */
static int slots_ok(const uint8_t *idp, int64_t tokens, int64_t slots, int32_t num_experts) {
    for (int64_t t = 0; t < tokens; t++) {
        const uint8_t *row = idp + 4 * t * slots;
        for (int64_t k = 0; k < slots; k++) {
            int32_t e;
            memcpy(&e, row + 4 * k, 4);
            if (e < -1 || e >= num_experts) return 0;
            if (e < 0) continue;
            for (int64_t j = 0; j < k; j++) {
                int32_t f;
                memcpy(&f, row + 4 * j, 4);
                if (f == e) return 0;
            }
        }
    }
    return 1;
}

enum { K_ID, K_OP, K_LAYER, K_T, K_K, K_ENC, K_ACC, K_X, K_IDS, K_W, N_KEYS };
static const char *const KEY_NAMES[N_KEYS] = {"id", "op", "layer", "T", "K", "enc", "acc", "x", "ids", "w"};

int lq_wire_parse_experts(const uint8_t *body, int64_t n, int32_t hidden, int32_t num_layers,
                          int32_t num_experts, int32_t max_tokens, lq_wire_request *req) {
    if (!body || n <= 0 || !req || hidden < 1) return D;
    reader r = {body, body + n};
    uint64_t entries, ints[N_KEYS] = {0}, len[N_KEYS] = {0};
    const uint8_t *at[N_KEYS] = {0};
    unsigned seen = 0;
    if (!read_map(&r, &entries) || entries > N_KEYS) return D;
    for (uint64_t i = 0; i < entries; i++) {
        const uint8_t *k;
        uint64_t kl;
        if (!read_bytes(&r, 0, &k, &kl)) return D;
        int key = -1;
        for (int j = 0; j < N_KEYS; j++)
            if (is(k, kl, KEY_NAMES[j])) key = j;
        if (key < 0 || seen & (1u << key)) return D; /* unknown or repeated key */
        seen |= 1u << key;
        int ok;
        switch (key) {
        case K_ID: case K_LAYER: case K_T: case K_K:
            ok = read_uint(&r, &ints[key]);
            break;
        case K_OP: case K_ENC: case K_ACC:
            ok = read_bytes(&r, 0, &at[key], &len[key]);
            break;
        default: /* x, ids, w */
            ok = read_bytes(&r, 1, &at[key], &len[key]);
        }
        if (!ok) return D;
    }
    if (r.p != r.end) return D; /* bytes after the map: msgpack's "extra data" */
    const unsigned required = 1u << K_ID | 1u << K_OP | 1u << K_LAYER | 1u << K_T | 1u << K_K |
                              1u << K_X | 1u << K_IDS | 1u << K_W;
    if ((seen & required) != required || !is(at[K_OP], len[K_OP], "experts")) return D;
    int enc = LQ_WIRE_F32;
    if (seen & (1u << K_ENC)) {
        if (is(at[K_ENC], len[K_ENC], "q8k")) enc = LQ_WIRE_Q8K;
        else if (!is(at[K_ENC], len[K_ENC], "f32")) return D;
    }
    int acc64 = 0;
    if (seen & (1u << K_ACC)) {
        if (is(at[K_ACC], len[K_ACC], "f64")) acc64 = 1;
        else if (!is(at[K_ACC], len[K_ACC], "f32")) return D;
    }
    uint64_t layer = ints[K_LAYER], T = ints[K_T], K = ints[K_K];
    if (ints[K_ID] >> 63 || layer >= (uint64_t)num_layers || T < 1 || T > (uint64_t)max_tokens || K < 1 ||
        K > (uint64_t)num_experts)
        return D;
    const uint64_t row = (uint64_t)x_row_bytes(enc, hidden);
    if (len[K_X] != T * row || len[K_IDS] != T * K * 4 || len[K_W] != T * K * 4) return D;
    if (!slots_ok(at[K_IDS], (int64_t)T, (int64_t)K, num_experts) || !all_finite_f32(at[K_W], (int64_t)(T * K)))
        return D;
    if (enc == LQ_WIRE_Q8K ? !q8k_blocks_ok(at[K_X], (int64_t)(len[K_X] / Q8K_BYTES))
                           : !all_finite_f32(at[K_X], (int64_t)(T * hidden)))
        return D;
    req->id = ints[K_ID];
    req->layer = (int32_t)layer, req->tokens = (int32_t)T, req->slots = (int32_t)K, req->acc64 = acc64;
    req->enc = enc;
    req->x_off = at[K_X] - body, req->ids_off = at[K_IDS] - body, req->w_off = at[K_W] - body;
    return LQ_OK;
}

/* ---- writing: the forms msgpack-python chooses, so frames are byte-identical ---------------- */

static uint8_t *put_be(uint8_t *o, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) *o++ = (uint8_t)(v >> (8 * i));
    return o;
}

static uint8_t *put_uint(uint8_t *o, uint64_t v) {
    if (v <= 0x7f) return *o++ = (uint8_t)v, o;
    if (v <= 0xff) return *o++ = 0xcc, put_be(o, v, 1);
    if (v <= 0xffff) return *o++ = 0xcd, put_be(o, v, 2);
    if (v <= 0xffffffffu) return *o++ = 0xce, put_be(o, v, 4);
    return *o++ = 0xcf, put_be(o, v, 8);
}

static uint8_t *put_str(uint8_t *o, const char *s) { /* short ASCII names only (< 32 bytes) */
    size_t n = strlen(s);
    *o++ = (uint8_t)(0xa0 | n);
    memcpy(o, s, n);
    return o + n;
}

static uint8_t *put_bin_head(uint8_t *o, uint64_t n) {
    if (n <= 0xff) return *o++ = 0xc4, put_be(o, n, 1);
    if (n <= 0xffff) return *o++ = 0xc5, put_be(o, n, 2);
    return *o++ = 0xc6, put_be(o, n, 4);
}

static uint8_t *put_bin(uint8_t *o, const void *p, uint64_t n) {
    o = put_bin_head(o, n);
    memcpy(o, p, n);
    return o + n;
}

/* The 4-byte little-endian body length in front of a frame whose body ends at `end`. */
static int64_t close_frame(uint8_t *frame, const uint8_t *end) {
    uint32_t body = (uint32_t)(end - frame - 4);
    for (int i = 0; i < 4; i++) frame[i] = (uint8_t)(body >> (8 * i));
    return end - frame;
}

#define HEAD_ROOM 64 /* map, keys, ints and bin headers of either message */

int64_t lq_wire_encode_token(uint8_t *out, int64_t cap, uint64_t id, int32_t layer, const void *x,
                             int32_t enc, int32_t hidden, const void *ids, int32_t ids64, const float *weights,
                             int32_t slots, int32_t num_experts, int32_t first, int32_t last,
                             int32_t acc64) {
    if (slots < 0 || slots > MAX_TOKEN_SLOTS || hidden < 1 || layer < 0) return LQ_E_SHAPE;
    if (enc != LQ_WIRE_F32 && enc != LQ_WIRE_Q8K) return LQ_E_FORMAT;
    const int64_t xb = x_row_bytes(enc, hidden);
    int64_t k = 0;
    for (int32_t i = 0; i < slots; i++) {
        int64_t e = ids64 ? ((const int64_t *)ids)[i] : ((const int32_t *)ids)[i];
        if (e < -1 || e >= num_experts) return LQ_E_EXPERT;
        k += e >= first && e <= last;
    }
    if (k == 0) return 0;
    if (cap < HEAD_ROOM + xb + 8 * k + 4) return LQ_E_SHAPE;
    uint8_t *o = out + 4;
    *o++ = (uint8_t)(0x80 | (acc64 ? 10 : 9));
    o = put_str(o, "op"), o = put_str(o, "experts");
    o = put_str(o, "layer"), o = put_uint(o, (uint64_t)layer);
    o = put_str(o, "T"), o = put_uint(o, 1);
    o = put_str(o, "K"), o = put_uint(o, (uint64_t)k);
    o = put_str(o, "enc"), o = put_str(o, enc == LQ_WIRE_Q8K ? "q8k" : "f32");
    o = put_str(o, "x"), o = put_bin(o, x, (uint64_t)xb);
    /* the slots in the range, in order: their ids, then their weights */
    uint8_t *ids_at = put_bin_head(put_str(o, "ids"), 4 * (uint64_t)k);
    uint8_t *w_at = put_bin_head(put_str(ids_at + 4 * k, "w"), 4 * (uint64_t)k);
    for (int32_t i = 0, j = 0; i < slots; i++) {
        int32_t e = (int32_t)(ids64 ? ((const int64_t *)ids)[i] : ((const int32_t *)ids)[i]);
        if (e >= first && e <= last) {
            memcpy(ids_at + 4 * j, &e, 4);
            memcpy(w_at + 4 * j, &weights[i], 4);
            j++;
        }
    }
    o = w_at + 4 * k;
    if (acc64) o = put_str(o, "acc"), o = put_str(o, "f64");
    o = put_str(o, "id"), o = put_uint(o, id);
    return close_frame(out, o);
}

/* ---- the server's one-token request --------------------------------------------------------- */

static int shrank(int32_t fd, int64_t size) {
    struct stat st;
    return fd >= 0 && (fstat(fd, &st) != 0 || (int64_t)st.st_size < size);
}

int lq_wire_serve_token(const lq_wire_shard *s, const uint8_t *body, int64_t n, uint8_t *reply,
                        int64_t cap, int64_t *reply_len, lq_wire_request *req) {
    if (!s || !reply || !reply_len) return D;
    int rc = lq_wire_parse_experts(body, n, s->hidden, s->num_layers, s->num_experts, 1, req);
    if (rc != LQ_OK) return rc;
    const int64_t H = s->hidden;
    const lq_expert *table = s->tables[req->layer];
    if (!table) return D; /* not served here, or not yet checked: the Python path says which */
    int32_t ids[MAX_TOKEN_SLOTS];
    float w[MAX_TOKEN_SLOTS];
    if (req->slots > MAX_TOKEN_SLOTS) return D;
    memcpy(ids, body + req->ids_off, 4 * (size_t)req->slots);
    memcpy(w, body + req->w_off, 4 * (size_t)req->slots);
    for (int k = 0; k < req->slots; k++)
        if (ids[k] >= 0 && !table[ids[k]].gate_up) return D; /* not held: `not_owned` in Python */
    if (shrank(s->fds[req->layer], s->sizes[req->layer]) || shrank(s->norms_fd, s->norms_size)) return D;
    const int64_t width = req->acc64 ? 8 : 4;
    if (cap < HEAD_ROOM + width * H) return D;
    const int q8k = req->enc == LQ_WIRE_Q8K;
    float *x = q8k ? NULL : malloc((size_t)H * sizeof(float)), *y = malloc((size_t)H * sizeof(float));
    double *y64 = req->acc64 ? malloc((size_t)H * sizeof(double)) : NULL;
    if ((!q8k && !x) || !y || (req->acc64 && !y64)) {
        free(x), free(y), free(y64);
        return LQ_E_NOMEM;
    }
    if (q8k) {
        /* the blocks as sent: protocol.py's path does the same (LocalExperts.forward_q8k) */
        rc = lq_moe_ffn64_q8k(table, s->num_experts, H, s->inter, body + req->x_off, 1, req->slots, ids, w, y, y64);
        if (rc == LQ_E_FORMAT) rc = D; /* a float gate_up: the Python path dequantises */
    } else {
        memcpy(x, body + req->x_off, (size_t)H * sizeof(float));
        rc = lq_rms_norm(x, s->norms[req->layer], s->eps, 1, H, x);
        if (rc == LQ_OK) rc = lq_moe_ffn64(table, s->num_experts, H, s->inter, x, 1, req->slots, ids, w, y, y64);
    }
    if (rc == LQ_OK) {
        uint8_t *o = reply + 4;
        *o++ = 0x83;
        o = put_str(o, "id"), o = put_uint(o, req->id);
        o = put_str(o, "ok"), *o++ = 0xc3;
        o = put_str(o, "y"), o = put_bin(o, req->acc64 ? (const void *)y64 : (const void *)y, (uint64_t)(width * H));
        *reply_len = close_frame(reply, o);
    }
    free(x), free(y), free(y64);
    return rc;
}

/* ---- the client's reply --------------------------------------------------------------------- */

int lq_wire_add_reply(const uint8_t *body, int64_t n, uint64_t id, int32_t hidden, int32_t acc64,
                      void *sum, int32_t first, float *out32) {
    if (!body || n <= 0 || !sum || hidden < 1) return D;
    reader r = {body, body + n};
    uint64_t entries, got_id = 0, ylen = 0;
    const uint8_t *y = NULL;
    int seen = 0, ok = 0;
    if (!read_map(&r, &entries) || entries != 3) return D;
    for (int i = 0; i < 3; i++) {
        const uint8_t *k;
        uint64_t kl;
        if (!read_bytes(&r, 0, &k, &kl)) return D;
        if (is(k, kl, "id") && !(seen & 1)) {
            if (!read_uint(&r, &got_id)) return D;
            seen |= 1;
        } else if (is(k, kl, "ok") && !(seen & 2)) {
            if (r.p >= r.end) return D;
            ok = *r.p++ == 0xc3;
            seen |= 2;
        } else if (is(k, kl, "y") && !(seen & 4)) {
            if (!read_bytes(&r, 1, &y, &ylen)) return D;
            seen |= 4;
        } else {
            return D;
        }
    }
    const int64_t width = acc64 ? 8 : 4;
    if (r.p != r.end || !ok || got_id != id || ylen != (uint64_t)(width * hidden)) return D;
    if (acc64 ? !all_finite_f64(y, hidden) : !all_finite_f32(y, hidden)) return D;
    if (acc64) {
        double *s = sum;
        for (int32_t i = 0; i < hidden; i++) {
            double v;
            memcpy(&v, y + 8 * i, 8);
            s[i] = (first ? 0.0 : s[i]) + v;
        }
        if (out32)
            for (int32_t i = 0; i < hidden; i++) out32[i] = (float)s[i];
    } else {
        float *s = sum;
        for (int32_t i = 0; i < hidden; i++) {
            float v;
            memcpy(&v, y + 4 * i, 4);
            s[i] = (first ? 0.0f : s[i]) + v;
        }
    }
    return LQ_OK;
}

/* ---- plain-TCP I/O ---------------------------------------------------------------------------- */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for `events` or the deadline passes. A signal ends the wait of a read
 * (`interruptible`): Python runs its handlers only once the C call returns, so a Ctrl-C would
 * otherwise wait for the reply or the timeout. A write keeps waiting: it may be half done. */
#define SIGNAL_SLICE_MS 50 /* a read returns to Python this often while waiting */

static int wait_fd(int32_t fd, short events, int64_t deadline, int interruptible, int32_t *err) {
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return LQ_WIRE_TIMEOUT;
        /* A signal may have been taken by another thread, whose EINTR this poll never sees:
         * a read also returns every SIGNAL_SLICE_MS so that Python checks for pending signals. */
        int64_t wait = interruptible && left > SIGNAL_SLICE_MS ? SIGNAL_SLICE_MS : left;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, wait > 1000000 ? 1000000 : (int)wait);
        if (r > 0) return LQ_OK; /* ready, or an error the next call reports */
        if (r == 0) {
            if (interruptible && wait < left) return LQ_WIRE_INTERRUPTED;
            continue;            /* the loop rechecks the deadline */
        }
        if (errno != EINTR) return *err = errno, LQ_WIRE_IO;
        if (interruptible) return LQ_WIRE_INTERRUPTED;
    }
}

int lq_wire_write(int32_t fd, const uint8_t *p, int64_t n, int32_t timeout_ms, int32_t *err) {
    int64_t deadline = now_ms() + timeout_ms;
    *err = 0;
    while (n > 0) {
        ssize_t w = send(fd, p, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p += w, n -= w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int rc = wait_fd(fd, POLLOUT, deadline, 0, err);
            if (rc != LQ_OK) return rc;
            continue;
        }
        *err = w < 0 ? errno : EPIPE;
        return LQ_WIRE_IO;
    }
    return LQ_OK;
}

int lq_wire_read_frame(int32_t fd, uint8_t *buf, int64_t cap, int64_t start, int64_t *end, int32_t timeout_ms,
                       int64_t max_frame, int64_t *frame_len, int32_t *err) {
    int64_t deadline = now_ms() + timeout_ms;
    *err = 0;
    for (;;) {
        int64_t have = *end - start;
        if (have >= 4) {
            int64_t body = (int64_t)buf[start] | (int64_t)buf[start + 1] << 8 | (int64_t)buf[start + 2] << 16 |
                           (int64_t)buf[start + 3] << 24;
            if (body > max_frame) return LQ_WIRE_DECLINED;
            if (have >= 4 + body) return *frame_len = 4 + body, LQ_OK;
            if (start + 4 + body > cap) return LQ_WIRE_GROW;
        } else if (start + 4 > cap) {
            return LQ_WIRE_GROW;
        }
        ssize_t r = recv(fd, buf + *end, (size_t)(cap - *end), MSG_DONTWAIT);
        if (r > 0) {
            *end += r;
            continue;
        }
        if (r == 0) return LQ_WIRE_CLOSED;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int rc = wait_fd(fd, POLLIN, deadline, 1, err);
            if (rc != LQ_OK) return rc;
            continue;
        }
        *err = errno;
        return LQ_WIRE_IO;
    }
}

/* ---- a decode step's layer call, all legs ----------------------------------------------------- */

int lq_wire_token_send(lq_wire_leg *const *legs, int32_t n, int32_t layer, const void *x, int32_t enc,
                       const float *norm, float eps, int32_t hidden, const void *ids, int32_t ids64,
                       const float *weights, int32_t slots, int32_t num_experts, int32_t acc64,
                       int32_t timeout_ms) {
    /* the ids are checked once (no slot in [0, -1]) before anything is written */
    int64_t rc = lq_wire_encode_token(NULL, 0, 0, layer, x, enc, hidden, ids, ids64, weights, slots, num_experts,
                                      0, -1, 0);
    if (rc < 0) return (int)rc;
    uint8_t *blocks = NULL;
    if (enc == LQ_WIRE_Q8K && norm) {
        blocks = malloc((size_t)x_row_bytes(LQ_WIRE_Q8K, hidden));
        if (!blocks) return LQ_E_NOMEM;
        int nrc = lq_rms_norm_q8k(x, norm, eps, 1, hidden, blocks);
        if (nrc != LQ_OK) {
            free(blocks);
            return nrc;
        }
        x = blocks;
    }
    for (int32_t i = 0; i < n; i++) {
        lq_wire_leg *g = legs[i];
        int64_t len = lq_wire_encode_token(g->out, g->out_cap, g->id, layer, x, enc, hidden, ids, ids64, weights,
                                           slots, num_experts, g->first, g->last, acc64);
        g->err = 0;
        g->out_len = len > 0 ? len : 0;
        if (len <= 0) {
            g->sent = len == 0 ? 0 : -1;
            continue;
        }
        if (g->fd < 0) {
            g->sent = 3;
            continue;
        }
        int w = lq_wire_write(g->fd, g->out, len, timeout_ms, &g->err);
        g->sent = w == LQ_OK ? 1 : -w;
    }
    free(blocks);
    return LQ_OK;
}

int32_t lq_wire_token_collect(lq_wire_leg *const *legs, int32_t n, int32_t hidden, int32_t acc64, int32_t timeout_ms,
                              int64_t max_frame, void *sum, int32_t first, float *out32) {
    int64_t deadline = now_ms() + timeout_ms;
    for (int32_t i = 0; i < n; i++) {
        lq_wire_leg *g = legs[i];
        if (g->sent == 2) first = 0; /* added by an earlier call */
        if (g->sent == 0 || g->sent == 2) continue;
        if (g->sent < 0) return i; /* its failover goes first: the sums stay in shard order */
        if (g->sent != 1 || g->fd < 0) { /* not written, or a TLS leg: not C's to read */
            g->status = LQ_WIRE_DECLINED;
            return i;
        }
        if (g->in_start == g->in_end) g->in_start = g->in_end = 0;
        int64_t left = deadline - now_ms();
        g->status = left <= 0 ? LQ_WIRE_TIMEOUT
                              : lq_wire_read_frame(g->fd, g->input, g->in_cap, g->in_start, &g->in_end, (int32_t)left,
                                                   max_frame, &g->frame_len, &g->err);
        if (g->status != LQ_OK) return i;
        if (lq_wire_add_reply(g->input + g->in_start + 4, g->frame_len - 4, g->id, hidden, acc64, sum, first,
                              out32) != LQ_OK) {
            g->status = LQ_WIRE_DECLINED;
            return i;
        }
        g->in_start += g->frame_len;
        g->sent = 2;
        first = 0;
    }
    return n;
}
