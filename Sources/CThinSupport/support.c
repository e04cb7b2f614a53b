#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <pthread.h>
#include "thinbd_support.h"

int thinbd_o_direct(void) { return O_DIRECT; }

int thinbd_punch_hole(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int thinbd_allocate(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int thinbd_eventfd(void) { return eventfd(0, EFD_CLOEXEC); }

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
