/* The decode step's wire messages in C (csrc/wire.c): the one-token `experts` request and its
 * reply, built, parsed and validated without Python objects.
 *
 * Why: between two kernel calls the interpreter's code and data are evicted from the caches by
 * the weights streaming through, so each Python step of a layer's round trip runs cold. Measured
 * on the 2-vCPU dev VM (AMD Zen 3), cold, one shard: the server spent ~430 us per request in
 * Python around an 1800 us kernel call (decode_work alone 110 us cold against 22 us hot), the
 * client ~300 us; a bare loopback echo costs ~100 us.
 *
 * larql/protocol.py stays the definition of the protocol and of every error message: these
 * functions accept only the common well-formed case and decline (LQ_WIRE_DECLINED) anything
 * else, including every invalid message, which then takes the Python path and gets its error
 * there. An accepted message is one protocol.py accepts with the same meaning (tests check
 * this on random and mutated frames). Payload bytes are little-endian (x86-64, AArch64).
 */
#ifndef LARQL_WIRE_H
#define LARQL_WIRE_H

#include <stdint.h>

#include "larql.h"

enum {
    LQ_WIRE_DECLINED = 1, /* not the hot case: use protocol.py */
    LQ_WIRE_CLOSED = 2,   /* the peer closed the connection */
    LQ_WIRE_TIMEOUT = 3,  /* nothing (more) within the time given */
    LQ_WIRE_IO = 4,       /* a socket error: errno in *err */
    LQ_WIRE_GROW = 5,     /* the frame does not fit the buffer: the caller makes room */
    LQ_WIRE_INTERRUPTED = 6 /* a signal arrived, or 50 ms passed, while waiting: the caller
                               runs its signal handlers (Ctrl-C) and calls again; nothing read
                               is lost */
};

/* The input encodings the C path takes (protocol.ENCODINGS; "f16" goes through Python). */
enum {
    LQ_WIRE_F32 = 0, /* the raw residual h, f32 [tokens, hidden] */
    LQ_WIRE_Q8K = 2  /* pre_feedforward_layernorm_2(h) in Q8_K: [tokens] rows of ceil(hidden / 256)
                        292-byte blocks (4 fewer bytes per value: 3.2 KB instead of 11 KB a token) */
};

/* A validated `experts` request: byte offsets into the body it was parsed from. */
typedef struct {
    uint64_t id;
    int32_t layer, tokens, slots;
    int32_t acc64;                 /* 1: the reply carries f64 partial sums ("acc": "f64") */
    int32_t enc;                   /* LQ_WIRE_F32 or LQ_WIRE_Q8K */
    int64_t x_off, ids_off, w_off; /* x [tokens] rows, int32 [tokens, slots], f32 [tokens, slots] */
} lq_wire_request;

/* LQ_OK and *req filled if body is an `experts` map that protocol.decode_work accepts with enc
 * "f32" or "q8k" (types, ranges, byte lengths, ids in [-1, num_experts) and distinct per token,
 * w finite; x finite, or for q8k every block's scale finite and its group sums those of its
 * quants) and whose keys are exactly id, op, layer, T, K, x, ids, w, optional enc and acc, each
 * once, with nothing after the map; LQ_WIRE_DECLINED otherwise. */
int lq_wire_parse_experts(const uint8_t *body, int64_t n, int32_t hidden, int32_t num_layers,
                          int32_t num_experts, int32_t max_tokens, lq_wire_request *req);

/* What a server's hot path needs about the layers it serves (owned by the Python server). */
typedef struct {
    int32_t hidden, inter, num_layers, num_experts;
    float eps;                          /* of pre_feedforward_layernorm_2 */
    const lq_expert *const *tables;     /* [num_layers]: held experts (gate_up NULL = not held);
                                           NULL = this layer goes through Python */
    const float *const *norms;          /* [num_layers]: pre_feedforward_layernorm_2 weights */
    const int32_t *fds;                 /* [num_layers]: the mapped layer file (fstat) */
    const int64_t *sizes;               /* [num_layers]: its size when mapped */
    int32_t norms_fd;                   /* norms.bin, or -1 */
    int64_t norms_size;
} lq_wire_shard;

/* A one-token `experts` request answered in C: parse and validate (as lq_wire_parse_experts),
 * check the layer is served here (tables[layer] set), every expert is held and neither file
 * shrank since mapped (fstat; a read past the end of a mapping is SIGBUS), then
 * rms_norm -> lq_moe_ffn64 (f32), or lq_moe_ffn64_q8k on the blocks as sent (q8k; declined if an
 * expert has a float gate_up) -> the reply frame (4-byte length + {id, ok: true, y}), byte for
 * byte what the Python server sends, in reply[0, *reply_len). LQ_WIRE_DECLINED for anything else
 * (nothing computed, *req filled when the parse succeeded); a negative LQ_E_* code if the kernel
 * failed. */
int lq_wire_serve_token(const lq_wire_shard *shard, const uint8_t *body, int64_t n, uint8_t *reply,
                        int64_t cap, int64_t *reply_len, lq_wire_request *req);

/* The request frame (4-byte length + msgpack) the client sends one shard for one token: the
 * slots whose expert is in [first, last], in order, as larql.client.core's planner builds it
 * (keys op, layer, T, K, enc, x, ids, w, [acc], id). x is one row in encoding enc (f32 h, or
 * its normed Q8_K blocks). ids are int32, or int64 if ids64.
 * Returns the frame's bytes; 0 if no slot falls in the range (nothing written: out may be NULL
 * to check the ids alone); LQ_E_SHAPE if cap is too small or the slots > 16; LQ_E_EXPERT if an
 * id is outside [-1, num_experts). */
int64_t lq_wire_encode_token(uint8_t *out, int64_t cap, uint64_t id, int32_t layer, const void *x,
                             int32_t enc, int32_t hidden, const void *ids, int32_t ids64, const float *weights,
                             int32_t slots, int32_t num_experts, int32_t first, int32_t last,
                             int32_t acc64);

/* A reply body {id, ok: true, y} (keys in any order, nothing else) to request `id`, whose y is
 * [hidden] f32 (acc64 0) or f64 (acc64 1) and all finite: LQ_OK, and y added into sum (float *
 * or double *; `first` assigns 0 + y instead), the f64 sum then rounded into out32 unless NULL.
 * LQ_WIRE_DECLINED (nothing written) for anything else: an error reply, another id, a bad size,
 * a NaN; the caller decodes it in Python. */
int lq_wire_add_reply(const uint8_t *body, int64_t n, uint64_t id, int32_t hidden, int32_t acc64,
                      void *sum, int32_t first, float *out32);

/* Plain-TCP I/O for the client's decode step, without the interpreter (TLS sockets stay in
 * Python). fd may be non-blocking (a Python socket with a timeout): waits use poll(2). */

/* Write all n bytes within timeout_ms: LQ_OK, LQ_WIRE_TIMEOUT or LQ_WIRE_IO. */
int lq_wire_write(int32_t fd, const uint8_t *p, int64_t n, int32_t timeout_ms, int32_t *err);

/* Read into buf[*end, cap) until buf[start, *end) begins with a whole frame (4-byte length +
 * body): LQ_OK and *frame_len = 4 + body length. LQ_WIRE_DECLINED if the announced length is
 * above max_frame, LQ_WIRE_GROW if the frame cannot end before cap (the caller compacts or
 * grows the buffer and reads on), LQ_WIRE_CLOSED, LQ_WIRE_TIMEOUT, LQ_WIRE_IO or
 * LQ_WIRE_INTERRUPTED. *end always counts every byte read. */
int lq_wire_read_frame(int32_t fd, uint8_t *buf, int64_t cap, int64_t start, int64_t *end, int32_t timeout_ms,
                       int64_t max_frame, int64_t *frame_len, int32_t *err);

/* One shard's part of a decode step's layer call, for lq_wire_token_send/_collect. */
typedef struct {
    int32_t fd;                /* in: the replica's socket on plain TCP; -1 (TLS): send only
                                  builds the request, for the caller to write */
    int32_t first, last;       /* in: the shard's expert range */
    uint64_t id;               /* in: the request id */
    uint8_t *out;              /* in: request buffer (frame_capacity bytes) */
    int64_t out_cap;
    uint8_t *input;            /* in: the connection's read buffer, unread bytes [in_start, in_end) */
    int64_t in_cap, in_start, in_end;
    int32_t sent;              /* out (send): 1 request written, 0 no slot in range, < 0 write failed,
                                  3 built in out[0, out_len) and not written (fd -1: the caller
                                  writes it and sets 1); (collect) 2 once its reply was added */
    int64_t out_len;           /* out (send): the request frame's bytes */
    int32_t status;            /* out (collect): LQ_OK added, else the lq_wire_read_frame code or
                                  LQ_WIRE_DECLINED (a whole frame of frame_len bytes at in_start) */
    int32_t err;               /* errno of a failed write or read */
    int64_t frame_len;
} lq_wire_leg;

/* legs: one pointer per shard of the call, in shard order (each connection keeps its leg). */

/* Encode and write each leg's request (as lq_wire_encode_token, then lq_wire_write; a leg with
 * fd -1 is only encoded: TLS records are written by Python's ssl); every leg gets `sent`.
 * LQ_E_EXPERT (nothing written) if an id is outside [-1, num_experts). With enc LQ_WIRE_Q8K
 * and a norm weight, x is the raw f32 h and the blocks sent are lq_rms_norm_q8k(h, norm, eps):
 * in Python that step cost ~60 us a layer, run cold between two kernel calls (7 us warm), on
 * the 2-vCPU dev VM. */
int lq_wire_token_send(lq_wire_leg *const *legs, int32_t n, int32_t layer, const void *x, int32_t enc,
                       const float *norm, float eps, int32_t hidden, const void *ids, int32_t ids64, const float *weights, int32_t slots,
                       int32_t num_experts, int32_t acc64, int32_t timeout_ms);

/* Read and add the replies of the legs with sent == 1, in order, into sum (as lq_wire_add_reply;
 * `first`: no partial sum added before this call), rounding an f64 sum into out32; an added leg's
 * sent becomes 2 and a later call skips it. Stops at the first leg that is not a plain success (a
 * failed write included; a TLS leg, fd -1, with status LQ_WIRE_DECLINED) and returns its index:
 * its status says why, later legs are untouched, so the caller keeps the shard order (after
 * LQ_WIRE_INTERRUPTED it calls again). Returns n once every leg was added. timeout_ms covers
 * all the legs. */
int32_t lq_wire_token_collect(lq_wire_leg *const *legs, int32_t n, int32_t hidden, int32_t acc64, int32_t timeout_ms,
                              int64_t max_frame, void *sum, int32_t first, float *out32);

#endif
