/* Persistent pthread pool with a parallel-for over index ranges.
 *
 * Size: LARQL_NUM_THREADS, default all online cores (lq_set_num_threads changes it).
 * One job runs at a time: concurrent callers (a server's executor threads) queue on a mutex,
 * so every call is safe from any thread. The caller's own thread works too.
 *
 * Work is claimed chunk by chunk from one 64-bit atomic word holding (job generation, next
 * index), so uneven work balances itself and the caller never waits for a worker that has not
 * started: if the other cores are busy (a shared machine), the caller just does every chunk and
 * returns. It waits only for chunks a worker has actually claimed. A worker that wakes late sees
 * a newer generation and claims nothing of the old job.
 *
 * Workers spin for a short while (LARQL_SPIN_US, default 100 us) after a job before sleeping
 * on a condition variable: back-to-back calls (a layer's gate_up then down, the next layer's
 * experts) then start without a futex wake-up each.
 */
#define _GNU_SOURCE /* pthread_setname_np */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"

#define GEN_SHIFT 40 /* next = gen << 40 | index: jobs have fewer than 2^40 items */
#define INDEX_MASK ((1ull << GEN_SHIFT) - 1)

typedef struct {
    pthread_mutex_t submit;      /* serialises jobs (and resizes) */
    pthread_mutex_t m;           /* guards sleeping / waking */
    pthread_cond_t wake;         /* a new job (or stop) */
    pthread_cond_t done;         /* the last claimed chunk finished */
    pthread_t threads[LQ_MAX_THREADS];
    int n_threads;               /* including the caller */
    int stop;
    atomic_ullong gen;           /* generation of the current job */
    atomic_ullong next;          /* gen << GEN_SHIFT | next index to claim */
    atomic_llong done_items;     /* items of the current job finished */
    atomic_int caller_sleeping;
    /* the current job (valid while its generation is in `next`) */
    lq_range_fn fn;
    void *ctx;
    int64_t n, grain;
    int guided;                  /* chunks shrink from n / (2 threads) down to grain */
} lq_pool;

static lq_pool pool = {
    .submit = PTHREAD_MUTEX_INITIALIZER,
    .m = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .done = PTHREAD_COND_INITIALIZER,
};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int64_t spin_ns = 100000;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run chunks of job `gen` until none are left (or the job is gone). */
static void run_job(unsigned long long gen, int tid) {
    for (;;) {
        unsigned long long v = atomic_load_explicit(&pool.next, memory_order_acquire);
        if ((v >> GEN_SHIFT) != (gen & ((1ull << (64 - GEN_SHIFT)) - 1))) return;
        int64_t b = (int64_t)(v & INDEX_MASK);
        /* read the job before claiming: a successful claim proves it was still this job */
        lq_range_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int64_t n = pool.n, grain = pool.grain, len = grain;
        if (b >= n) return;
        if (pool.guided) { /* a share of what is left, in whole grains */
            int64_t share = (n - b) / (2 * (int64_t)pool.n_threads);
            len = share > grain ? (share + grain - 1) / grain * grain : grain;
        }
        int64_t e = b + len < n ? b + len : n;
        if (!atomic_compare_exchange_weak_explicit(&pool.next, &v, v + (unsigned long long)(e - b),
                                                   memory_order_acq_rel, memory_order_acquire))
            continue;
        fn(ctx, b, e, tid);
        /* seq_cst pairs with the caller's store of caller_sleeping then load of done_items:
         * one of the two sides always sees the other, so the last wake-up cannot be lost */
        if (atomic_fetch_add(&pool.done_items, e - b) + (e - b) == n && atomic_load(&pool.caller_sleeping)) {
            pthread_mutex_lock(&pool.m);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.m);
        }
    }
}

typedef struct {
    int tid;
    unsigned long long gen0; /* the generation at creation: any later one is a job for this worker */
} worker_arg;

static worker_arg worker_args[LQ_MAX_THREADS];

static void *worker_main(void *p) {
    int tid = ((worker_arg *)p)->tid;
    unsigned long long seen = ((worker_arg *)p)->gen0;
    for (;;) {
        /* spin a little, then sleep until the generation moves on */
        int64_t until = now_ns() + spin_ns;
        unsigned long long g;
        int k = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            cpu_relax();
            if (++k % 64 == 0 && now_ns() > until) break;
        }
        if (g == seen) {
            pthread_mutex_lock(&pool.m);
            while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen && !pool.stop)
                pthread_cond_wait(&pool.wake, &pool.m);
            pthread_mutex_unlock(&pool.m);
        }
        if (pool.stop) return NULL;
        seen = g;
        run_job(g, tid);
    }
}

static int default_threads(void) {
    const char *s = getenv("LARQL_NUM_THREADS");
    if (s && *s) {
        int n = atoi(s);
        if (n >= 1) return n < LQ_MAX_THREADS ? n : LQ_MAX_THREADS;
    }
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    if (c < 1) c = 1;
    return c < LQ_MAX_THREADS ? (int)c : LQ_MAX_THREADS;
}

/* start workers 1..n-1 (caller holds pool.submit, no workers running) */
/* Workers are born with every signal blocked, so a process-directed signal (Ctrl-C) goes to a
 * thread of the host program, whose interpreter handles it, never to a kernel worker. */
static int start_workers(int n) {
    pool.stop = 0;
    pool.n_threads = 1;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 1; i < n; i++) {
        worker_args[i].tid = i;
        worker_args[i].gen0 = atomic_load(&pool.gen);
        if (pthread_create(&pool.threads[i], NULL, worker_main, &worker_args[i]) != 0) break;
#if defined(__linux__)
        /* named by the creator, so the name is there before the worker first runs */
        pthread_setname_np(pool.threads[i], "larql-kernel"); /* ps -L, top -H, /proc/.../comm */
#endif
        pool.n_threads = i + 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.n_threads == n ? 0 : LQ_E_NOMEM;
}

static void stop_workers(void) {
    pthread_mutex_lock(&pool.m);
    pool.stop = 1;
    atomic_fetch_add(&pool.gen, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.m);
    for (int i = 1; i < pool.n_threads; i++) pthread_join(pool.threads[i], NULL);
    pool.n_threads = 1;
    pool.stop = 0;
}

/* After fork() the child has only the forking thread: forget the workers (their locks may be
 * mid-use) and start new ones on the next job. */
static int restart_after_fork;

static void pool_atfork_child(void) {
    pthread_mutex_init(&pool.submit, NULL);
    pthread_mutex_init(&pool.m, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    restart_after_fork = pool.n_threads;
    pool.n_threads = 1;
    pool.stop = 0;
}

static void pool_init(void) {
    pthread_atfork(NULL, NULL, pool_atfork_child);
    const char *s = getenv("LARQL_SPIN_US");
    if (s && *s) spin_ns = (int64_t)atol(s) * 1000;
    if (spin_ns < 0) spin_ns = 0;
    start_workers(default_threads());
}

int lq_set_num_threads(int n) {
    if (n < 0) return LQ_E_SHAPE;
    if (n == 0) n = default_threads();
    if (n > LQ_MAX_THREADS) n = LQ_MAX_THREADS;
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool.submit);
    restart_after_fork = 0;
    int rc = LQ_OK;
    if (n != pool.n_threads) {
        stop_workers();
        rc = start_workers(n);
    }
    pthread_mutex_unlock(&pool.submit);
    return rc;
}

int lq_get_num_threads(void) {
    pthread_once(&pool_once, pool_init);
    return pool.n_threads;
}

static void parallel_for(int64_t n, int64_t grain, int guided, lq_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool.submit);
    if (restart_after_fork) {
        int want = restart_after_fork;
        restart_after_fork = 0;
        start_workers(want);
    }
    if (pool.n_threads == 1 || n <= grain) {
        /* one chunk: waking anybody would only cost time */
        for (int64_t b = 0; b < n; b += grain) fn(ctx, b, b + grain < n ? b + grain : n, 0);
        pthread_mutex_unlock(&pool.submit);
        return;
    }
    /* publish: job fields, then the claim word (release), then the generation workers watch */
    unsigned long long g = atomic_load_explicit(&pool.gen, memory_order_relaxed) + 1;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.grain = grain;
    pool.guided = guided;
    atomic_store_explicit(&pool.done_items, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.next, (g & ((1ull << (64 - GEN_SHIFT)) - 1)) << GEN_SHIFT, memory_order_release);
    pthread_mutex_lock(&pool.m);
    atomic_store_explicit(&pool.gen, g, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.m);

    run_job(g, 0);

    /* every chunk is claimed; wait for the ones still running elsewhere: spin, then sleep */
    int64_t until = now_ns() + spin_ns;
    int k = 0;
    while (atomic_load_explicit(&pool.done_items, memory_order_acquire) != n) {
        cpu_relax();
        if (++k % 64 == 0 && now_ns() > until) {
            pthread_mutex_lock(&pool.m);
            atomic_store(&pool.caller_sleeping, 1);
            while (atomic_load(&pool.done_items) != n)
                pthread_cond_wait(&pool.done, &pool.m);
            atomic_store_explicit(&pool.caller_sleeping, 0, memory_order_relaxed);
            pthread_mutex_unlock(&pool.m);
            break;
        }
    }
    pthread_mutex_unlock(&pool.submit);
}

void lq_parallel_for(int64_t n, int64_t grain, lq_range_fn fn, void *ctx) { parallel_for(n, grain, 0, fn, ctx); }

void lq_parallel_for_guided(int64_t n, int64_t grain, lq_range_fn fn, void *ctx) { parallel_for(n, grain, 1, fn, ctx); }
