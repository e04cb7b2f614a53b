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

/// eventfd(0, EFD_CLOEXEC); returns the descriptor or -1 with errno set.
int thinbd_eventfd(void);

/// preadv2(RWF_NOWAIT) of one buffer: reads only what the page cache holds. Returns the
/// byte count, or -1 with errno set (EAGAIN: the data is not cached).
long thinbd_pread_nowait(int fd, void *buffer, unsigned long length, long long offset);
#endif
