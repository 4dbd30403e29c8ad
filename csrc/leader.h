/* Lazy leader/follower token for the server's worker pool.
 *
 * All workers of one server share its sockets, which libzmq does not allow
 * two threads to touch at once.  The token says who may: its owner (the
 * leader) receives a message and runs the handler itself, so a fast request
 * costs no thread hand-off.  While the leader is inside a handler it does not
 * touch the sockets; if that handler runs longer than `patience`, one waiting
 * follower (the standby) takes the token and serves the next messages, so a
 * slow method never blocks the others.  Ownership is a generation number: a
 * worker whose generation is no longer current knows it was replaced.
 *
 * Everything here runs without the GIL.  Costs on the message path: two
 * uncontended mutex round trips per message (lf_busy, lf_idle).  The standby
 * wakes every `patience` while the server is active and parks after
 * LF_PARK_AFTER quiet checks; only the first message after such a quiet
 * spell pays for waking it. */
#ifndef NZF_LEADER_H
#define NZF_LEADER_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>

enum { LF_IDLE = 0, LF_BUSY = 1 };

/* Quiet checks (of `patience` each) before the standby parks. */
#define LF_PARK_AFTER 50

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t followers;   /* workers waiting to become standby/leader */
    pthread_cond_t watch;       /* the standby, watching the leader */
    uint64_t owner;             /* generation of the leader, 0 if free */
    uint64_t last_gen;
    uint64_t busy_seq;          /* counts the leader's handler runs */
    int phase;                  /* LF_IDLE or LF_BUSY */
    int standby;                /* a follower is watching */
    int standby_parked;         /* ... and sleeps with no timeout */
    int waiting;                /* followers not yet watching */
    int closed;
    int64_t patience_ns;
} lf_token;

static int64_t lf_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int lf_init(lf_token *t, int64_t patience_ns)
{
    pthread_condattr_t attr;
    int rc;
    if ((rc = pthread_mutex_init(&t->mu, NULL)) != 0) return rc;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if ((rc = pthread_cond_init(&t->followers, &attr)) == 0 &&
        (rc = pthread_cond_init(&t->watch, &attr)) != 0)
        pthread_cond_destroy(&t->followers);
    pthread_condattr_destroy(&attr);
    if (rc != 0) { pthread_mutex_destroy(&t->mu); return rc; }
    t->owner = t->last_gen = t->busy_seq = 0;
    t->phase = LF_IDLE;
    t->standby = t->standby_parked = t->waiting = t->closed = 0;
    t->patience_ns = patience_ns;
    return 0;
}

static void lf_destroy(lf_token *t)
{
    pthread_cond_destroy(&t->watch);
    pthread_cond_destroy(&t->followers);
    pthread_mutex_destroy(&t->mu);
}

/* Caller holds mu. */
static uint64_t lf_take_locked(lf_token *t)
{
    t->owner = ++t->last_gen;
    t->phase = LF_IDLE;
    return t->owner;
}

static void lf_deadline(struct timespec *ts, int64_t at_ns)
{
    ts->tv_sec = at_ns / 1000000000;
    ts->tv_nsec = at_ns % 1000000000;
}

/* Block until this worker leads.  Returns its generation, or 0 once the
 * token is closed.  *stole is set when the token was taken from a leader
 * stuck in a handler (the pool may then want one more worker). */
static uint64_t lf_follow(lf_token *t, int *stole)
{
    uint64_t gen = 0;
    *stole = 0;
    pthread_mutex_lock(&t->mu);
    t->waiting++;
    while (!t->closed) {
        if (t->owner == 0) { gen = lf_take_locked(t); break; }
        if (t->standby) { pthread_cond_wait(&t->followers, &t->mu); continue; }

        /* Become the standby: watch the leader until the token frees up or
         * the leader has been inside one handler for `patience`.  While the
         * server is active the standby checks every `patience`; after
         * LF_PARK_AFTER quiet checks it parks, and lf_busy() wakes it. */
        t->standby = 1;
        t->waiting--;
        uint64_t seen = t->busy_seq;
        int quiet = LF_PARK_AFTER;          /* park until the leader is busy */
        while (!t->closed && t->owner != 0 && gen == 0) {
            struct timespec ts;
            if (t->phase != LF_BUSY) {
                if (t->busy_seq != seen) { seen = t->busy_seq; quiet = 0; }
                if (quiet >= LF_PARK_AFTER) {
                    t->standby_parked = 1;
                    pthread_cond_wait(&t->watch, &t->mu);
                    t->standby_parked = 0;
                    quiet = 0;
                } else {
                    lf_deadline(&ts, lf_now_ns() + t->patience_ns);
                    pthread_cond_timedwait(&t->watch, &t->mu, &ts);
                    quiet++;
                }
                continue;
            }
            uint64_t seq = t->busy_seq;
            int64_t until = lf_now_ns() + t->patience_ns;
            lf_deadline(&ts, until);
            while (!t->closed && t->owner != 0 && t->phase == LF_BUSY &&
                   t->busy_seq == seq) {
                if (pthread_cond_timedwait(&t->watch, &t->mu, &ts) == ETIMEDOUT
                    || lf_now_ns() >= until) {
                    if (t->owner != 0 && t->phase == LF_BUSY && t->busy_seq == seq) {
                        gen = lf_take_locked(t);
                        *stole = 1;
                    }
                    break;
                }
            }
            seen = t->busy_seq;
            quiet = 0;
        }
        t->standby = 0;
        t->waiting++;
        /* Let another follower take over the watch. */
        pthread_cond_signal(&t->followers);
        if (gen) break;
    }
    t->waiting--;
    pthread_mutex_unlock(&t->mu);
    return gen;
}

/* Lead from the calling thread, with no worker threads (an event loop that
 * serves the sockets when they are ready): take the token if nobody holds
 * it.  The leader starts out BUSY, not touching the sockets; lf_idle()
 * before each turn, lf_busy() after it.  Returns its generation, or 0. */
static uint64_t lf_lead(lf_token *t)
{
    uint64_t gen = 0;
    pthread_mutex_lock(&t->mu);
    if (!t->closed && t->owner == 0) {
        gen = lf_take_locked(t);
        t->phase = LF_BUSY;
    }
    pthread_mutex_unlock(&t->mu);
    return gen;
}

/* For code that must touch the sockets without being sure it still leads
 * (a reply from a worker that may have been replaced): hold mu, then check
 * `owner` and `closed`. */
static void lf_lock(lf_token *t) { pthread_mutex_lock(&t->mu); }
static void lf_unlock(lf_token *t) { pthread_mutex_unlock(&t->mu); }

/* The leader enters a handler: from now on the standby may take over. */
static void lf_busy(lf_token *t, uint64_t gen)
{
    pthread_mutex_lock(&t->mu);
    if (t->owner == gen) {
        t->phase = LF_BUSY;
        t->busy_seq++;
        if (t->standby_parked) pthread_cond_signal(&t->watch);
    }
    pthread_mutex_unlock(&t->mu);
}

/* The handler returned.  1: still the leader (and idle again);
 * 0: the token moved on or was closed, so go back to following. */
static int lf_idle(lf_token *t, uint64_t gen)
{
    int still;
    pthread_mutex_lock(&t->mu);
    still = t->owner == gen && !t->closed;
    if (still) t->phase = LF_IDLE;
    pthread_mutex_unlock(&t->mu);
    return still;
}

/* The leader, told to stop, closes the token: nobody leads after it. */
static void lf_close_owner(lf_token *t, uint64_t gen)
{
    pthread_mutex_lock(&t->mu);
    if (t->owner == gen) {
        t->owner = 0;
        t->closed = 1;
        pthread_cond_broadcast(&t->watch);
        pthread_cond_broadcast(&t->followers);
    }
    pthread_mutex_unlock(&t->mu);
}

/* Close the token if nobody is touching the sockets: no leader, or a leader
 * inside a handler (which only touches them under mu, after checking
 * `closed`).  Returns 1 once closed. */
static int lf_try_close(lf_token *t)
{
    int done;
    pthread_mutex_lock(&t->mu);
    done = t->closed || t->owner == 0 || t->phase == LF_BUSY;
    if (done && !t->closed) {
        t->closed = 1;
        pthread_cond_broadcast(&t->watch);
        pthread_cond_broadcast(&t->followers);
    }
    pthread_mutex_unlock(&t->mu);
    return done;
}

#endif
