// Recycled memory for I/O buffers: request and reply payloads of 4 KiB to 128 KiB that
// an event loop allocates and frees by the tens of thousands a second.
//
// Why not plain malloc: glibc serves these sizes from its bins, not its per-thread cache,
// and every such request first consolidates the fast bins, which also pushes the small
// allocations of the same request (closure contexts, arrays) off their fast path. Per
// 4 KiB read that was about 2,000 of 12,000 user-space instructions (callgrind,
// docs/performance.md).
//
// Shape: each block carries a 16-byte header holding its size class. A thread that
// asked to (thinbd_recycled_keep_on_this_thread: the event loops, which make and drop
// these buffers) keeps freed blocks of each class in a list of its own, up to
// THINBD_RECYCLE_KEEP bytes in all, and takes from it before calling malloc. A block may
// be freed on any thread; on a thread that keeps blocks it joins that thread's lists,
// elsewhere it goes back to malloc, so that blocks handed to worker threads (a WRITE's
// payload) do not pile up there. Blocks outside the classes, and all blocks freed while
// a thread exits, go back to malloc. No locks, no atomics: each list is one thread's.
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "thinbd_recycle.h"

#define HEADER 16
#define PAGE 4096
/// Classes are whole pages, header included: class k holds blocks of k pages.
#define LARGEST_CLASS 34 /* 136 KiB: a 128 KiB payload, its alignment pad and headroom */
#define UNCLASSED 0
#define THINBD_RECYCLE_KEEP (2u << 20)

/// 16 bytes, so that the memory after it keeps malloc's alignment.
struct block_header {
    uint64_t size_class;
    uint64_t unused;
};

struct free_block { struct free_block *next; };

struct thread_lists {
    struct free_block *heads[LARGEST_CLASS + 1];
    size_t kept_bytes;
};

static pthread_key_t lists_key;
static pthread_once_t lists_once = PTHREAD_ONCE_INIT;
static _Thread_local struct thread_lists *lists;
/// Set once the thread's lists are torn down: later frees on it go straight to malloc.
static _Thread_local int lists_gone;
/// Whether this thread keeps freed blocks (it asked to).
static _Thread_local int keeps_blocks;

void thinbd_recycled_keep_on_this_thread(void) { keeps_blocks = 1; }

static void release_lists(void *value) {
    struct thread_lists *own = value;
    lists_gone = 1;
    lists = NULL;
    if (own == NULL) return;
    for (int k = 1; k <= LARGEST_CLASS; k++) {
        struct free_block *block = own->heads[k];
        while (block != NULL) {
            struct free_block *next = block->next;
            free((char *)block - HEADER);
            block = next;
        }
    }
    free(own);
}

static void make_key(void) { (void)pthread_key_create(&lists_key, release_lists); }

static struct thread_lists *own_lists(void) {
    if (lists != NULL) return lists;
    if (lists_gone) return NULL;
    pthread_once(&lists_once, make_key);
    struct thread_lists *made = calloc(1, sizeof *made);
    if (made == NULL) return NULL;
    if (pthread_setspecific(lists_key, made) != 0) {
        free(made);
        return NULL;
    }
    lists = made;
    return made;
}

static uint32_t class_for(size_t size) {
    if (size > (size_t)LARGEST_CLASS * PAGE - HEADER) return UNCLASSED;
    return (uint32_t)((size + HEADER + PAGE - 1) / PAGE);
}

static void *with_header(void *base, uint32_t size_class) {
    struct block_header *header = base;
    header->size_class = size_class;
    header->unused = 0;
    return (char *)base + HEADER;
}

static struct block_header *header_of(void *pointer) {
    return (struct block_header *)((char *)pointer - HEADER);
}

void *thinbd_recycled_allocate(size_t size) {
    uint32_t size_class = class_for(size);
    if (size_class != UNCLASSED) {
        struct thread_lists *own = keeps_blocks ? own_lists() : NULL;
        if (own != NULL && own->heads[size_class] != NULL) {
            struct free_block *block = own->heads[size_class];
            own->heads[size_class] = block->next;
            own->kept_bytes -= (size_t)size_class * PAGE;
            return with_header((char *)block - HEADER, size_class);
        }
        void *base = malloc((size_t)size_class * PAGE);
        return base == NULL ? NULL : with_header(base, size_class);
    }
    if (size > SIZE_MAX - HEADER) return NULL;
    void *base = malloc(size + HEADER);
    return base == NULL ? NULL : with_header(base, UNCLASSED);
}

void thinbd_recycled_free(void *pointer) {
    if (pointer == NULL) return;
    struct block_header *header = header_of(pointer);
    uint32_t size_class = (uint32_t)header->size_class;
    if (keeps_blocks && size_class != UNCLASSED && size_class <= LARGEST_CLASS) {
        struct thread_lists *own = own_lists();
        size_t bytes = (size_t)size_class * PAGE;
        if (own != NULL && own->kept_bytes + bytes <= THINBD_RECYCLE_KEEP) {
            struct free_block *block = pointer;
            block->next = own->heads[size_class];
            own->heads[size_class] = block;
            own->kept_bytes += bytes;
            return;
        }
    }
    free(header);
}

void *thinbd_recycled_reallocate(void *pointer, size_t old_size, size_t new_size) {
    if (pointer == NULL) return thinbd_recycled_allocate(new_size);
    struct block_header *header = header_of(pointer);
    uint32_t size_class = (uint32_t)header->size_class;
    if (size_class == UNCLASSED && class_for(new_size) == UNCLASSED) {
        if (new_size > SIZE_MAX - HEADER) return NULL;
        void *base = realloc(header, new_size + HEADER);
        return base == NULL ? NULL : (char *)base + HEADER;
    }
    if (size_class != UNCLASSED && new_size <= (size_t)size_class * PAGE - HEADER) return pointer;
    void *moved = thinbd_recycled_allocate(new_size);
    if (moved == NULL) return NULL;
    memcpy(moved, pointer, old_size < new_size ? old_size : new_size);
    thinbd_recycled_free(pointer);
    return moved;
}

size_t thinbd_recycled_kept_bytes(void) { return lists == NULL ? 0 : lists->kept_bytes; }
