import ThinFormat
import ThinMetadata
import ThinSystem
import Synchronization

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

/// A thin pool: one backing file holding a superblock pair, a metadata region and a
/// data region, with thin volumes, read-only snapshots and writable clones inside.
///
/// Thread-safe: one lock serializes metadata work. Crash safety: every operation that
/// changes the set of volumes commits before it returns; data writes become durable at
/// the next `commit()` (NBD FLUSH, FUA, or the auto-commit timer), like a disk with a
/// volatile write cache.
public final class Pool: @unchecked Sendable {
    /// Everything that changes with the metadata (`PoolState`), behind the lock that
    /// orders every change to it; lookups need only its shared side, so they continue
    /// while a commit writes and syncs.
    let lock: PoolLock<PoolState>
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
    /// Fail mode (Pool+FailMode.swift): its own lock, so that finding damage never waits.
    let failureState = LockedValue(FailureState())
    /// Set once, after `failureState` records the failure: lets every write ask "failed?"
    /// without that lock (two locks a write before, about 280 instructions). Never reset:
    /// fail mode ends only when the pool is closed.
    let hasFailed = Atomic<Bool>(false)
    /// Zeros that write-zeroes writes from, never written to (shared by every thread):
    /// 1 MiB or one data block, whichever is larger.
    let zeroes: AlignedBuffer

    public let blockSize: UInt64
    let dataOffset: UInt64
    /// Origins of origin-backed volumes (Pool+Origin.swift): how to reach them, and the
    /// ones reached so far. Its own lock: a fetch never holds the pool lock.
    let origins = LockedValue(OriginCatalog())
    /// Stores fetched origin blocks after the read that fetched them has returned.
    let originStore = OriginStoreQueue()
    /// Fetches, in the background, blocks a clone overwrites that its ancestors still
    /// need (`warmAncestors`).
    let originWarmer = OriginStoreQueue()
    /// Origin blocks being fetched or waiting for their store, shared by every reader.
    let originInFlight = OriginBlocksInFlight()

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
        let uuid = makeUUID()
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
        self.blockSize = UInt64(superblock.dataBlockSize)
        self.dataOffset = superblock.dataOffset
        self.zeroes = AlignedBuffer(count: max(1 << 20, Int(superblock.dataBlockSize)))
        let (state, damage) = try ThinPool.mapErrors { try PoolState.load(device: device, superblock: superblock) }
        let hasOrigins = state.volumes.values.contains { $0.record.origin != nil }
        lock = PoolLock(state)
        origins.withLockedValue { $0.mayHaveOriginVolumes = hasOrigins }
        // Damage in one volume's record or tree does not keep the others from being
        // read: the pool opens in fail mode (nothing changes, nothing commits; the
        // metadata counts of a damaged tree are incomplete, and nothing allocates).
        if let first = damage.first {
            enterFailMode(damage.count == 1 ? first : "\(first) (and \(damage.count - 1) more)")
        }
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
        try lock.withLock { (state: inout PoolState) throws(PoolError) in
            if try mapErrors({ try device.size }) > state.superblock.fileSize {
                try mapErrors { try device.setSize(state.superblock.fileSize) }
            }
            let mark = state.spaceMap.highWater
            let end = state.superblock.dataBlocks
            if mark < end && !device.discard(at: dataOffset + mark * blockSize, length: (end - mark) * blockSize) {
                state.spaceMap.setHighWater(end)
            }
            // Volumes made before images had UUIDs get theirs now (written by the next commit).
            let missing = state.volumes.compactMap { id, volume in volume.record.hasUUID ? nil : id }
            for id in missing { state.volumes[id]?.change { $0.uuid = makeUUID() } }
        }
    }

    deinit {
        lock.withLockInDeinit { state in
            if !state.isClosed { device.close() }
        }
    }

    // MARK: Information

    public var generation: UInt64 { lock.withSharedAccess { $0.superblock.generation } }

    /// How many clean 4 KiB metadata blocks the cache keeps (dirty blocks stay until
    /// commit whatever the limit). Default 16,384 (64 MiB).
    public var metadataCacheBlocks: Int {
        get { lock.withSharedAccess { $0.store.cacheLimit } }
        set { lock.withLock { $0.store.cacheLimit = max(4, newValue) } }
    }
    public var engineName: String { device.engineName }

    /// Whether reads can go through per-thread `LoopDiskQueue`s (see
    /// `readWithoutBlocking`): pool files, with O_DIRECT or through the page cache.
    public var usesLoopQueues: Bool { device is AIOFileDevice || device is FileDevice }

    /// The pool file's device and inode (nil for a memory pool); cost: one fstat.
    public var fileIdentity: RawFile.Identity? { device.fileIdentity }

    /// Whether data buffers should be 4 KiB-aligned (O_DIRECT); others are bounced.
    public var prefersAlignedBuffers: Bool { device is AIOFileDevice }

    /// Sizes, usage and every volume. Cost: O(volumes), shared access to the pool lock
    /// (it does not wait for a commit's I/O).
    public func info() -> PoolInfo {
        lock.withSharedAccess { state in
            let space = space(state)
            return PoolInfo(
                path: path, uuid: state.superblock.uuid, engine: device.engineName, generation: state.superblock.generation,
                blockSize: blockSize, dataTotalBytes: space.dataTotalBytes, dataFreeBytes: space.dataFreeBytes,
                dataUsedBytes: space.dataUsedBytes,
                metadataTotalBytes: space.metadataTotalBytes,
                metadataUsedBytes: space.metadataUsedBytes,
                metadataFreeBytes: space.metadataFreeBytes,
                fileBytes: (try? device.size) ?? state.superblock.fileSize, allocatedFileBytes: device.allocatedBytes,
                volumes: describeAll(state), failure: failure, needsCheck: state.superblock.needsCheck)
        }
    }

    /// Space usage alone, for monitors that sample it often. O(1), shared access.
    public func space() -> PoolSpace {
        lock.withSharedAccess { state in space(state) }
    }

    private func space(_ state: borrowing PoolState) -> PoolSpace {
        let metaBlock = UInt64(MetadataLayout.blockSize)
        return PoolSpace(
            dataTotalBytes: state.spaceMap.dataBlocks * blockSize, dataFreeBytes: state.spaceMap.freeBlocks * blockSize,
            metadataTotalBytes: state.store.regionBlocks * metaBlock,
            metadataUsedBytes: UInt64(state.store.usedBlocks) * metaBlock,
            metadataFreeBytes: UInt64(state.store.freeBlocks) * metaBlock, volumes: state.volumes.count)
    }

    func describe(_ volume: VolumeState, in state: borrowing PoolState) -> VolumeInfo {
        let r = volume.record
        let kind: VolumeInfo.Kind = r.kind == .snapshot ? .snapshot : (r.parentID == 0 ? .volume : .clone)
        return VolumeInfo(
            id: r.id, name: r.name, kind: kind, size: r.virtualSize, mappedBytes: r.mappedBlocks * blockSize,
            parent: state.volumes[r.parentID]?.record.name, createdAt: r.createdAt, isEphemeral: r.isEphemeral,
            uuid: r.hasUUID ? formatUUID(r.uuid) : nil, origin: r.origin)
    }

    /// Every volume, sorted by name.
    func describeAll(_ state: borrowing PoolState) -> [VolumeInfo] {
        state.volumes.values.map { describe($0, in: state) }.sorted { $0.name < $1.name }
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
    public var statistics: PoolStatistics { lock.withSharedAccess { $0.statistics } }
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

    public var uuidString: String { formatUUID(uuid) }
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
    /// The image's identity across pools and renames; nil for a volume made before
    /// UUIDs existed, until the pool is next opened read-write.
    public var uuid: String?
    /// Where an origin-backed volume's unfetched blocks come from (nil: none).
    public var origin: VolumeRecord.Origin?

    public var isReadOnly: Bool { kind == .snapshot }
}
