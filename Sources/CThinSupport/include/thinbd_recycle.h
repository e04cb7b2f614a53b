#ifndef THINBD_RECYCLE_H
#define THINBD_RECYCLE_H
#include <stddef.h>

#pragma clang assume_nonnull begin

/// Memory for I/O buffers of up to 136 KiB, recycled per thread (recycle.c): malloc,
/// realloc and free for such buffers, to be used only with each other. A thread that
/// called thinbd_recycled_keep_on_this_thread keeps up to 2 MiB of freed blocks for
/// reuse, freed when it exits; on other threads these are malloc, realloc and free.
void *_Nullable thinbd_recycled_allocate(size_t size);
void *_Nullable thinbd_recycled_reallocate(void *_Nullable pointer, size_t old_size, size_t new_size);
void thinbd_recycled_free(void *pointer);
/// From now on the calling thread keeps blocks it frees, for its own later requests.
void thinbd_recycled_keep_on_this_thread(void);
/// Bytes the calling thread keeps for reuse.
size_t thinbd_recycled_kept_bytes(void);

#pragma clang assume_nonnull end
#endif
