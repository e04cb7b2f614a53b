import ThinFormat
import ThinMetadata
import ThinSystem

/// Options for `Pool.create`.
public struct PoolGeometry: Sendable {
    /// Data capacity in bytes (rounded down to whole data blocks).
    public var dataSize: UInt64
    /// Data block size: a power of two from 4 KiB to 1 MiB.
    public var blockSize: UInt32 = 64 * 1024
    /// Metadata region size in bytes; nil picks one that fits four times `dataSize`.
    public var metadataSize: UInt64?

    public init(dataSize: UInt64, blockSize: UInt32 = 64 * 1024, metadataSize: UInt64? = nil) {
        self.dataSize = dataSize
        self.blockSize = blockSize
        self.metadataSize = metadataSize
    }

    /// Metadata bytes budgeted per data block when sizing the region by default:
    /// about 40 bytes are needed per mapped block; the rest leaves room for snapshots
    /// that diverge and for growing the pool about four times.
    static let metadataBytesPerDataBlock: UInt64 = 256
    /// Below this budget per data block, `grow` refuses.
    static let minimumMetadataBytesPerDataBlock: UInt64 = 40

    func validate() throws(PoolError) {
        let bs = UInt64(blockSize)
        guard bs >= 4096, bs <= 1 << 20, bs & (bs - 1) == 0 else {
            throw .invalidArgument("block size must be a power of two from 4K to 1M, not \(blockSize)")
        }
        guard dataSize >= bs * 16 else {
            throw .invalidArgument("pool size must be at least 16 data blocks (\(bs * 16) bytes)")
        }
        guard dataSize / bs < 1 << 40 else { throw .invalidArgument("pool size is too large") }
        if let metadataSize, metadataSize < 1 << 20 || metadataSize > 1 << 40 {
            throw .invalidArgument("metadata size must be between 1M and 1T")
        }
    }

    var metadataBlocks: UInt64 {
        let dataBlocks = dataSize / UInt64(blockSize)
        let bytes = metadataSize ?? min(max(16 << 20, dataBlocks * Self.metadataBytesPerDataBlock), 16 << 30)
        return (bytes + UInt64(MetadataLayout.blockSize) - 1) / UInt64(MetadataLayout.blockSize)
    }
}

/// In-memory state of one volume or snapshot.
final class VolumeState {
    var record: VolumeRecord
    /// Where the record was last written (0 = not yet).
    var recordBlock: UInt64
    var dirty: Bool

    init(record: VolumeRecord, recordBlock: UInt64, dirty: Bool) {
        self.record = record
        self.recordBlock = recordBlock
        self.dirty = dirty
    }
}

/// A thin pool: one backing file holding a superblock pair, a metadata region and a
/// data region, with thin volumes, read-only snapshots and writable clones inside.
///
/// Thread-safe: one lock serializes metadata work. Crash safety: every operation that
/// changes the set of volumes commits before it returns; data writes become durable at
/// the next `commit()` (NBD FLUSH, FUA, or the auto-commit timer), like a disk with a
/// volatile write cache.
public final class Pool: @unchecked Sendable {
    /// Orders every metadata change; lookups for reads need only its shared side, so they
    /// continue while a commit writes and syncs.
    let lock = PoolLock()
    /// Data I/O done outside `lock` holds an entry; a commit waits for the entries made
    /// before it before freed blocks can be handed out again.
    let ioGate = DrainGate()
    /// Per-volume block range locks: writes, trims and volume operations on the same
    /// blocks take turns. Taken before `lock`.
    let rangeLocks = RangeLock()
    /// Aligned scratch buffers for copy-on-write and partial writes.
    let buffers = AlignedBufferPool()
    let device: BlockDevice
    public let path: String
    public let isReadOnly: Bool
    var superblock: Superblock
    let store: MetadataStore
    let spaceMap: DataSpaceMap
    var volumeTableRoot: UInt64
    var volumes: [UInt64: VolumeState] = [:]
    var names: [String: UInt64] = [:]
    var isClosed = false
    /// Fail mode (Pool+FailMode.swift): its own lock, so that finding damage never waits.
    let failureState = LockedValue(FailureState())
    /// Counts since open (`statistics`); under the pool lock.
    var statisticsLocked = PoolStatistics()
    /// `autoGrow`; under the pool lock.
    var autoGrowLocked: AutoGrowPolicy?
    /// Data blocks are known to read as zeros at or above this mark (sparse, never written).
    var zeroScratch: AlignedBuffer
    /// Data blocks below the high-water mark known to read as zeros: freed, and their
    /// storage released after the commit. Allocation takes blocks out; empty after open
    /// (conservative). Under the pool lock.
    var knownZeroLocked = BlockRanges()
    /// Zeros that write-zeroes writes from, never written to (shared by every thread):
    /// 1 MiB or one data block, whichever is larger.
    let zeroes: AlignedBuffer

    public let blockSize: UInt64
    let dataOffset: UInt64

    var mappings: BTree { BTree(store: store, type: .mappingNode, values: .dataBlocks(spaceMap)) }
    var volumeTable: BTree { BTree(store: store, type: .volumeTableNode, values: .metadataBlocks(.volumeRecord)) }

    // MARK: Creating and opening

    /// Creates a new pool file (it must not exist) and opens it read-write.
    /// The file is sparse: only metadata written so far takes space.
    public static func create(path: String, geometry: PoolGeometry, cache: CacheMode? = nil) throws(PoolError) -> Pool {
        try geometry.validate()
        if SystemInfo.fileExists(path) { throw .fileExists(path) }
        let device = try ThinPool.mapErrors { try PoolFile.open(path: path, readOnly: false, cache: cache, create: true) }
        do {
            return try create(on: device, path: path, geometry: geometry)
        } catch {
            device.close()
            SystemInfo.removeFile(path)
            throw error
        }
    }

    /// Formats `device` as an empty pool and opens it (tests use a `MemoryDevice`).
    public static func create(on device: BlockDevice, path: String = "memory", geometry: PoolGeometry) throws(PoolError) -> Pool {
        try geometry.validate()
        let bs = UInt64(geometry.blockSize)
        let metadataStart: UInt64 = 2
        let metadataBlocks = geometry.metadataBlocks
        let metadataEnd = (metadataStart + metadataBlocks) * UInt64(MetadataLayout.blockSize)
        let alignment = max(bs, 1 << 20)
        let dataOffset = (metadataEnd + alignment - 1) / alignment * alignment
        let dataBlocks = geometry.dataSize / bs
        var uuid = [UInt8](repeating: 0, count: 16)
        var rng = SplitMix64(seed: SystemInfo.monotonicNanoseconds() ^ (UInt64(SystemInfo.processID) << 32))
        for i in 0..<16 { uuid[i] = UInt8(truncatingIfNeeded: rng.next()) }
        uuid[6] = uuid[6] & 0x0F | 0x40
        uuid[8] = uuid[8] & 0x3F | 0x80
        let now = SystemInfo.wallClockSeconds()
        let superblock = Superblock(
            generation: 1, dataBlockSize: geometry.blockSize, uuid: uuid, metadataStart: metadataStart,
            metadataBlocks: metadataBlocks, dataOffset: dataOffset, dataBlocks: dataBlocks, createdAt: now)
        let buffer = AlignedBuffer(count: MetadataLayout.blockSize)
        try ThinPool.mapErrors {
            try device.setSize(superblock.fileSize)
            // The metadata region takes its host storage now (about 0.4% of the data
            // size): a host file system that fills up later then fails data writes with
            // ENOSPC, never a commit, and the pool serves again once space is freed.
            do {
                _ = try device.preallocate(at: 0, length: metadataEnd)
            } catch let error as SystemError where error.code == .noSpace {
                throw SystemError(.noSpace, "no room on the host file system for the pool's \(metadataEnd >> 20) MiB of metadata")
            }
            // Slot 0 stays empty until the first commit; a zeroed slot never validates.
            try device.write(UnsafeRawBufferPointer(buffer.bytes), at: 0)
            superblock.encode(into: buffer.bytes)
            try device.write(UnsafeRawBufferPointer(buffer.bytes), at: superblock.slot * UInt64(MetadataLayout.blockSize))
            try device.barrier()
        }
        return try open(device: device, path: path, readOnly: false)
    }

    /// Opens an existing pool file. Read-write opens take an exclusive lock; read-only
    /// opens a shared one. Cost: reads the superblocks and the interior of every tree
    /// (not the leaves), O(metadata / 250).
    /// A pool another process holds fails at once with `.inUse` (naming the holder);
    /// callers that queue behind each other retry (`PoolCommandClient` does, between
    /// looks for a server's control socket).
    ///
    /// A pool flagged for a check (a server found damage in it) opens read-only as usual;
    /// a read-write open fails with `.needsCheck` unless `force` (which `check --repair`
    /// uses: a repair that leaves no damage clears the flag).
    public static func open(path: String, readOnly: Bool = false, cache: CacheMode? = nil, force: Bool = false) throws(PoolError) -> Pool {
        guard SystemInfo.fileExists(path) else { throw .noSuchFile(path) }
        let device: BlockDevice
        do {
            device = try PoolFile.open(path: path, readOnly: readOnly, cache: cache)
        } catch let error as PoolFile.InUse {
            throw .inUse(path: path, holder: error.holder)
        } catch let error as SystemError {
            throw .io(error)
        } catch {
            throw .io(SystemError(.io, "\(error)"))
        }
        do {
            return try open(device: device, path: path, readOnly: readOnly, force: force)
        } catch {
            device.close()
            throw error
        }
    }

    /// Opens the pool stored on `device`.
    public static func open(device: BlockDevice, path: String = "memory", readOnly: Bool = false, force: Bool = false) throws(PoolError) -> Pool {
        let superblock = try readSuperblock(device: device, path: path)
        if superblock.needsCheck && !readOnly && !force {
            throw .needsCheck(path: path, reason: "a server found damage in it and stopped writing")
        }
        let pool = try Pool(device: device, path: path, superblock: superblock, readOnly: readOnly)
        try pool.forgetUncommittedData()
        return pool
    }

    /// Reads both slots and returns the newest valid superblock.
    static func readSuperblock(device: BlockDevice, path: String) throws(PoolError) -> Superblock {
        let size = try ThinPool.mapErrors { try device.size }
        guard size >= 2 * UInt64(MetadataLayout.blockSize) else {
            throw .notAPool(path: path, reason: "file is only \(size) bytes")
        }
        let buffer = AlignedBuffer(count: MetadataLayout.blockSize)
        var best: Superblock?
        var problems: [String] = []
        var sawSignature = false
        for slot in MetadataLayout.superblockSlots {
            try ThinPool.mapErrors { try device.read(into: buffer.bytes, at: slot * UInt64(MetadataLayout.blockSize)) }
            do {
                let candidate = try Superblock.decode(buffer.bytes, slot: slot)
                sawSignature = true
                if best == nil || candidate.generation > best!.generation { best = candidate }
            } catch .notAPool {
                continue
            } catch {
                sawSignature = true
                problems.append("superblock slot \(slot): \(error)")
            }
        }
        guard let superblock = best else {
            if !sawSignature { throw .notAPool(path: path, reason: "no thinbd superblock found") }
            throw .corrupt(problems.joined(separator: "; "))
        }
        guard size >= superblock.fileSize else { throw .truncated(expected: superblock.fileSize, actual: size) }
        return superblock
    }

    private init(device: BlockDevice, path: String, superblock: Superblock, readOnly: Bool) throws(PoolError) {
        self.device = device
        self.path = path
        self.isReadOnly = readOnly
        self.superblock = superblock
        self.blockSize = UInt64(superblock.dataBlockSize)
        self.dataOffset = superblock.dataOffset
        self.volumeTableRoot = superblock.volumeTableRoot
        self.zeroScratch = AlignedBuffer(count: Int(superblock.dataBlockSize))
        self.zeroes = AlignedBuffer(count: max(1 << 20, Int(superblock.dataBlockSize)))
        store = MetadataStore(
            device: device, regionStart: superblock.metadataStart, regionBlocks: superblock.metadataBlocks,
            committedGeneration: superblock.generation)
        do {
            spaceMap = try DataSpaceMap(
                store: store, indexRoot: superblock.spaceMapRoot, dataBlocks: superblock.dataBlocks,
                highWater: superblock.dataHighWater)
        } catch {
            throw PoolError(error)
        }
        let damage = try ThinPool.mapErrors { try loadVolumes() }
        store.finishScan()
        // Damage in one volume's record or tree does not keep the others from being
        // read: the pool opens in fail mode (nothing changes, nothing commits; the
        // metadata counts of a damaged tree are incomplete, and nothing allocates).
        if let first = damage.first {
            enterFailMode(damage.count == 1 ? first : "\(first) (and \(damage.count - 1) more)")
        }
    }

    /// Reads every volume record and counts references to the trees' interior nodes.
    /// Returns the damage found in single volumes: a record that fails its checks (the
    /// volume is left out) or a mapping tree whose interior fails them (the volume stays;
    /// reads of the damaged ranges fail). Damage in the volume table itself throws.
    private func loadVolumes() throws -> [String] {
        let table = volumeTable
        let mappingTree = mappings
        var records: [(UInt64, VolumeRecord)] = []
        var damage: [String] = []
        let (blockSize, nextVolumeID) = (blockSize, superblock.nextVolumeID)
        try table.scanReferences(volumeTableRoot, readLeaves: true) { (recordBlock: UInt64) throws(MetadataError) in
            let record: VolumeRecord
            do throws(MetadataError) {
                guard try store.scanReference(recordBlock, type: .volumeRecord) == 1 else {
                    throw .corruptBlock(recordBlock, .volumeRecord, "referenced twice from the volume table")
                }
                let block = try store.read(recordBlock, .volumeRecord)
                do {
                    record = try VolumeRecord.read(block.bytes, blockSize: blockSize, nextVolumeID: nextVolumeID)
                } catch {
                    throw .corruptBlock(recordBlock, .volumeRecord, "\(error)")
                }
            } catch where error.isDamage {
                damage.append(error.description)
                return
            }
            records.append((recordBlock, record))
            do throws(MetadataError) {
                try mappingTree.scanReferences(record.mappingRoot, readLeaves: false)
            } catch where error.isDamage {
                damage.append("\(record.name): \(error)")
            }
        }
        for (recordBlock, record) in records {
            guard volumes[record.id] == nil, names[record.name] == nil else {
                damage.append(MetadataError.corruptBlock(recordBlock, .volumeRecord, "duplicate volume id or name '\(record.name)'").description)
                continue
            }
            volumes[record.id] = VolumeState(record: record, recordBlock: recordBlock, dirty: false)
            names[record.name] = record.id
        }
        return damage
    }

    /// Data above the committed high-water mark may hold writes of a transaction that
    /// never committed; punching it restores the "reads as zeros" promise. Where the
    /// file system cannot punch holes, the optimisation is switched off instead.
    private func forgetUncommittedData() throws(PoolError) {
        guard !isReadOnly else { return }
        // Pools made before the metadata region was preallocated get it now (best effort:
        // a full host file system still opens the pool).
        _ = try? device.preallocate(at: 0, length: dataOffset)
        // A grow (or autogrow) that never committed left the file longer than the pool
        // says; its tail may hold writes of that transaction. Cut it off, so a later
        // grow starts from zeros.
        if try mapErrors({ try device.size }) > superblock.fileSize {
            try mapErrors { try device.setSize(superblock.fileSize) }
        }
        let mark = spaceMap.highWater
        let end = superblock.dataBlocks
        if mark < end && !device.discard(at: dataOffset + mark * blockSize, length: (end - mark) * blockSize) {
            spaceMap.setHighWater(end)
        }
    }

    // MARK: Commit and close

    /// Makes every write and change so far durable. Cost: one write per dirty metadata
    /// block, two barriers (fdatasync), one superblock write.
    ///
    /// Crash safety: after a crash at any moment, open finds either the previous commit
    /// or this one, complete.
    public func commit() throws(PoolError) {
        try lock.withLock { () throws(PoolError) in try commitLocked() }
    }

    /// A commit for the background (auto-commit), as dm-thin does it: when metadata
    /// changed, the data written so far is synced first, outside the pool lock, so that
    /// the commit's own barrier, which writes wait for, has little left to do. When only
    /// data was overwritten in place (or nothing happened) it does nothing: those writes
    /// become durable at the next FLUSH, as on a disk with a write cache, and a crash
    /// before then leaves the pool consistent. Cost: one extra barrier per real commit.
    public func commitInBackground() throws(PoolError) {
        if failure != nil {
            // Nothing commits in fail mode; the flag, when damage calls for it, goes out once.
            if needsCheckFlagPending { lock.withLock { flagNeedsCheckLocked() } }
            return
        }
        let pending = lock.withSharedAccess {
            !isClosed && !isReadOnly
                && (store.hasUncommittedChanges || volumes.values.contains { $0.dirty } || superblock.dataBlocks != spaceMap.dataBlocks)
        }
        guard pending else { return }
        try failingOnCommitError { () throws(PoolError) in try mapErrors { try device.barrier() } }
        try commit()
    }

    /// Writes volume records and the space map index into metadata blocks (no I/O).
    func prepareCommitLocked() throws(PoolError) {
        // A commit must always be possible, so it may use the metadata reserve.
        try store.usingReserve { () throws(PoolError) in try prepareCommitWithReserveLocked() }
    }

    private func prepareCommitWithReserveLocked() throws(PoolError) {
        try mapErrors {
            for state in volumes.values where state.dirty {
                let block: MetadataBlock
                if state.recordBlock == 0 {
                    block = try store.allocate(.volumeRecord)
                } else {
                    block = try store.shadow(state.recordBlock, .volumeRecord).block
                }
                state.record.encode(into: block.bytes)
                if block.number != state.recordBlock {
                    volumeTableRoot = try volumeTable.insert(volumeTableRoot, state.record.id, block.number).root
                    state.recordBlock = block.number
                }
                state.dirty = false
            }
            try spaceMap.flushIndex()
        }
    }

    func commitLocked() throws(PoolError) {
        guard !isClosed else { throw .closed }
        guard !isReadOnly else { return }
        if let failure {
            // Damage found: nothing more is committed (it would spread), and a FLUSH
            // that cannot make data durable must not report success.
            flagNeedsCheckLocked()
            throw .failed(failure)
        }
        try failingOnCommitError { () throws(PoolError) in try writeCommitLocked() }
    }

    private func writeCommitLocked() throws(PoolError) {
        try prepareCommitLocked()
        guard store.hasUncommittedChanges || superblock.dataBlocks != spaceMap.dataBlocks else {
            // Only in-place data writes since the last commit: they need the barrier
            // alone, and reads go on meanwhile.
            let device = self.device
            try lock.admittingReaders { () throws(PoolError) in try mapErrors { try device.barrier() } }
            return
        }
        let freed = spaceMap.blocksPendingFree
        var next = superblock
        next.spaceMapRoot = spaceMap.indexRoot
        next.volumeTableRoot = volumeTableRoot
        next.dataBlocks = spaceMap.dataBlocks
        next.dataHighWater = spaceMap.highWater
        next.committedAt = SystemInfo.wallClockSeconds()
        let poolLock = lock
        try mapErrors {
            try store.commit(&next) { (io: () throws(MetadataError) -> Void) throws(MetadataError) in
                // Reads may look mappings up while the blocks are written and synced.
                try poolLock.admittingReaders { () throws(MetadataError) in try io() }
            }
        }
        superblock = next
        statisticsLocked.commits += 1
        // Reads running outside the lock may still use blocks freed in this transaction:
        // wait for those (only those; later reads go on) before the blocks can be reused.
        let gate = ioGate
        lock.admittingReaders { gate.waitForEarlierHolders() }
        spaceMap.transactionCommitted()
        // Releasing storage is host I/O: lookups go on meanwhile (the mutex keeps the
        // freed blocks from being handed out before their storage is released).
        if !freed.isEmpty { lock.admittingReaders { discardFreedData(freed) } }
    }

    /// Returns freed data blocks' storage to the host file system (best effort). Only
    /// after commit: until then the previous commit may still map them.
    private func discardFreedData(_ freed: Set<UInt64>) {
        guard !freed.isEmpty else { return }
        func release(_ blocks: Range<UInt64>) {
            guard !blocks.isEmpty, device.discard(at: dataOffset + blocks.lowerBound * blockSize, length: UInt64(blocks.count) * blockSize) else { return }
            knownZeroLocked.insert(blocks)
        }
        var start: UInt64 = 0
        var length: UInt64 = 0
        for block in freed.sorted() {
            if length > 0 && start + length == block {
                length += 1
                continue
            }
            release(start..<start + length)
            start = block
            length = 1
        }
        release(start..<start + length)
    }

    /// Commits and releases the file. Further calls fail with `.closed`.
    public func close() throws(PoolError) {
        try lock.withLock { () throws(PoolError) in
            guard !isClosed else { return }
            defer {
                isClosed = true
                // Nothing can enter any more (closed under the lock): wait for what runs.
                ioGate.waitForEarlierHolders()
                device.close()
            }
            // In fail mode the last commit stays the pool's state; only the flag goes out.
            if failure == nil { try commitLocked() } else { flagNeedsCheckLocked() }
        }
    }

    /// Releases the file without committing (what a crash would leave, for tests).
    public func abandon() {
        lock.withLock {
            isClosed = true
            device.close()
        }
    }

    deinit {
        if !isClosed { device.close() }
    }

    // MARK: Information

    public var generation: UInt64 { lock.withLock { superblock.generation } }

    /// How many clean 4 KiB metadata blocks the cache keeps (dirty blocks stay until
    /// commit whatever the limit). Default 16,384 (64 MiB).
    public var metadataCacheBlocks: Int {
        get { lock.withLock { store.cacheLimit } }
        set { lock.withLock { store.cacheLimit = max(4, newValue) } }
    }
    public var engineName: String { device.engineName }

    /// Whether reads can go through per-thread `AIOLoopQueue`s (see `readWithoutBlocking`).
    public var usesLoopQueues: Bool { device is AIOFileDevice }

    /// Whether data buffers should be 4 KiB-aligned (O_DIRECT); others are bounced.
    public var prefersAlignedBuffers: Bool { device is AIOFileDevice }

    /// Sizes, usage and every volume. Cost: O(volumes), shared access to the pool lock
    /// (it does not wait for a commit's I/O).
    public func info() -> PoolInfo {
        lock.withSharedAccess {
            let space = spaceLocked()
            return PoolInfo(
                path: path, uuid: superblock.uuid, engine: device.engineName, generation: superblock.generation,
                blockSize: blockSize, dataTotalBytes: space.dataTotalBytes, dataFreeBytes: space.dataFreeBytes,
                dataUsedBytes: space.dataUsedBytes,
                metadataTotalBytes: space.metadataTotalBytes,
                metadataUsedBytes: space.metadataUsedBytes,
                metadataFreeBytes: space.metadataFreeBytes,
                fileBytes: (try? device.size) ?? superblock.fileSize, allocatedFileBytes: device.allocatedBytes,
                volumes: volumes.values.map { describe($0) }.sorted { $0.name < $1.name },
                failure: failure, needsCheck: superblock.needsCheck)
        }
    }

    /// Space usage alone, for monitors that sample it often. O(1), shared access.
    public func space() -> PoolSpace {
        lock.withSharedAccess { spaceLocked() }
    }

    private func spaceLocked() -> PoolSpace {
        let metaBlock = UInt64(MetadataLayout.blockSize)
        return PoolSpace(
            dataTotalBytes: spaceMap.dataBlocks * blockSize, dataFreeBytes: spaceMap.freeBlocks * blockSize,
            metadataTotalBytes: store.regionBlocks * metaBlock, metadataUsedBytes: UInt64(store.usedBlocks) * metaBlock,
            metadataFreeBytes: UInt64(store.freeBlocks) * metaBlock, volumes: volumes.count)
    }

    func describe(_ state: VolumeState) -> VolumeInfo {
        let r = state.record
        let kind: VolumeInfo.Kind = r.kind == .snapshot ? .snapshot : (r.parentID == 0 ? .volume : .clone)
        return VolumeInfo(
            id: r.id, name: r.name, kind: kind, size: r.virtualSize, mappedBytes: r.mappedBlocks * blockSize,
            parent: volumes[r.parentID]?.record.name, createdAt: r.createdAt, isEphemeral: r.isEphemeral)
    }
}

/// A pool's space usage (`Pool.space()`).
public struct PoolSpace: Sendable, Equatable {
    public var dataTotalBytes: UInt64
    public var dataFreeBytes: UInt64
    public var metadataTotalBytes: UInt64
    public var metadataUsedBytes: UInt64
    public var metadataFreeBytes: UInt64
    public var volumes: Int

    public var dataUsedBytes: UInt64 { dataTotalBytes - dataFreeBytes }
    /// Data space used, in percent of the capacity.
    public var percentUsed: Double { dataTotalBytes == 0 ? 0 : Double(dataUsedBytes) * 100 / Double(dataTotalBytes) }
}

/// What the pool has done since it was opened (for metrics).
public struct PoolStatistics: Sendable, Equatable {
    /// Metadata commits (transactions made durable).
    public var commits: UInt64 = 0
    /// Writes to shared blocks that went to a new block (copy-on-write), in blocks.
    public var copyOnWriteBlocks: UInt64 = 0
    /// Writes to unmapped space that allocated a block.
    public var newBlocks: UInt64 = 0

    public init() {}
}

extension Pool {
    /// Counts since open. O(1), takes the pool lock briefly.
    public var statistics: PoolStatistics { lock.withSharedAccess { statisticsLocked } }
}

/// A summary of the pool, as `thinbd info` prints it.
public struct PoolInfo: Sendable {
    public var path: String
    public var uuid: [UInt8]
    public var engine: String
    public var generation: UInt64
    public var blockSize: UInt64
    public var dataTotalBytes: UInt64
    public var dataFreeBytes: UInt64
    public var dataUsedBytes: UInt64
    public var metadataTotalBytes: UInt64
    public var metadataUsedBytes: UInt64
    public var metadataFreeBytes: UInt64
    public var fileBytes: UInt64
    public var allocatedFileBytes: UInt64?
    public var volumes: [VolumeInfo]
    /// Set when damage put the pool in fail mode (reads only, no commits).
    public var failure: PoolFailure?
    /// The superblock is flagged for a check (damage was found by an earlier server).
    public var needsCheck: Bool

    /// `ok`, `failed` (fail mode: reads only) or `needs-check` (flagged by an earlier
    /// server, opened read-only or forced).
    public var state: String { failure != nil ? "failed" : needsCheck ? "needs-check" : "ok" }

    public var uuidString: String {
        let hex = uuid.map { byte in
            let s = String(byte, radix: 16)
            return s.count == 1 ? "0" + s : s
        }.joined()
        let parts = [0..<8, 8..<12, 12..<16, 16..<20, 20..<32].map { range in
            String(hex[hex.index(hex.startIndex, offsetBy: range.lowerBound)..<hex.index(hex.startIndex, offsetBy: range.upperBound)])
        }
        return parts.joined(separator: "-")
    }
}

/// One volume, snapshot or clone.
public struct VolumeInfo: Sendable, Equatable {
    public enum Kind: String, Sendable {
        case volume, snapshot, clone
    }

    public var id: UInt64
    public var name: String
    public var kind: Kind
    public var size: UInt64
    public var mappedBytes: UInt64
    /// The volume or snapshot this one was created from, if it still exists.
    public var parent: String?
    public var createdAt: UInt64
    /// Made by `serve --ephemeral`: removed when that server stops, or by the next start.
    public var isEphemeral: Bool = false

    public var isReadOnly: Bool { kind == .snapshot }
}
