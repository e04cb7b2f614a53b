import ThinFormat
import ThinMetadata
import ThinSystem

/// Everything the pool lock guards: the superblock being built, the metadata store and
/// data space map, the volume catalog, and the bookkeeping that changes with them.
///
/// A `Pool` keeps it inside its `PoolLock`, so it is reachable only within
/// `lock.withLock` (exclusive, `inout`) or `lock.withSharedAccess` (read-only): a change
/// without the lock does not compile. The store and space map are classes whose
/// methods change them; their references are reachable only here too. (The store's block
/// cache has a lock of its own, which is what lets readers share it.)
struct PoolState {
    /// The last commit's superblock, with `nextVolumeID` and flags of this transaction.
    var superblock: Superblock
    let store: MetadataStore
    let spaceMap: DataSpaceMap
    var volumeTableRoot: UInt64
    var volumes = VolumeCatalog()
    var names: [String: UInt64] = [:]
    var isClosed = false
    /// Counts since open (`Pool.statistics`).
    var statistics = PoolStatistics()
    /// `Pool.autoGrow`.
    var autoGrow: AutoGrowPolicy?
    /// Data blocks below the high-water mark known to read as zeros: freed, and their
    /// storage released after the commit. Allocation takes blocks out; empty after open
    /// (conservative).
    var knownZero = BlockRanges()
    /// One data block of zeros for writes made under the exclusive lock.
    let zeroScratch: AlignedBuffer

    var mappings: BTree { BTree(store: store, type: .mappingNode, values: .dataBlocks(spaceMap)) }
    var volumeTable: BTree { BTree(store: store, type: .volumeTableNode, values: .metadataBlocks(.volumeRecord)) }

    /// Whether this transaction changed anything a commit must write.
    var hasUncommittedChanges: Bool {
        store.hasUncommittedChanges || volumes.values.contains { $0.dirty } || superblock.dataBlocks != spaceMap.dataBlocks
    }

    func volume(named name: String) throws(PoolError) -> VolumeState {
        guard let id = names[name], let volume = volumes[id] else { throw .noSuchVolume(name) }
        return volume
    }

    /// Adds a new volume to the catalog (written by the next commit).
    mutating func add(_ record: VolumeRecord) -> VolumeState {
        let volume = VolumeState(record: record, recordBlock: 0, dirty: true)
        volumes[record.id] = volume
        names[record.name] = record.id
        superblock.nextVolumeID = record.id + 1
        return volume
    }

    /// Lends volume `id`'s mapping root and mapped-block count to `body`, and stores what
    /// it leaves in the record on every path: a tree change that fails part-way keeps the
    /// root of what the tree already holds. `body` must not reach the state otherwise.
    mutating func changingMapping<T>(
        of id: UInt64, _ body: (_ root: inout UInt64, _ mapped: inout UInt64) throws(PoolError) -> T
    ) throws(PoolError) -> T {
        guard let volume = volumes[id] else { throw .noSuchVolume("#\(id)") }
        var (root, mapped) = (volume.record.mappingRoot, volume.record.mappedBlocks)
        defer {
            // Only a real change dirties the record: writes that overwrite blocks in
            // place leave nothing to commit (the auto-commit then skips the interval).
            if root != volume.record.mappingRoot || mapped != volume.record.mappedBlocks {
                volumes[id]?.change { record in
                    record.mappingRoot = root
                    record.mappedBlocks = mapped
                }
            }
        }
        return try body(&root, &mapped)
    }

    /// Reads the state of the commit `superblock` describes from `device`: the volume
    /// catalog, and references to every tree's interior nodes. Returns the damage found
    /// in single volumes: a record that fails its checks (the volume is left out) or a
    /// mapping tree whose interior fails them (the volume stays; reads of the damaged
    /// ranges fail). Damage in the volume table or the space map throws.
    /// Cost: O(metadata / 250) block reads.
    static func load(device: BlockDevice, superblock: Superblock) throws -> (PoolState, damage: [String]) {
        let store = MetadataStore(
            device: device, regionStart: superblock.metadataStart, regionBlocks: superblock.metadataBlocks,
            committedGeneration: superblock.generation)
        let spaceMap = try DataSpaceMap(
            store: store, indexRoot: superblock.spaceMapRoot, dataBlocks: superblock.dataBlocks,
            highWater: superblock.dataHighWater)
        var state = PoolState(
            superblock: superblock, store: store, spaceMap: spaceMap, volumeTableRoot: superblock.volumeTableRoot,
            zeroScratch: AlignedBuffer(count: Int(superblock.dataBlockSize)))
        let damage = try state.loadVolumes()
        store.finishScan()
        return (state, damage)
    }

    private mutating func loadVolumes() throws -> [String] {
        let mappingTree = mappings
        var records: [(UInt64, VolumeRecord)] = []
        var damage: [String] = []
        let (store, blockSize, nextVolumeID) = (store, UInt64(superblock.dataBlockSize), superblock.nextVolumeID)
        try volumeTable.scanReferences(volumeTableRoot, readLeaves: true) { (recordBlock: UInt64) throws(MetadataError) in
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
}

/// One volume or snapshot in the catalog.
struct VolumeState {
    var record: VolumeRecord
    /// Where the record was last written (0 = not yet).
    var recordBlock: UInt64
    /// The record changed since it was written: the next commit writes it.
    var dirty: Bool

    /// Changes the record and marks it for the next commit.
    mutating func change(_ body: (inout VolumeRecord) -> Void) {
        body(&record)
        dirty = true
    }
}

/// What every read and write asks of its volume, in a value with no references: copied
/// out of the catalog without reference counting, found without SipHash.
struct VolumeLookup: Equatable {
    var mappingRoot: UInt64
    var virtualSize: UInt64
    var isSnapshot: Bool
    var hasOrigin: Bool

    init(_ record: VolumeRecord) {
        mappingRoot = record.mappingRoot
        virtualSize = record.virtualSize
        isSnapshot = record.kind == .snapshot
        hasOrigin = record.origin != nil
    }
}

/// The volume catalog by id, with each volume's `VolumeLookup` beside it.
///
/// Every change goes through the subscript's setter, which stores both, so they cannot
/// disagree. The lookups exist for the per-request path: there, copying a
/// `VolumeState` out of a `Dictionary` cost about 570 instructions a request (SipHash,
/// and retaining and releasing the record's strings and arrays), a lookup here about
/// 20. Cost of a change: a dictionary update and a table update.
struct VolumeCatalog: Sequence {
    private var states: [UInt64: VolumeState] = [:]
    private var lookups = BlockNumberMap<VolumeLookup>()

    subscript(id: UInt64) -> VolumeState? {
        get { states[id] }
        set {
            states[id] = newValue
            if let newValue {
                lookups.updateValue(VolumeLookup(newValue.record), forKey: id)
            } else {
                lookups.removeValue(forKey: id)
            }
        }
    }

    /// Volume `id`'s lookup fields, or nil when there is no such volume. Cost: O(1),
    /// no reference counting.
    @inline(__always)
    func lookup(_ id: UInt64) -> VolumeLookup? { lookups[id] }

    var count: Int { states.count }
    var values: Dictionary<UInt64, VolumeState>.Values { states.values }
    func makeIterator() -> Dictionary<UInt64, VolumeState>.Iterator { states.makeIterator() }
    var underestimatedCount: Int { states.count }
}
