#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/vfs.h>
#include <stdlib.h>
#include <malloc.h>
#include <liburing.h>
#include "thinbd_support.h"

int thinbd_o_direct(void) { return O_DIRECT; }

int thinbd_punch_hole(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int thinbd_allocate(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int thinbd_eventfd(void) { return eventfd(0, EFD_CLOEXEC); }

int thinbd_epoll_watching(int fd) {
    int epoll = epoll_create1(EPOLL_CLOEXEC);
    if (epoll < 0) return -1;
    struct epoll_event interest = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &interest) != 0) {
        int saved = errno;
        close(epoll);
        errno = saved;
        return -1;
    }
    return epoll;
}

int thinbd_poller_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int thinbd_poller_control(int poller, int op, int fd, unsigned interest, unsigned long long token) {
    static const int operations[] = {EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL};
    if (op < 0 || op > 2) {
        errno = EINVAL;
        return -1;
    }
    struct epoll_event event = {.events = 0, .data.u64 = token};
    if (interest & THINBD_POLL_READABLE) event.events |= EPOLLIN | EPOLLRDHUP;
    if (interest & THINBD_POLL_WRITABLE) event.events |= EPOLLOUT;
    return epoll_ctl(poller, operations[op], fd, &event);
}

int thinbd_poller_wait(int poller, thinbd_poll_ready *ready, int capacity, int timeout_ms) {
    struct epoll_event events[256];
    if (capacity > 256) capacity = 256;
    if (capacity < 1) capacity = 1;
    int count = epoll_wait(poller, events, capacity, timeout_ms);
    if (count < 0) return errno == EINTR ? 0 : -1;
    for (int i = 0; i < count; i++) {
        unsigned bits = 0;
        if (events[i].events & (EPOLLIN | EPOLLRDHUP)) bits |= THINBD_POLL_READABLE;
        if (events[i].events & EPOLLOUT) bits |= THINBD_POLL_WRITABLE;
        if (events[i].events & (EPOLLERR | EPOLLHUP)) bits |= THINBD_POLL_FAILED;
        ready[i].token = events[i].data.u64;
        ready[i].events = bits;
    }
    return count;
}

int thinbd_rwlock_init_writer_preferring(pthread_rwlock_t *lock) {
    pthread_rwlockattr_t attributes;
    pthread_rwlockattr_init(&attributes);
    pthread_rwlockattr_setkind_np(&attributes, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int result = pthread_rwlock_init(lock, &attributes);
    pthread_rwlockattr_destroy(&attributes);
    return result;
}

long thinbd_pread_nowait(int fd, void *buffer, unsigned long length, long long offset) {
    struct iovec vector = { .iov_base = buffer, .iov_len = length };
    return (long)preadv2(fd, &vector, 1, (off_t)offset, RWF_NOWAIT);
}

long thinbd_pwrite_dsync(int fd, const void *buffer, unsigned long length, long long offset) {
    struct iovec vector = { .iov_base = (void *)buffer, .iov_len = length };
    return (long)pwritev2(fd, &vector, 1, (off_t)offset, RWF_DSYNC);
}

int thinbd_write_back_range(int fd, long long offset, long long length, int wait) {
    unsigned flags = wait ? SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
                          : SYNC_FILE_RANGE_WRITE;
    return sync_file_range(fd, (off64_t)offset, (off64_t)length, flags);
}

long long thinbd_file_system_type(int fd) {
    struct statfs status;
    if (fstatfs(fd, &status) != 0) return -1;
    return (long long)status.f_type;
}

#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif

// The kernel's cachestat ABI (include/uapi/linux/mman.h), declared here because the
// build machine's headers may predate it.
struct thinbd_cachestat_range { uint64_t off; uint64_t len; };
struct thinbd_cachestat {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

static int thinbd_cachestat(int fd, long long offset, unsigned long length, struct thinbd_cachestat *status) {
    struct thinbd_cachestat_range range = { (uint64_t)offset, length };
    return (int)syscall(__NR_cachestat, fd, &range, status, 0);
}

long long thinbd_range_dirty_pages(int fd, long long offset, unsigned long length) {
    struct thinbd_cachestat status;
    if (thinbd_cachestat(fd, offset, length, &status) != 0) return -1;
    return (long long)status.nr_dirty;
}

int thinbd_range_cached(int fd, long long offset, unsigned long length) {
    if (length == 0) return 1;
    struct thinbd_cachestat status;
    if (thinbd_cachestat(fd, offset, length, &status) != 0) return -1;
    long page = sysconf(_SC_PAGESIZE);
    uint64_t first = (uint64_t)offset / (uint64_t)page;
    uint64_t last = ((uint64_t)offset + length - 1) / (uint64_t)page;
    return status.nr_cache >= last - first + 1 ? 1 : 0;
}

struct thinbd_ring {
    struct io_uring ring;
};

thinbd_ring *thinbd_ring_create(unsigned entries, int eventfd, int *error) {
    thinbd_ring *ring = calloc(1, sizeof(*ring));
    if (!ring) {
        *error = 12; /* ENOMEM */
        return NULL;
    }
    // Cooperative task running: a completion made on another thread (an io-wq worker
    // finishing a buffered write, a block device's interrupt) is posted the next time
    // the owner enters the kernel, instead of with an inter-processor interrupt that
    // stops it wherever it is. A sleeping owner is still woken. The owner of a loop
    // ring is in the kernel every round (epoll, the sockets), so nothing waits longer;
    // in a virtual machine each such interrupt is an exit to the host. Kernels before
    // 5.19 refuse the flag, and get the ring without it.
    int r = io_uring_queue_init(entries, &ring->ring, IORING_SETUP_COOP_TASKRUN);
    if (r == -EINVAL) r = io_uring_queue_init(entries, &ring->ring, 0);
    if (r < 0) {
        free(ring);
        *error = -r;
        return NULL;
    }
    r = io_uring_register_eventfd(&ring->ring, eventfd);
    if (r < 0) {
        io_uring_queue_exit(&ring->ring);
        free(ring);
        *error = -r;
        return NULL;
    }
    return ring;
}

void thinbd_ring_destroy(thinbd_ring *ring) {
    io_uring_queue_exit(&ring->ring);
    free(ring);
}

int thinbd_ring_is_cooperative(thinbd_ring *ring) {
    return (ring->ring.flags & IORING_SETUP_COOP_TASKRUN) != 0;
}

unsigned thinbd_ring_space(thinbd_ring *ring) { return io_uring_sq_space_left(&ring->ring); }

int thinbd_ring_prepare(thinbd_ring *ring, int write, int fd, void *buffer, unsigned length,
                        unsigned long long offset, unsigned long long data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
    if (!sqe) return -1;
    if (write) {
        io_uring_prep_write(sqe, fd, buffer, length, offset);
    } else {
        io_uring_prep_read(sqe, fd, buffer, length, offset);
    }
    io_uring_sqe_set_data64(sqe, data);
    return 0;
}

int thinbd_ring_submit(thinbd_ring *ring) { return io_uring_submit(&ring->ring); }

unsigned thinbd_ring_reap(thinbd_ring *ring, unsigned long long *data, int *results, unsigned capacity) {
    struct io_uring_cqe *cqe;
    unsigned head, count = 0;
    io_uring_for_each_cqe(&ring->ring, head, cqe) {
        if (count == capacity) break;
        data[count] = io_uring_cqe_get_data64(cqe);
        results[count] = cqe->res;
        count++;
    }
    io_uring_cq_advance(&ring->ring, count);
    return count;
}

int thinbd_ring_wait(thinbd_ring *ring) {
    struct io_uring_cqe *cqe;
    return io_uring_wait_cqe(&ring->ring, &cqe);
}

void thinbd_name_this_thread(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }

int thinbd_set_allocator_thresholds(int mmap_threshold, int trim_threshold) {
    int mmap_set = mallopt(M_MMAP_THRESHOLD, mmap_threshold);
    int trim_set = mallopt(M_TRIM_THRESHOLD, trim_threshold);
    return mmap_set == 1 && trim_set == 1;
}
