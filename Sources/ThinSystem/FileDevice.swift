import CThinSupport
import Glibc

/// How a pool file's data reaches the disk.
public enum CacheMode: String, Sendable, CaseIterable {
    /// O_DIRECT through libaio: no page cache, batched asynchronous submission.
    case none
    /// pread/pwrite through the page cache.
    case writeback
}

/// Opens pool files, taking the lock that keeps two writers apart.
public enum PoolFile {
    /// Another process holds the pool; `holder` is its pid when it could be learned.
    public struct InUse: Error, Sendable {
        public var holder: Int32?
    }

    /// Opens `path` as a block device.
    ///
    /// - `cache: nil` picks libaio with O_DIRECT where the file system allows it and
    ///   falls back to pread/pwrite (for example on tmpfs).
    /// - Read-write opens take an exclusive lock, read-only opens a shared one; a
    ///   conflicting holder makes this throw `InUse`.
    public static func open(
        path: String, readOnly: Bool, cache: CacheMode? = nil, create: Bool = false
    ) throws -> BlockDevice {
        let access = readOnly ? O_RDONLY : O_RDWR
        if create {
            // Created without O_DIRECT: on file systems that refuse O_DIRECT (tmpfs) the
            // create would otherwise leave a file behind and the retry would hit EEXIST.
            Syscall.close(try Syscall.open(path, flags: O_RDWR | O_CREAT | O_EXCL))
        }
        var fd: Int32 = -1
        var direct = false
        if cache != .writeback {
            let result = Result { () throws(SystemError) -> Int32 in
                try Syscall.open(path, flags: access | thinbd_o_direct())
            }
            switch result {
            case .success(let opened):
                fd = opened
                direct = true
            case .failure(let error):
                // File systems without O_DIRECT (tmpfs) say EINVAL; fall back unless asked not to.
                guard error.code == .invalidArgument, cache == nil else { throw error }
            }
        }
        if !direct {
            fd = try Syscall.open(path, flags: access)
        }
        do {
            guard try Syscall.tryLock(fd, exclusive: !readOnly) else { throw InUse(holder: Syscall.lockHolder(fd)) }
            // A POSIX record lock as well, only so that others can learn our pid (flock
            // locks do not say who holds them).
            if !readOnly { Syscall.recordOwnership(fd) }
        } catch {
            Syscall.close(fd)
            throw error
        }
        if direct {
            do {
                return try AIOFileDevice(fd: fd)
            } catch {
                Syscall.close(fd)
                throw error
            }
        }
        return FileDevice(fd: fd, directFD: readOnly ? nil : openDirectCompanion(path, of: fd))
    }

    /// The same file opened again with O_DIRECT, for the page-cache engine's copies
    /// (cold sources read, new blocks written); nil where the kernel has no cachestat
    /// (without it a source's state cannot be asked without filling the cache), the file
    /// system refuses O_DIRECT, or the path no longer names the file `fd` has open. Not
    /// locked itself: the lock is held through `fd`.
    private static func openDirectCompanion(_ path: String, of fd: Int32) -> Int32? {
        guard thinbd_range_cached(fd, 0, 4096) >= 0, let direct = try? Syscall.open(path, flags: O_RDWR | thinbd_o_direct()) else { return nil }
        guard let identity = Syscall.identity(direct), identity == Syscall.identity(fd) else {
            Syscall.close(direct)
            return nil
        }
        return direct
    }
}

/// pread/pwrite through the page cache.
public final class FileDevice: BlockDevice, @unchecked Sendable {
    let fd: Int32
    /// The file opened with O_DIRECT as well (nil where that cannot be): copy-on-write
    /// sources the page cache does not hold are read through it (`readCopySources`),
    /// and the copies are written through it (`writeNewBlocks` with `bypassingCache`).
    /// Through the cache, each such read filled it with a block the clone never reads
    /// again from there, readahead beyond it included; a fresh clone's first seconds of
    /// cold 4K random writes ran 1.6-2.8 times slower for it (docs/performance.md). The
    /// kernel keeps the two descriptors coherent: a direct transfer first writes back
    /// any dirty cached pages of its range, and a direct write drops them after.
    let directFD: Int32?
    private let closeLock = Lock()
    private var closed = false
    /// Whether a ranged sync (`Syscall.pwriteDurably`) makes the whole file's allocation
    /// durable and flushes the device's cache, as on ext4 and XFS (a per-inode journal
    /// or log force): then the auto-commit's barrier writes back only the new blocks
    /// (`writeWithNewBlocksBarrier`). Elsewhere it is a fdatasync.
    let limitsCommitBarriers: Bool
    /// The ranges `writeNewBlocks` wrote through the page cache since the last barrier,
    /// or nil when there were too many to keep (the next barrier is then a fdatasync).
    private let newBlocksInCache = LockedValue<[Range<UInt64>]?>([])
    /// More new-block ranges than this between barriers (a client writing without the
    /// auto-commit or a FLUSH) and the list is dropped for a fdatasync.
    static let newBlockRangeLimit = 1 << 18

    /// File systems whose fdatasync of a range commits the inode's whole allocation and
    /// flushes the device's cache (statfs magic numbers): ext2/3/4 and XFS.
    static let fileSystemsWithRangedSync: Set<Int64> = [0xEF53, 0x5846_5342]

    init(fd: Int32, directFD: Int32? = nil) {
        self.fd = fd
        self.directFD = directFD
        limitsCommitBarriers = Syscall.fileSystemType(fd).map(Self.fileSystemsWithRangedSync.contains) ?? false
    }

    deinit { close() }

    public var engineName: String { "pread/pwrite" }

    public var size: UInt64 { get throws { try Syscall.fileSize(fd) } }

    /// Rings lent to threads that read several blocks at once (`perform`), and whether
    /// io_uring turned out to be unavailable (then none is tried again).
    private let idleRings = LockedValue((rings: [URingLoopQueue](), unavailable: false))
    /// Idle rings kept for reuse; more are closed when returned.
    static let idleRingLimit = 8

    public func perform(_ requests: [IORequest]) throws {
        NonBlockingThread.assertMayBlock("synchronous device I/O")
        // Several reads: those the page cache misses are read side by side through a
        // ring, so that a batch's copy-on-write reads wait for the disk once, not once
        // each. Batches with writes keep their order and run one by one.
        if requests.count > 1, requests.allSatisfy({ $0.kind == .read && $0.buffer.count > 0 }) {
            let misses = requests.filter { request in
                thinbd_pread_nowait(fd, request.buffer.baseAddress, UInt(request.buffer.count), Int64(request.offset)) != request.buffer.count
            }
            if misses.count > 1, let ring = borrowRing() {
                defer { returnRing(ring) }
                try ring.performAndWait(fd: fd, misses)
                return
            }
            try performOneByOne(misses)
            return
        }
        try performOneByOne(requests)
    }

    private func borrowRing() -> URingLoopQueue? {
        let (idle, unavailable) = idleRings.withLockedValue { state -> (URingLoopQueue?, Bool) in
            (state.rings.popLast(), state.unavailable)
        }
        if let idle { return idle }
        guard !unavailable else { return nil }
        guard let ring = try? URingLoopQueue() else {
            idleRings.withLockedValue { $0.unavailable = true }
            return nil
        }
        return ring
    }

    private func returnRing(_ ring: URingLoopQueue) {
        let kept = idleRings.withLockedValue { state -> Bool in
            guard !ring.isBroken, state.rings.count < Self.idleRingLimit else { return false }
            state.rings.append(ring)
            return true
        }
        if !kept { ring.close() }
    }

    /// Reads through the page cache what it holds whole, and the rest with O_DIRECT
    /// (`performDirect`). Whether a range is cached is asked with cachestat, because a
    /// RWF_NOWAIT read that misses starts readahead of the range: the very cache fill
    /// avoided here. Without cachestat (Linux before 6.5) or O_DIRECT (no `directFD`), or
    /// for requests O_DIRECT cannot take, reads go through the cache.
    public func readCopySources(_ requests: [IORequest]) throws {
        NonBlockingThread.assertMayBlock("synchronous device I/O")
        guard let directFD else { return try perform(requests) }
        var misses: [IORequest] = []
        var buffered: [IORequest] = []
        for request in requests where request.buffer.count > 0 {
            switch thinbd_range_cached(fd, Int64(request.offset), UInt(request.buffer.count)) {
            case 1 where thinbd_pread_nowait(fd, request.buffer.baseAddress, UInt(request.buffer.count), Int64(request.offset)) == request.buffer.count:
                continue
            case 0 where request.isDirectIOAligned:
                misses.append(request)
            default:
                buffered.append(request)
            }
        }
        try perform(buffered)
        try performDirect(misses, on: directFD)
    }

    /// Writes new blocks. With `bypassingCache` (copy-on-write's copies) those O_DIRECT
    /// can take go around the page cache, side by side through a ring. Through the
    /// cache, each copy became dirty pages that the next second's commit had to write
    /// back while the clone's writes went on, and one large folio per block that the
    /// clone's 4 KiB writes then dirtied whole. The kernel keeps the descriptors
    /// coherent: a direct write first writes back any dirty cached pages of its range
    /// and drops the cached ones after. No reader can have the block before it is
    /// mapped, after this returns. What went through the cache is remembered for the
    /// auto-commit's barrier.
    ///
    /// Crash safety: the commit's barrier on the other descriptor of the same file
    /// flushes the device's cache and commits the file system's record of any storage
    /// the direct writes allocated (ext4 and XFS keep it per inode).
    public func writeNewBlocks(_ requests: [IORequest], bypassingCache: Bool) throws {
        NonBlockingThread.assertMayBlock("synchronous device I/O")
        var direct: [IORequest] = []
        var buffered: [IORequest] = []
        for request in requests where request.buffer.count > 0 {
            if bypassingCache && directFD != nil && request.isDirectIOAligned { direct.append(request) } else { buffered.append(request) }
        }
        try performOneByOne(buffered)
        rememberNewBlocks(buffered)
        if let directFD, try !performDirect(direct, on: directFD) { rememberNewBlocks(direct) }
    }

    /// Runs requests O_DIRECT can take through `directFD`, through a ring even when
    /// there is one: a synchronous direct transfer holds the inode's lock (shared for a
    /// read, often exclusive for a write) until the disk answers, and every write
    /// through the page cache, the clone's in-place writes included, waits for it
    /// meanwhile; a ring's holds it only to submit. Falls back to the page cache where
    /// O_DIRECT is refused after all (EINVAL: a sector larger than 4 KiB). Returns
    /// whether every request went around the cache.
    @discardableResult
    private func performDirect(_ requests: [IORequest], on directFD: Int32) throws -> Bool {
        guard !requests.isEmpty else { return true }
        guard let ring = borrowRing() else {
            try performOneByOne(requests, on: directFD)
            // One by one, any of them may have fallen back to the cache.
            return false
        }
        defer { returnRing(ring) }
        do throws(SystemError) {
            try ring.performAndWait(fd: directFD, requests)
            return true
        } catch {
            guard error.code == .invalidArgument else { throw error }
            try perform(requests)
            return false
        }
    }

    private func rememberNewBlocks(_ requests: [IORequest]) {
        guard limitsCommitBarriers, !requests.isEmpty else { return }
        newBlocksInCache.withLockedValue { pending in
            guard pending != nil else { return }
            if pending!.count + requests.count > Self.newBlockRangeLimit {
                pending = nil
                return
            }
            for request in requests { pending!.append(request.offset..<request.offset + UInt64(request.buffer.count)) }
        }
    }

    /// The remembered new-block ranges, and a fresh list; nil when there were too many.
    private func takeNewBlocks() -> [Range<UInt64>]? {
        newBlocksInCache.withLockedValue { pending in
            defer { pending = [] }
            return pending
        }
    }

    /// `ranges` sorted, with overlapping and adjacent ones joined: one write-back each.
    private static func merged(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
        var merged: [Range<UInt64>] = []
        for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            if let last = merged.last, range.lowerBound <= last.upperBound {
                merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, range.upperBound)
            } else {
                merged.append(range)
            }
        }
        return merged
    }

    private func performOneByOne(_ requests: [IORequest], on descriptor: Int32? = nil) throws {
        for request in requests {
            do throws(SystemError) {
                try transfer(request, on: descriptor ?? fd)
            } catch {
                // O_DIRECT refused after all (a sector larger than 4 KiB): through the cache.
                guard error.code == .invalidArgument, let descriptor, descriptor != fd else { throw error }
                try transfer(request, on: fd)
            }
        }
    }

    private func transfer(_ request: IORequest, on descriptor: Int32) throws(SystemError) {
        switch request.kind {
        case .read:
            let n = try Syscall.preadFully(descriptor, request.buffer, request.offset)
            if n < request.buffer.count {
                throw SystemError(.io, "read past end of pool file at offset \(request.offset)")
            }
        case .write:
            try Syscall.pwriteFully(descriptor, UnsafeRawBufferPointer(request.buffer), request.offset)
        }
    }

    /// Reads of at least this many bytes in all are copied out of the page cache by the
    /// loop queue's page-cache thread, not on the loop (`LoopDiskQueue.enqueueCachedReads`):
    /// the hand-off costs a few microseconds, and a 256 KiB copy about ten times that.
    static let largeReadBytes = 256 << 10

    /// Serves the reads from the page cache (preadv2 with RWF_NOWAIT) when every byte
    /// is cached; otherwise queues them on `queue` when it reads the page cache without
    /// blocking (io_uring). Anything else, errors included, is left to the blocking path.
    /// Large reads (`largeReadBytes`) go to the queue's page-cache thread first, when
    /// it has one, which reads the cached ones and passes the rest to the ring.
    public func startReadsWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart {
        if let queue, requests.reduce(0, { $0 + $1.buffer.count }) >= Self.largeReadBytes,
            queue.enqueueCachedReads(fd: fd, requests.filter { $0.buffer.count > 0 }, completion: completion)
        {
            return .started
        }
        var cached = true
        for request in requests where request.buffer.count > 0 {
            let n = thinbd_pread_nowait(fd, request.buffer.baseAddress, UInt(request.buffer.count), Int64(request.offset))
            if n != request.buffer.count {
                cached = false
                break
            }
        }
        if cached { return .completed(nil) }
        // Not all in the page cache: an io_uring queue reads it without blocking (and
        // fills the cache as a pread would); libaio cannot, so a thread does.
        let nonEmpty = requests.filter { $0.buffer.count > 0 }
        guard let queue, queue.handlesPageCacheAsynchronously,
            queue.enqueue(fd: fd, nonEmpty, completion: completion)
        else { return .wouldBlock }
        return .started
    }

    /// Queues the writes on `queue` when it writes the page cache without blocking
    /// (`URingLoopQueue`, which has a thread of its own make them). The queue refuses
    /// anything but non-empty writes.
    public func startWritesWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart {
        guard let queue, queue.handlesPageCacheAsynchronously,
            queue.enqueuePageCacheWrites(fd: fd, requests, completion: completion)
        else { return .wouldBlock }
        return .started
    }

    public func barrier() throws {
        NonBlockingThread.assertMayBlock("a device barrier")
        // Dropped before the sync, which covers them: new blocks written from here on
        // stay for the next barrier.
        _ = takeNewBlocks()
        try Syscall.fdatasync(fd)
    }

    /// Where the file system allows it (`limitsCommitBarriers`): the remembered new
    /// blocks' write-back, then `request` written with RWF_DSYNC, whose ranged sync
    /// commits the inode's journal (log) and flushes the device's cache, which makes the
    /// direct writes durable too. Data overwritten in place through the cache is left to
    /// the kernel's write-back and the next FLUSH.
    public func writeWithNewBlocksBarrier(_ request: IORequest) throws {
        NonBlockingThread.assertMayBlock("a device barrier")
        precondition(request.kind == .write, "a barrier write writes")
        if limitsCommitBarriers, let ranges = takeNewBlocks() {
            try Syscall.writeBack(fd, Self.merged(ranges))
            if try Syscall.pwriteDurably(fd, UnsafeRawBufferPointer(request.buffer), request.offset) { return }
        }
        try transfer(request, on: fd)
        try barrier()
    }

    public func writeBackNewBlocks() throws {
        NonBlockingThread.assertMayBlock("a device write-back")
        guard limitsCommitBarriers else { return try barrier() }
        guard let ranges = takeNewBlocks() else { return try barrier() }
        try Syscall.writeBack(fd, Self.merged(ranges))
    }

    public func setSize(_ newSize: UInt64) throws { try Syscall.ftruncate(fd, newSize) }

    public func discard(at offset: UInt64, length: UInt64) -> Bool {
        Syscall.punchHole(fd, offset, length)
    }

    public func preallocate(at offset: UInt64, length: UInt64) throws -> Bool {
        try Syscall.allocate(fd, offset, length)
    }

    public var allocatedBytes: UInt64? { try? Syscall.allocatedBytes(fd) }
    public var fileIdentity: RawFile.Identity? { Syscall.identity(fd) }

    public func close() {
        let rings = idleRings.withLockedValue { state -> [URingLoopQueue] in
            defer { state.rings.removeAll() }
            return state.rings
        }
        for ring in rings { ring.close() }
        closeLock.withLock {
            if !closed {
                closed = true
                if let directFD { Syscall.close(directFD) }
                Syscall.close(fd)
            }
        }
    }
}
