import CThinSupport

/// Memory for I/O buffers that are allocated and freed per request (reply payloads,
/// WRITE payloads): blocks up to 136 KiB that an event loop thread frees are kept by
/// that thread and handed out again, instead of going through malloc's bins each time.
/// Only threads that call `keepFreedBlocksOnThisThread` keep blocks: elsewhere (worker
/// threads that drop a WRITE's payload, say) these are malloc and free, so that blocks
/// moving from loops to workers do not pile up on the workers.
///
/// The functions are C function pointers so that a byte-buffer allocator (swift-nio's
/// `ByteBufferAllocator` with custom functions) can be built on them elsewhere without
/// that module touching C. Use the three only with each other: memory from
/// `allocate` is freed by `deallocate`, never by `free`.
///
/// Cost: on a thread that keeps blocks, `allocate` and `deallocate` are a list pop or
/// push when it has a block of the size class (whole pages, header included) or room
/// for one, else one malloc or free; elsewhere always one malloc or free. A keeping
/// thread holds at most 2 MiB of freed blocks, freed when it exits.
///
/// Why: per 4 KiB read at queue depth 32, malloc and free of the reply buffer, and the
/// fast-bin consolidation every such large request sets off, cost about 2,000 of
/// 12,000 user-space instructions (docs/performance.md). Kept on every thread, peak
/// memory serving 16 exports on the lean loop rose from 43 to 61-67 MiB.
public enum RecycledMemory {
    public static let allocate: @convention(c) (Int) -> UnsafeMutableRawPointer? = thinbd_recycled_allocate
    public static let reallocate: @convention(c) (UnsafeMutableRawPointer?, Int, Int) -> UnsafeMutableRawPointer? =
        thinbd_recycled_reallocate
    public static let deallocate: @convention(c) (UnsafeMutableRawPointer) -> Void = thinbd_recycled_free

    /// From now on the calling thread keeps the blocks it frees (up to 2 MiB), for its
    /// own later allocations: for event loop threads, which make and drop buffers per
    /// request. Until the thread exits.
    public static func keepFreedBlocksOnThisThread() { thinbd_recycled_keep_on_this_thread() }

    /// Bytes the calling thread keeps for reuse.
    public static var keptByCurrentThread: Int { thinbd_recycled_kept_bytes() }
}
