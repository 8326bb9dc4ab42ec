/* Note [Async mapper]
 *
 * Rationale. Mapping the pages step t+1 needs costs OS/driver calls (µs per run on the host, tens of
 * µs per page for cuMemSetAccess on a GPU). Done on a background thread while step t computes, it
 * leaves the critical path.
 *
 * Approach. One pthread and a FIFO of jobs. submit copies the (virt, phys) arrays into C memory, takes
 * references on the reservation and pool, and returns a ticket at once; wait(ticket) blocks on a
 * condition variable (cffi releases the GIL around the call) and returns the job's status and error.
 *
 * Implementation. Jobs live in one list in submit order; the thread runs the oldest queued job with
 * vmem_map / vmem_unmap, which lock the reservation and roll back a failed batch themselves, so a
 * failure leaves nothing behind. The thread touches no Python object. All signals are blocked in it, so
 * Python's handlers keep running in the main thread. It runs under SCHED_BATCH: on a busy CPU a woken
 * worker that had slept long otherwise preempted the submitting thread for a whole time slice (submit of
 * 4096 pages measured 13 ms instead of 70 µs on the 2-core test machine). close() lets the queue drain,
 * then joins. Threads may wait on their own tickets at once: a waiter unlinks its job from the list
 * only after its wait, looking the predecessor up then (one seen before the wait may be freed by its
 * own waiter meanwhile).
 *
 * Limitations. One thread: jobs run in order, one at a time. A ticket that is never waited stays in
 * the list until close().
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

enum { JOB_QUEUED, JOB_RUNNING, JOB_DONE };

typedef struct job {
    struct job *next;
    uint64_t ticket;
    int state;
    int waited;               /* a wait() owns it: a second waiter must not touch it (freed after) */
    int is_map;
    vmem_resv_t *r;
    vmem_pool_t *p;
    int64_t *virt;
    int64_t *phys;
    int64_t n;
    int status;
    vmem_err_t err;
} job_t;

struct vmem_worker {
    pthread_mutex_t lock;
    pthread_cond_t work;      /* a job was queued, or closing */
    pthread_cond_t done;      /* a job finished */
    pthread_t thread;
    job_t *head, *tail;
    uint64_t next_ticket;
    int64_t pending;
    int closing;
};

/* pre: w->lock held. */
static job_t *next_queued(vmem_worker_t *w)
{
    job_t *j;
    for (j = w->head; j; j = j->next)
        if (j->state == JOB_QUEUED) return j;
    return NULL;
}

/* pre: arg is the vmem_worker_t that started this thread. */
static void *worker_main(void *arg)
{
    vmem_worker_t *w = arg;
#ifdef SCHED_BATCH
    /* background work: a woken worker must not preempt the thread that submitted (the model's), so
     * no wakeup preemption for it (best effort; the policy needs no privilege) */
    struct sched_param sp = {0};
    pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);
#endif
    pthread_mutex_lock(&w->lock);
    for (;;) {
        job_t *j = next_queued(w);
        if (!j) {
            if (w->closing) break;
            pthread_cond_wait(&w->work, &w->lock);
            continue;
        }
        j->state = JOB_RUNNING;
        pthread_mutex_unlock(&w->lock);
        if (j->is_map)
            j->status = vmem_map(j->r, j->p, j->virt, j->phys, j->n, &j->err);
        else
            j->status = vmem_unmap(j->r, j->virt, j->n, &j->err);
        j->err.status = j->status;
        _vmem_resv_drop(j->r);
        if (j->p) _vmem_pool_drop(j->p);
        free(j->virt);
        free(j->phys);
        j->virt = j->phys = NULL;
        pthread_mutex_lock(&w->lock);
        j->state = JOB_DONE;
        w->pending--;
        pthread_cond_broadcast(&w->done);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

/* pre: out != NULL. */
int vmem_worker_create(vmem_worker_t **out)
{
    vmem_worker_t *w;
    sigset_t all, old;
    int rc;
    if (!out) return VMEM_ERR_INVALID;
    w = calloc(1, sizeof(*w));
    if (!w) return VMEM_ERR_OOM;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->done, NULL);
    w->next_ticket = 1;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&w->thread, NULL, worker_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pthread_cond_destroy(&w->work);
        pthread_cond_destroy(&w->done);
        pthread_mutex_destroy(&w->lock);
        free(w);
        return VMEM_ERR_OOM;
    }
    *out = w;
    return VMEM_OK;
}

/* pre: is_map => p, phys given; the arrays hold n entries (copied here). */
static int submit(vmem_worker_t *w, int is_map, vmem_resv_t *r, vmem_pool_t *p, const int64_t *virt,
                  const int64_t *phys, int64_t n, uint64_t *ticket)
{
    job_t *j;
    if (!w || !r || !ticket || n < 0 || (n && !virt) || (is_map && (!p || (n && !phys))))
        return VMEM_ERR_INVALID;
    j = calloc(1, sizeof(*j));
    if (!j) return VMEM_ERR_OOM;
    j->virt = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    j->phys = is_map ? malloc((size_t)(n ? n : 1) * sizeof(int64_t)) : NULL;
    if (!j->virt || (is_map && !j->phys)) {
        free(j->virt);
        free(j->phys);
        free(j);
        return VMEM_ERR_OOM;
    }
    if (n) memcpy(j->virt, virt, (size_t)n * sizeof(int64_t));
    if (is_map && n) memcpy(j->phys, phys, (size_t)n * sizeof(int64_t));
    j->n = n;
    j->is_map = is_map;
    j->r = r;
    j->p = is_map ? p : NULL;
    pthread_mutex_lock(&w->lock);
    if (w->closing) {
        pthread_mutex_unlock(&w->lock);
        free(j->virt);
        free(j->phys);
        free(j);
        return VMEM_ERR_CLOSED;
    }
    _vmem_resv_retain(r);
    if (j->p) _vmem_pool_retain(p);
    j->ticket = w->next_ticket++;
    if (w->tail) w->tail->next = j;
    else w->head = j;
    w->tail = j;
    w->pending++;
    *ticket = j->ticket;
    pthread_mutex_unlock(&w->lock);
    pthread_cond_signal(&w->work);  /* after unlock: the woken worker does not block on the mutex */
    return VMEM_OK;
}

/* pre: w open; r, p open and of one backend; arrays of length n (copied before return). */
int vmem_worker_submit_map(vmem_worker_t *w, vmem_resv_t *r, vmem_pool_t *p, const int64_t *virt,
                           const int64_t *phys, int64_t n, uint64_t *ticket)
{
    return submit(w, 1, r, p, virt, phys, n, ticket);
}

/* pre: w open; r open; virt of length n (copied before return). */
int vmem_worker_submit_unmap(vmem_worker_t *w, vmem_resv_t *r, const int64_t *virt, int64_t n,
                             uint64_t *ticket)
{
    return submit(w, 0, r, NULL, virt, NULL, n, ticket);
}

static job_t *find(vmem_worker_t *w, uint64_t ticket, job_t **prev)
{
    job_t *j, *pv = NULL;
    for (j = w->head; j; pv = j, j = j->next)
        if (j->ticket == ticket) break;
    if (prev) *prev = pv;
    return j;
}

/* pre: ticket from a submit on w, not waited before. Blocks until the job ran.
 * Several threads may wait at once, each on its own ticket: the job is unlinked only after the wait,
 * with its predecessor looked up then (a predecessor seen before the wait may have been freed by its
 * own waiter meanwhile). A second wait on a claimed ticket gets VMEM_ERR_INVALID. */
int vmem_worker_wait(vmem_worker_t *w, uint64_t ticket, vmem_err_t *err)
{
    job_t *j, *prev;
    int status;
    if (!w) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&w->lock);
    j = find(w, ticket, NULL);
    if (!j || j->waited) {
        pthread_mutex_unlock(&w->lock);
        if (err) memset(err, 0, sizeof(*err)), err->status = VMEM_ERR_INVALID, err->index = -1;
        return VMEM_ERR_INVALID;
    }
    j->waited = 1;
    while (j->state != JOB_DONE) pthread_cond_wait(&w->done, &w->lock);
    find(w, ticket, &prev);
    if (prev) prev->next = j->next;
    else w->head = j->next;
    if (w->tail == j) w->tail = prev;
    pthread_mutex_unlock(&w->lock);
    status = j->status;
    if (err) *err = j->err;
    free(j);
    return status;
}

/* pre: w open. */
int vmem_worker_poll(vmem_worker_t *w, uint64_t ticket)
{
    job_t *j;
    int done;
    if (!w) return -1;
    pthread_mutex_lock(&w->lock);
    j = find(w, ticket, NULL);
    done = j ? j->state == JOB_DONE : -1;
    pthread_mutex_unlock(&w->lock);
    return done;
}

/* pre: w open. */
int64_t vmem_worker_pending(vmem_worker_t *w)
{
    int64_t n;
    if (!w) return -1;
    pthread_mutex_lock(&w->lock);
    n = w->pending;
    pthread_mutex_unlock(&w->lock);
    return n;
}

/* pre: w from vmem_worker_create; no thread waits on it. Frees w. */
int vmem_worker_close(vmem_worker_t *w)
{
    job_t *j;
    if (!w) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&w->lock);
    w->closing = 1;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
    while ((j = w->head)) {
        w->head = j->next;
        free(j);
    }
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->done);
    pthread_mutex_destroy(&w->lock);
    free(w);
    return VMEM_OK;
}
