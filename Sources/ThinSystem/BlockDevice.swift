/// One read or write in a batch submitted to a `BlockDevice`.
public struct IORequest {
    public enum Kind: Sendable { case read, write }
    public var kind: Kind
    public var buffer: UnsafeMutableRawBufferPointer
    public var offset: UInt64

    public init(_ kind: Kind, _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        self.kind = kind
        self.buffer = buffer
        self.offset = offset
    }

    /// Buffer address, offset and length are all multiples of 4096 bytes, as O_DIRECT
    /// needs on every file system this runs on.
    @inline(__always)
    public var isDirectIOAligned: Bool {
        let alignment = UInt64(AlignedBuffer.directIOAlignment)
        let address = UInt64(UInt(bitPattern: buffer.baseAddress))
        return (address | offset | UInt64(buffer.count)) & (alignment - 1) == 0
    }
}

/// The engine's only way to reach its backing store.
///
/// Three implementations: `AIOFileDevice` (libaio with O_DIRECT), `FileDevice`
/// (pread/pwrite through the page cache) and `MemoryDevice` (tests, fault injection).
///
/// Contract: `perform` returns only when every request in the batch has completed;
/// completed writes are not durable until `barrier()` returns. Requests may have any
/// offset, length and buffer address; implementations that need alignment bounce
/// internally. Thread-safe.
public protocol BlockDevice: AnyObject, Sendable {
    /// A short name for logs and `info`: "libaio+O_DIRECT", "pread/pwrite", "memory".
    var engineName: String { get }
    /// The backing store's size in bytes; an error when it cannot be had (fstat failed),
    /// never a made-up 0.
    var size: UInt64 { get throws }
    /// Runs a batch of requests; cost: one submission for the whole batch where the engine allows.
    func perform(_ requests: [IORequest]) throws
    /// Reads the old contents of blocks about to be copied (copy-on-write), as `perform`
    /// would. Engines with a page cache read what it does not hold around it: the old
    /// block is read once, for the copy, and caching it would only cost memory (and,
    /// through readahead, more reads).
    func readCopySources(_ requests: [IORequest]) throws
    /// Writes blocks that no commit maps yet (a write's new blocks, copy-on-write's
    /// copies, a commit's metadata blocks), as `perform` would, and keeps track of them:
    /// they are what `writeWithNewBlocksBarrier` makes durable. With `bypassingCache`
    /// engines with a page cache write around it where they can: no reader has the
    /// block yet, and the next commit would otherwise write it back at once.
    /// Crash safety: durable after `barrier()` or `writeWithNewBlocksBarrier`.
    func writeNewBlocks(_ requests: [IORequest], bypassingCache: Bool) throws
    /// Makes every completed write durable (fdatasync).
    func barrier() throws
    /// The auto-commit's barrier, lighter than `barrier()`: writes `request` (bytes only
    /// the caller writes meanwhile: a commit's last metadata block or its superblock
    /// slot) and returns once it is durable together with every completed
    /// `writeNewBlocks` write, every completed `discard`, and the file's size and
    /// allocation. Other completed writes through a page cache (data overwritten in
    /// place) may stay volatile until the next `barrier()`, as in a disk's write cache:
    /// what a commit maps never depends on them.
    /// Cost on ext4 and XFS through the page cache: the new blocks' write-back, one
    /// journal (log) commit and a cache flush, not the write-back of every dirty page.
    /// Elsewhere it is the write and `barrier()`.
    func writeWithNewBlocksBarrier(_ request: IORequest) throws
    /// Writes back, without a cache flush, what `writeWithNewBlocksBarrier` would: done
    /// before a commit takes the pool's lock, so that the barrier under it has little
    /// left. Not durable by itself. Default (no page cache): `barrier()`.
    func writeBackNewBlocks() throws
    /// Grows or shrinks the backing store.
    func setSize(_ newSize: UInt64) throws
    /// Makes the host hold storage for the byte range now, so later writes there cannot
    /// fail for want of space (the pool's metadata region). Returns false when the
    /// backing store cannot; throws when it has no room (ENOSPC). Contents unchanged.
    func preallocate(at offset: UInt64, length: UInt64) throws -> Bool
    /// Best effort: releases the byte range's storage; reads of it then return zeros.
    /// Returns false when the backing store cannot do that. Durable, like a new block,
    /// after `barrier()` or `writeWithNewBlocksBarrier` (the file system's record of the
    /// hole is metadata of the file).
    func discard(at offset: UInt64, length: UInt64) -> Bool
    /// Bytes the host really stores (sparse files), when known.
    var allocatedBytes: UInt64? { get }
    /// The open file's device and inode (nil for memory): what a client compares with
    /// the file now at the pool's path, to notice a server whose file was replaced.
    var fileIdentity: RawFile.Identity? { get }
    /// Starts a batch and calls `completion` when it is done (see the extension).
    func submit(_ requests: [IORequest], completion: @escaping @Sendable (SystemError?) -> Void)
    /// Starts reads without blocking the calling thread (see `NonBlockingStart`).
    /// `queue`, when given, belongs to the calling thread; `completion` runs there, and
    /// only when the result is `.started`.
    func startReadsWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart
    /// Starts writes without blocking the calling thread, as `startReadsWithoutBlocking`
    /// does reads: queued on `queue` (which belongs to the caller, where `completion`
    /// runs) or `.wouldBlock`. Never `.completed`.
    func startWritesWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart
    func close()
}

/// How an attempt to start I/O without blocking went.
public enum NonBlockingStart {
    /// Done already (data served from memory or the page cache), with this outcome.
    case completed(SystemError?)
    /// Queued on the caller's `LoopDiskQueue`; the completion will run there.
    case started
    /// Nothing was done: doing it would block (no queue, no room, data not cached).
    /// The caller falls back to a thread that may block.
    case wouldBlock
}

extension BlockDevice {
    public var fileIdentity: RawFile.Identity? { nil }

    /// Starts a batch and calls `completion` when it is done, possibly on another thread.
    /// This default performs the batch before returning; `AIOFileDevice` returns at once
    /// and completes from its reaper thread.
    public func submit(_ requests: [IORequest], completion: @escaping @Sendable (SystemError?) -> Void) {
        do {
            try perform(requests)
            completion(nil)
        } catch let error as SystemError {
            completion(error)
        } catch {
            completion(SystemError(.io, "\(error)"))
        }
    }

    public func startReadsWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart {
        .wouldBlock
    }

    public func startWritesWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart {
        .wouldBlock
    }

    public func readCopySources(_ requests: [IORequest]) throws { try perform(requests) }

    public func writeNewBlocks(_ requests: [IORequest], bypassingCache: Bool) throws { try perform(requests) }

    public func writeWithNewBlocksBarrier(_ request: IORequest) throws {
        try perform([request])
        try barrier()
    }

    public func writeBackNewBlocks() throws { try barrier() }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try perform([IORequest(.read, buffer, at: offset)])
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try perform([IORequest(.write, UnsafeMutableRawBufferPointer(mutating: buffer), at: offset)])
    }
}
