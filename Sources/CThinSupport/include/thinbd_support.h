#ifndef THINBD_SUPPORT_H
#define THINBD_SUPPORT_H
// Values and calls that Swift's Glibc module hides behind _GNU_SOURCE. They live in a
// C file so that no header seen by Swift defines _GNU_SOURCE (that would give system
// types a second, conflicting definition).

/// The O_DIRECT open flag.
int thinbd_o_direct(void);

/// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE); returns 0 or -1 with errno set.
int thinbd_punch_hole(int fd, long long offset, long long length);
/* fallocate without changing the size: host storage for the range, now. */
int thinbd_allocate(int fd, long long offset, long long length);
#include <pthread.h>

/// Initializes a read-write lock that prefers writers (waiting writers block new readers).
int thinbd_rwlock_init_writer_preferring(pthread_rwlock_t *lock);

/// Names the calling thread (at most 15 bytes are kept), for ps, top and gdb.
void thinbd_name_this_thread(const char *name);

/// Sets glibc's mmap and trim thresholds (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD);
/// returns 1 when both were taken, 0 otherwise.
int thinbd_set_allocator_thresholds(int mmap_threshold, int trim_threshold);

/// eventfd(0, EFD_CLOEXEC); returns the descriptor or -1 with errno set.
int thinbd_eventfd(void);

/// A new epoll instance (close-on-exec) that watches `fd` for input, level-triggered,
/// as an event loop watches its descriptors; returns it, or -1 with errno set.
int thinbd_epoll_watching(int fd);

/// An epoll instance of the server's own (close-on-exec); -1 with errno set on failure.
int thinbd_poller_create(void);

/// What a poller entry waits for, and what `thinbd_poller_wait` reports.
enum {
    THINBD_POLL_READABLE = 1,
    THINBD_POLL_WRITABLE = 2,
    /// Error or hang-up (reported only).
    THINBD_POLL_FAILED = 4,
};

/// epoll_ctl ADD (op 0), MODIFY (1) or DELETE (2) of `fd`, level-triggered, for the
/// THINBD_POLL_* bits in `interest` (readable includes the peer's half-close), reported
/// with `token`. Returns 0, or -1 with errno set.
int thinbd_poller_control(int poller, int op, int fd, unsigned interest, unsigned long long token);

/// One ready descriptor.
typedef struct {
    unsigned long long token;
    unsigned events;
} thinbd_poll_ready;

/// epoll_wait for at most `capacity` (up to 256) descriptors and `timeout_ms`; returns
/// how many were filled in, 0 on timeout or a signal, or -1 with errno set.
int thinbd_poller_wait(int poller, thinbd_poll_ready *ready, int capacity, int timeout_ms);

/// preadv2(RWF_NOWAIT) of one buffer: reads only what the page cache holds. Returns the
/// byte count, or -1 with errno set (EAGAIN: the data is not cached).
long thinbd_pread_nowait(int fd, void *buffer, unsigned long length, long long offset);

/// Whether the page cache holds every page of the byte range, asked with cachestat(2)
/// (Linux 6.5), which, unlike a RWF_NOWAIT read that misses, starts no readahead.
/// Returns 1 (all cached), 0 (not all), or -1 when the kernel cannot say (no cachestat).
int thinbd_range_cached(int fd, long long offset, unsigned long length);

/// Dirty pages the page cache holds in the byte range (cachestat), or -1 when the
/// kernel cannot say.
long long thinbd_range_dirty_pages(int fd, long long offset, unsigned long length);

/// pwritev2(RWF_DSYNC) of one buffer: returns once the bytes written are durable, as
/// fdatasync of that range would make them. Returns the byte count, or -1 with errno.
long thinbd_pwrite_dsync(int fd, const void *buffer, unsigned long length, long long offset);

/// sync_file_range: starts the write-back of the range's dirty pages and, with `wait`,
/// waits for it (WAIT_BEFORE | WRITE | WAIT_AFTER); no cache flush, no metadata.
/// 0, or -1 with errno set.
int thinbd_write_back_range(int fd, long long offset, long long length, int wait);

/// fstatfs's f_type (the file system's magic number), or -1 with errno set.
long long thinbd_file_system_type(int fd);

/// An io_uring instance (liburing's, behind this small interface).
typedef struct thinbd_ring thinbd_ring;

/// A ring with room for `entries` submissions whose completions signal `eventfd`.
/// Returns NULL with `*error` set to the errno value when the kernel refuses.
thinbd_ring *thinbd_ring_create(unsigned entries, int eventfd, int *error);

/// Waits for nothing: the kernel finishes what is in flight, then the ring goes.
void thinbd_ring_destroy(thinbd_ring *ring);

/// Whether the ring was set up with cooperative task running (completions made on
/// other threads are posted when the owner next enters the kernel, without an
/// interrupt); 0 on kernels that refused it.
int thinbd_ring_is_cooperative(thinbd_ring *ring);

/// Submission entries free now.
unsigned thinbd_ring_space(thinbd_ring *ring);

/// Fills a submission entry: a read (write = 0) or write of `length` bytes at `offset`
/// of `fd`, carrying `data` to its completion. Returns -1 when no entry is free.
int thinbd_ring_prepare(thinbd_ring *ring, int write, int fd, void *buffer, unsigned length,
                        unsigned long long offset, unsigned long long data);

/// Hands every filled entry to the kernel: the count, or -errno.
int thinbd_ring_submit(thinbd_ring *ring);

/// Copies up to `capacity` completions (data and result) out, releases them, and
/// returns how many. Never waits.
unsigned thinbd_ring_reap(thinbd_ring *ring, unsigned long long *data, int *results, unsigned capacity);

/// Waits until a completion is there (without taking it): 0 or -errno.
int thinbd_ring_wait(thinbd_ring *ring);
#endif
