import ThinFormat
import ThinSystem

/// A cached 4 KiB metadata block.
public final class MetadataBlock {
    public let number: UInt64
    public let buffer: AlignedBuffer
    var dirty = false

    init(number: UInt64) {
        self.number = number
        buffer = AlignedBuffer(count: MetadataLayout.blockSize)
    }

    public var bytes: UnsafeMutableRawBufferPointer { buffer.bytes }
    public var node: NodeView { NodeView(buffer.bytes, owner: self) }
}

/// The metadata block cache, the metadata space map and the transaction manager.
///
/// Metadata reference counts live only in memory: they are derived at open from the
/// interior of the trees (leaves are not read), so they can never leak or disagree with
/// the trees after a crash.
///
/// Transactions: a block the last commit uses is never written; changing it means
/// `shadow`, which copies it into a block allocated in this transaction. Blocks freed
/// in a transaction are not reused until it commits. `commit` writes every dirty
/// block, issues a barrier, writes the superblock into the other slot, and issues a
/// second barrier. Not thread-safe: the pool serializes access.
public final class MetadataStore {
    public let device: BlockDevice
    public let regionStart: UInt64
    // Read by every request's lookups under the pool's shared access, written only
    // under its exclusive access; no access to it calls code that reaches it again.
    // The run-time exclusivity check (per thread) adds nothing here and cost about 75
    // instructions per access (docs/performance.md), as for `refcounts` below.
    @exclusivity(unchecked) public private(set) var regionBlocks: UInt64

    /// Generation of the last commit; blocks read from disk must not be newer.
    public private(set) var committedGeneration: UInt64

    /// The cached blocks, under a small lock of their own: readers holding only shared
    /// access look blocks up concurrently.
    private struct BlockCache {
        /// Keyed without SipHash: every request looks up two or three blocks here.
        var blocks = BlockNumberMap<MetadataBlock>()
        /// Calls of `read` since the store was made, cached or not.
        var readCalls = 0
        /// Where the next eviction starts looking, so that successive evictions take
        /// blocks from all over the table rather than the same slots each time.
        var evictionCursor = 0

        /// Drops about a quarter of the clean blocks. Dirty blocks stay until commit.
        /// Cost: one pass over at most every slot.
        mutating func evictClean() {
            let slots = blocks.slotCount
            guard slots > 0 else { return }
            let toDrop = max(1, blocks.count / 4)
            var victims: [UInt64] = []
            victims.reserveCapacity(toDrop)
            var position = evictionCursor % slots
            var visited = 0
            while visited < slots && victims.count < toDrop {
                if let entry = blocks.entry(atSlot: position), !entry.value.dirty { victims.append(entry.key) }
                position = (position + 1) % slots
                visited += 1
            }
            evictionCursor = position
            // Removed after the walk: a removal moves later entries of its cluster.
            for number in victims { blocks.removeValue(forKey: number) }
        }
    }
    private let cache = LockedValue(BlockCache())

    /// How many blocks `read` has been asked for: a measure of a walk's cost.
    public var readCount: Int { cache.withLockedValue { $0.readCalls } }
    public var cacheLimit: Int
    private var dirtyBlocks: [UInt64: MetadataBlock] = [:]

    @exclusivity(unchecked) private var refcounts: [UInt32]
    private var freeList: [UInt64] = []
    private var pendingFree: [UInt64] = []
    private var fresh: Set<UInt64> = []
    private var scanning = true
    /// Readers of a committed state (`pin`); while any, blocks that commits free are
    /// held back instead of reused, so that state stays readable on disk.
    private var pins = 0
    private var heldWhilePinned: [UInt64] = []

    /// Blocks kept back for operations that free space (delete, trim) so they can
    /// always run and commit even when metadata is otherwise full.
    public let reserveBlocks: Int
    /// Set while an operation that releases space runs: it may dip into the reserve.
    /// Only `usingReserve` sets it, so it is reset on every path.
    public private(set) var mayUseReserve = false

    /// Runs `body` (an operation that frees space, or a commit) allowed to dip into the
    /// reserve; the permission ends with `body`, however it ends.
    public func usingReserve<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        let previous = mayUseReserve
        mayUseReserve = true
        defer { mayUseReserve = previous }
        return try body()
    }

    public init(device: BlockDevice, regionStart: UInt64, regionBlocks: UInt64, committedGeneration: UInt64, cacheLimitBlocks: Int = 16384) {
        self.device = device
        self.regionStart = regionStart
        self.regionBlocks = regionBlocks
        self.committedGeneration = committedGeneration
        self.cacheLimit = cacheLimitBlocks
        refcounts = [UInt32](repeating: 0, count: Int(regionBlocks))
        reserveBlocks = Int(max(16, min(regionBlocks / 64, 4096)))
    }

    // MARK: Opening

    /// During the open-time scan: records one more reference to `block`; returns the new
    /// count, so the caller descends only on the first visit.
    public func scanReference(_ block: UInt64, type: BlockType) throws(MetadataError) -> UInt32 {
        precondition(scanning)
        let index = try slot(block, type)
        refcounts[index] += 1
        return refcounts[index]
    }

    /// Ends the scan: every block with no reference becomes free.
    public func finishScan() {
        scanning = false
        freeList.reserveCapacity(refcounts.count)
        // Pop order lowest-first keeps metadata near the start of the region.
        var i = refcounts.count - 1
        while i >= 0 {
            if refcounts[i] == 0 { freeList.append(regionStart + UInt64(i)) }
            i -= 1
        }
    }

    // MARK: Reading

    @inline(__always)
    func slot(_ block: UInt64, _ type: BlockType) throws(MetadataError) -> Int {
        guard block >= regionStart, block < regionStart + regionBlocks else { throw .pointerOutOfRange(block, type) }
        return Int(block - regionStart)
    }

    /// Returns the block, validated against `type`. Cost: a hash-table lookup under a
    /// short lock when cached, else one 4 KiB read and a CRC32C.
    /// With `cachedOnly`, a block that is not cached throws `.notCached` instead of
    /// being read: for callers on threads that must not block.
    public func read(_ number: UInt64, _ type: BlockType, cachedOnly: Bool = false) throws(MetadataError) -> MetadataBlock {
        if let block = cache.withLockedValue({ cache -> MetadataBlock? in
            cache.readCalls &+= 1
            return cache.blocks[number]
        }) { return block }
        if cachedOnly { throw .notCached(number) }
        _ = try slot(number, type)
        let block = try readFromDevice(number, type, maxGeneration: committedGeneration)
        insertIntoCache(block)
        return block
    }

    /// One block read from the device and validated: type, own number, generation no
    /// newer than `maxGeneration`, CRC, and a node's shape.
    private func readFromDevice(_ number: UInt64, _ type: BlockType, maxGeneration: UInt64) throws(MetadataError) -> MetadataBlock {
        let block = MetadataBlock(number: number)
        try wrapIO { try device.read(into: block.bytes, at: number * UInt64(MetadataLayout.blockSize)) }
        do {
            _ = try BlockHeader.validate(block.bytes, expectedType: type, blockNumber: number, maxGeneration: maxGeneration)
            if type != .refcounts && type != .volumeRecord { try block.node.validateShape() }
        } catch {
            throw .corruptBlock(number, type, error.description)
        }
        return block
    }

    private func insertIntoCache(_ block: MetadataBlock) {
        let limit = cacheLimit
        cache.withLockedValue { cache in
            if cache.blocks.count >= limit { cache.evictClean() }
            cache.blocks.insertIfAbsent(block, forKey: block.number)
        }
    }

    // MARK: Allocation and reference counts

    /// The block's reference count; 0 for a number outside the region (whose read then
    /// fails with `pointerOutOfRange`).
    public func refcount(_ number: UInt64) -> UInt32 {
        guard contains(number) else { return 0 }
        return refcounts[Int(number - regionStart)]
    }

    /// Whether `number` is a block of the metadata region. Cost: two comparisons.
    public func contains(_ number: UInt64) -> Bool {
        number >= regionStart && number - regionStart < UInt64(refcounts.count)
    }

    public var freeBlocks: Int { freeList.count }
    public var usedBlocks: Int { refcounts.count - freeList.count }

    /// A zeroed block, dirty, with one reference, owned by this transaction.
    /// Throws `noMetadataSpace` when only the reserve is left (unless `mayUseReserve`).
    public func allocate(_ type: BlockType, level: UInt16 = 0) throws(MetadataError) -> MetadataBlock {
        guard freeList.count > (mayUseReserve ? 0 : reserveBlocks), let number = freeList.popLast() else {
            throw .noMetadataSpace
        }
        refcounts[Int(number - regionStart)] = 1
        fresh.insert(number)
        let block = MetadataBlock(number: number)
        _ = NodeView.format(block.bytes, type: type, level: level)
        block.dirty = true
        _ = cache.withLockedValue { $0.blocks.updateValue(block, forKey: number) }
        dirtyBlocks[number] = block
        return block
    }

    public func incRef(_ number: UInt64, _ type: BlockType) throws(MetadataError) {
        let i = try slot(number, type)
        guard refcounts[i] > 0, refcounts[i] < UInt32.max else {
            throw .refcountInvariant("metadata block \(number) (\(type)) referenced with count \(refcounts[i])")
        }
        refcounts[i] += 1
    }

    /// Drops one reference; at zero the block is freed (children are the caller's job).
    /// Returns true when the block was freed.
    @discardableResult
    public func decRef(_ number: UInt64, _ type: BlockType) throws(MetadataError) -> Bool {
        let i = try slot(number, type)
        guard refcounts[i] > 0 else {
            throw .refcountInvariant("metadata block \(number) (\(type)) released with count 0")
        }
        refcounts[i] -= 1
        guard refcounts[i] == 0 else { return false }
        if let block = dirtyBlocks.removeValue(forKey: number) { block.dirty = false }
        if fresh.remove(number) != nil {
            // Never part of a commit: reusable at once.
            _ = cache.withLockedValue { $0.blocks.removeValue(forKey: number) }
            freeList.append(number)
        } else {
            pendingFree.append(number)
        }
        return true
    }

    /// Makes `number` writable in this transaction.
    ///
    /// Returns the block to write (the same one when it is already private to this
    /// transaction) and whether the original stays shared, in which case the caller must
    /// add a reference for every child of the copy. Cost: at most one copy of 4 KiB.
    public func shadow(_ number: UInt64, _ type: BlockType) throws(MetadataError) -> (block: MetadataBlock, shared: Bool) {
        let original = try read(number, type)
        let count = refcount(number)
        if count == 1 && fresh.contains(number) { return (original, false) }
        let copy = try allocate(type, level: original.node.level)
        copy.bytes.copyMemory(from: UnsafeRawBufferPointer(original.bytes))
        // The copy's references to children replace the original's when it is released.
        try decRef(number, type)
        return (copy, count > 1)
    }

    /// Marks a block written in place (it must be private to this transaction).
    public func markDirty(_ block: MetadataBlock) {
        precondition(fresh.contains(block.number), "in-place write to a committed block")
        block.dirty = true
        dirtyBlocks[block.number] = block
    }

    public var hasUncommittedChanges: Bool { !dirtyBlocks.isEmpty || !pendingFree.isEmpty }

    // MARK: Commit

    /// Writes every dirty block, a barrier, the superblock, and a second barrier.
    ///
    /// Crash safety: until the superblock write completes, open finds the previous
    /// commit intact (nothing it uses was written). After it, open finds this one.
    ///
    /// `newBlocksOnly`: the two barriers are the device's lighter one
    /// (`writeWithNewBlocksBarrier`), carried by the last metadata block's write and by
    /// the superblock's: what the commit maps (new data blocks, written with
    /// `writeNewBlocks`) and its metadata are durable before the superblock is written,
    /// and data overwritten in place need not be. For the auto-commit; a FLUSH takes
    /// the full barriers.
    ///
    /// `duringIO` wraps the writes and barriers: the pool uses it to let lookups run
    /// meanwhile. Nothing may change metadata while it runs (the blocks being written are
    /// the cached ones).
    public func commit(
        _ superblock: inout Superblock,
        newBlocksOnly: Bool = false,
        duringIO: (() throws(MetadataError) -> Void) throws(MetadataError) -> Void = { io throws(MetadataError) in try io() }
    ) throws(MetadataError) {
        let generation = committedGeneration + 1
        var requests: [IORequest] = []
        requests.reserveCapacity(dirtyBlocks.count)
        for (number, block) in dirtyBlocks.sorted(by: { $0.key < $1.key }) {
            BlockHeader.seal(block.bytes, blockNumber: number, generation: generation)
            requests.append(IORequest(.write, block.bytes, at: number * UInt64(MetadataLayout.blockSize)))
        }
        superblock.generation = generation
        let buffer = AlignedBuffer(count: MetadataLayout.blockSize)
        superblock.encode(into: buffer.bytes)
        let slotOffset = superblock.slot * UInt64(MetadataLayout.blockSize)
        let superblockWrite = IORequest(.write, buffer.bytes, at: slotOffset)
        try duringIO { () throws(MetadataError) in
            if newBlocksOnly, let last = requests.last {
                try wrapIO { try device.writeNewBlocks(Array(requests.dropLast()), bypassingCache: false) }
                try wrapIO { try device.writeWithNewBlocksBarrier(last) }
                try wrapIO { try device.writeWithNewBlocksBarrier(superblockWrite) }
            } else {
                try wrapIO { try device.writeNewBlocks(requests, bypassingCache: false) }
                try wrapIO { try device.barrier() }
                try wrapIO { try device.perform([superblockWrite]) }
                try wrapIO { try device.barrier() }
            }
        }

        committedGeneration = generation
        for block in dirtyBlocks.values { block.dirty = false }
        dirtyBlocks.removeAll(keepingCapacity: true)
        fresh.removeAll(keepingCapacity: true)
        let limit = cacheLimit
        cache.withLockedValue { [pendingFree] cache in
            for number in pendingFree { cache.blocks.removeValue(forKey: number) }
            if cache.blocks.count > limit { cache.evictClean() }
        }
        if pins > 0 {
            heldWhilePinned.append(contentsOf: pendingFree)
        } else {
            freeList.append(contentsOf: pendingFree)
        }
        pendingFree.removeAll(keepingCapacity: true)
    }

    // MARK: Reading a committed state without the lock

    /// Keeps every block of the last commit (and of later ones) from being reused until
    /// `unpin`, the way dm-thin's metadata snapshot does: a reader can then walk that
    /// commit's trees with `readCommitted` while writers go on. Cost: the blocks freed
    /// meanwhile stay unavailable until then. Not thread-safe (the pool's lock).
    public func pin() { pins += 1 }

    /// Ends a `pin`; with the last one, held blocks become free.
    public func unpin() {
        precondition(pins > 0, "unpin without pin")
        pins -= 1
        if pins == 0 {
            freeList.append(contentsOf: heldWhilePinned)
            heldWhilePinned.removeAll()
        }
    }

    /// Reads block `number` of a pinned committed state straight from the device,
    /// bypassing the cache, and validates it against `type` and `generation` (the
    /// pinned commit's). Thread-safe: touches no shared state but the device.
    /// Cost: one 4 KiB read and a CRC32C.
    public func readCommitted(_ number: UInt64, _ type: BlockType, generation: UInt64, regionBlocks: UInt64) throws(MetadataError) -> MetadataBlock {
        guard number >= regionStart, number - regionStart < regionBlocks else { throw .pointerOutOfRange(number, type) }
        return try readFromDevice(number, type, maxGeneration: generation)
    }

    /// Every metadata block that currently holds a reference (for `check`).
    public func referencedBlocks() -> [(block: UInt64, count: UInt32)] {
        var result: [(UInt64, UInt32)] = []
        for (i, count) in refcounts.enumerated() where count > 0 {
            result.append((regionStart + UInt64(i), count))
        }
        return result
    }
}
