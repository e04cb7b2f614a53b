import ThinFormat
import ThinMetadata
import ThinSystem

/// What `check` found.
public struct CheckReport: Sendable {
    /// Damage that repair cannot fix (a bad block, a count lower than the references).
    public var damage: [String] = []
    /// Data blocks counted as used that nothing references (space lost, no data at risk).
    public var leakedBlocks: UInt64 = 0
    /// Bookkeeping that disagrees with the trees and can be recomputed (free counts,
    /// mapped-block counts).
    public var fixable: [String] = []
    /// Whether `repair` rewrote anything.
    public var repaired = false

    public var metadataBlocksChecked = 0
    public var dataReferences: UInt64 = 0
    public var volumesChecked = 0
    /// Volumes and snapshots whose unmapped blocks read from an origin (not damage: those
    /// blocks are not fetched yet), with the origin's address.
    public var originBacked: [(name: String, address: String)] = []

    public var isClean: Bool { damage.isEmpty && leakedBlocks == 0 && fixable.isEmpty }
}

/// The consistency checker. It walks every tree from the roots, reading every block
/// (leaves too), recomputes every reference count, and compares them with the space
/// maps and the volume records. The same walk is the engine's invariant check in tests.
extension Pool {
    /// Checks the pool's current state. With `repair` (read-write pools only), leaks and
    /// stale counts are fixed and committed; other damage is only reported.
    /// Cost: reads all metadata once; memory O(data blocks) for the recomputed counts.
    /// Holds the pool lock throughout: for pools nobody else uses (offline `check`,
    /// tests). A served pool uses `checkCommittedState`.
    public func check(repair: Bool = false) -> CheckReport {
        lock.withLock { state in
            let walker = checkLive(&state)
            var report = walker.report
            if repair && !isReadOnly && report.damage.isEmpty && !report.isClean {
                do {
                    try walker.repair(&state)
                    report.repaired = true
                    try commit(&state)
                    let again = checkLive(&state).report
                    report.damage = again.damage
                    report.leakedBlocks = again.leakedBlocks
                    report.fixable = again.fixable
                    if !again.isClean { report.damage.append("repair did not converge") }
                } catch {
                    report.damage.append("repair failed: \(error)")
                }
            }
            if repair && !isReadOnly && report.damage.isEmpty && state.superblock.needsCheck {
                do {
                    try writeNeedsCheck(&state, false)
                    report.repaired = true
                } catch {
                    report.damage.append("could not clear the needs-check flag: \(error)")
                }
            }
            return report
        }
    }

    /// Walks the in-memory state, after writing its pending changes into metadata blocks.
    private func checkLive(_ state: inout PoolState) -> CheckWalker {
        var problem: String?
        if !isReadOnly {
            do {
                try prepareCommit(&state)
            } catch {
                problem = "could not write pending metadata before checking: \(error)"
            }
        }
        var walker = CheckWalker(store: state.store, blockSize: blockSize, source: .live(LiveView(state)))
        if let problem { walker.damage(problem) }
        walker.run()
        return walker
    }

    /// Checks the last commit while the pool stays in use: commits first (so recent
    /// writes are included), pins that commit (its blocks are not reused until the check
    /// ends, as with dm-thin's metadata snapshot) and walks it from the disk without the
    /// pool lock, so readers and writers are never held up by the walk. Every tree,
    /// record and data count of that commit is checked; the in-memory metadata counts
    /// are not (they belong to the live state; an offline `check` compares them).
    /// Cost: reads all of the commit's metadata once; memory O(data blocks).
    public func checkCommittedState() -> CheckReport {
        if !isReadOnly { try? commit() }
        // The walk reads the pinned commit's blocks from the device through the store's
        // committed-read path, which needs no pool lock (the cache has its own).
        let pinned = lock.withLock { state -> (MetadataStore, CommittedView)? in
            guard !state.isClosed else { return nil }
            state.store.pin()
            return (state.store, CommittedView(superblock: state.superblock))
        }
        guard let (store, view) = pinned else {
            var report = CheckReport()
            report.damage.append("the pool is closed")
            return report
        }
        defer { lock.withLock { state in state.store.unpin() } }
        var walker = CheckWalker(store: store, blockSize: blockSize, source: .committed(view))
        walker.run()
        // Damage in the last commit: stop committing, as when a request meets it.
        if let first = walker.report.damage.first { enterFailMode("check found: \(first)") }
        return walker.report
    }
}

/// What one commit holds: enough to walk it without the pool's in-memory state.
struct CommittedView {
    var generation: UInt64
    var spaceMapRoot: UInt64
    var volumeTableRoot: UInt64
    var dataBlocks: UInt64
    var highWater: UInt64
    var metadataBlocks: UInt64
    var nextVolumeID: UInt64

    init(superblock: Superblock) {
        nextVolumeID = superblock.nextVolumeID
        generation = superblock.generation
        spaceMapRoot = superblock.spaceMapRoot
        volumeTableRoot = superblock.volumeTableRoot
        dataBlocks = superblock.dataBlocks
        highWater = superblock.dataHighWater
        metadataBlocks = superblock.metadataBlocks
    }
}

/// The parts of the live state a check compares with what the trees hold (taken under
/// the exclusive lock, after the pending changes were written into metadata blocks).
struct LiveView {
    var volumes: VolumeCatalog
    var names: [String: UInt64]
    var spaceMap: DataSpaceMap
    var volumeTableRoot: UInt64
    var nextVolumeID: UInt64

    init(_ state: borrowing PoolState) {
        volumes = state.volumes
        names = state.names
        spaceMap = state.spaceMap
        volumeTableRoot = state.volumeTableRoot
        nextVolumeID = state.superblock.nextVolumeID
    }
}

struct CheckWalker {
    /// What is checked: the pool's in-memory state (the caller holds the exclusive lock
    /// for the whole walk) or a pinned commit read from disk.
    enum Source {
        case live(LiveView)
        case committed(CommittedView)
    }

    let store: MetadataStore
    let blockSize: UInt64
    let source: Source
    var report = CheckReport()
    var metadataRefs: [UInt64: UInt32] = [:]
    var dataRefs: [UInt32]
    /// Per visited node: entry count and key range of its subtree.
    var summaries: [UInt64: (count: UInt64, low: UInt64, high: UInt64)] = [:]
    var indexEntries: [UInt64: UInt64] = [:]
    var mappedCounts: [UInt64: UInt64] = [:]
    /// The records the volume table holds, by id.
    var records: [UInt64: VolumeRecord] = [:]
    let dataBlocks: UInt64
    let highWater: UInt64
    let regionBlocks: UInt64
    let nextVolumeID: UInt64

    init(store: MetadataStore, blockSize: UInt64, source: Source) {
        self.store = store
        self.blockSize = blockSize
        self.source = source
        switch source {
        case .live(let live):
            dataBlocks = live.spaceMap.dataBlocks
            highWater = live.spaceMap.highWater
            regionBlocks = store.regionBlocks
            nextVolumeID = live.nextVolumeID
        case .committed(let view):
            dataBlocks = view.dataBlocks
            highWater = view.highWater
            regionBlocks = view.metadataBlocks
            nextVolumeID = view.nextVolumeID
        }
        // A corrupt superblock cannot make this allocate without bound: its data
        // block count was checked against the file size when the pool opened.
        dataRefs = [UInt32](repeating: 0, count: Int(dataBlocks))
    }

    func read(_ block: UInt64, _ type: BlockType) throws(MetadataError) -> MetadataBlock {
        switch source {
        case .live: try store.read(block, type)
        case .committed(let view): try store.readCommitted(block, type, generation: view.generation, regionBlocks: regionBlocks)
        }
    }

    mutating func damage(_ text: String) {
        if report.damage.count < 1000 { report.damage.append(text) }
    }

    mutating func run() {
        let spaceMapRoot: UInt64
        let volumeTableRoot: UInt64
        switch source {
        case .live(let live):
            spaceMapRoot = live.spaceMap.indexRoot
            volumeTableRoot = live.volumeTableRoot
        case .committed(let view):
            spaceMapRoot = view.spaceMapRoot
            volumeTableRoot = view.volumeTableRoot
        }
        walk(spaceMapRoot, .spaceMapIndexNode, level: nil, low: 0, high: UInt64.max) { walker, group, packed in
            walker.indexEntries[group] = packed
            let block = RefcountLayout.unpackIndexValue(packed).block
            guard walker.reference(block, .refcounts) else { return }
            do {
                let rcb = try walker.read(block, .refcounts)
                if UInt64(rcb.bytes.le32(12)) != group {
                    walker.damage("refcount block \(block) belongs to group \(rcb.bytes.le32(12)) but is indexed as group \(group)")
                }
            } catch {
                walker.damage("\(error)")
            }
        }
        var recordBlocks: [UInt64: UInt64] = [:]
        var names: Set<String> = []
        let (nextVolumeID, blockSize) = (self.nextVolumeID, self.blockSize)
        walk(volumeTableRoot, .volumeTableNode, level: nil, low: 0, high: UInt64.max) { walker, id, recordBlock in
            guard walker.reference(recordBlock, .volumeRecord) else { return }
            do {
                let block = try walker.read(recordBlock, .volumeRecord)
                let record = try VolumeRecord.read(block.bytes, blockSize: blockSize, nextVolumeID: nextVolumeID)
                guard record.id == id else {
                    walker.damage("volume record \(recordBlock) has id \(record.id) but is indexed as \(id)")
                    return
                }
                guard names.insert(record.name).inserted else {
                    walker.damage("volume record \(recordBlock): a second volume named \(record.name)")
                    return
                }
                walker.records[id] = record
                recordBlocks[id] = recordBlock
            } catch {
                walker.damage("volume record \(recordBlock): \(error)")
            }
        }
        if case .live(let live) = source {
            for (id, volume) in live.volumes {
                guard let record = records[id] else {
                    damage("volume \(volume.record.name) is missing from the volume table")
                    continue
                }
                if volume.record != record || volume.recordBlock != recordBlocks[id] {
                    damage("volume record \(recordBlocks[id] ?? 0) for \(record.name) differs from the volume's state")
                }
                if live.names[record.name] != id { damage("name index disagrees for \(record.name)") }
            }
            for (id, record) in records where live.volumes[id] == nil {
                damage("volume table lists id \(id) (\(record.name)) that the pool does not know")
            }
        }
        for record in records.values.sorted(by: { $0.id < $1.id }) {
            report.volumesChecked += 1
            checkVolume(record)
        }
        if case .live = source { checkMetadataCounts() }
        checkDataCounts()
    }

    /// Counts one reference to a metadata block; true on the first.
    mutating func reference(_ block: UInt64, _ type: BlockType) -> Bool {
        guard block >= store.regionStart, block - store.regionStart < regionBlocks else {
            damage("pointer to \(type) at block \(block), outside the metadata region")
            return false
        }
        let count = (metadataRefs[block] ?? 0) + 1
        metadataRefs[block] = count
        return count == 1
    }

    /// Walks a tree, checking levels, key order and bounds, and calls `leaf` for every
    /// leaf entry (once per node, however many trees share it).
    @discardableResult
    mutating func walk(
        _ root: UInt64, _ type: BlockType, level: UInt16?, low: UInt64, high: UInt64,
        leaf: (inout CheckWalker, UInt64, UInt64) -> Void
    ) -> (count: UInt64, low: UInt64, high: UInt64)? {
        guard root != 0 else { return (0, 0, 0) }
        let first = reference(root, type)
        if !first {
            guard let summary = summaries[root] else { return nil }
            if summary.count > 0 && (summary.low < low || summary.high >= high) {
                damage("shared \(type) \(root) holds keys outside its parent's range")
            }
            return summary
        }
        let node: NodeView
        do {
            node = try read(root, type).node
        } catch {
            damage("\(error)")
            return nil
        }
        report.metadataBlocksChecked += 1
        if let level, node.level != level {
            damage("\(type) \(root) is at level \(node.level), expected \(level)")
            return nil
        }
        guard node.count > 0 else {
            damage("\(type) \(root) is empty")
            return nil
        }
        if node.key(0) < low || node.key(node.count - 1) >= high {
            damage("\(type) \(root) holds keys outside its parent's range")
        }
        var count: UInt64 = 0
        var highest: UInt64 = 0
        if node.isLeaf {
            for i in 0..<node.count { leaf(&self, node.key(i), node.value(i)) }
            count = UInt64(node.count)
            highest = node.key(node.count - 1)
        } else {
            for i in 0..<node.count {
                let upper = i + 1 < node.count ? node.key(i + 1) : high
                if let child = walk(node.value(i), type, level: node.level - 1, low: node.key(i), high: upper, leaf: leaf) {
                    count += child.count
                    highest = max(highest, child.high)
                }
            }
        }
        let summary = (count, node.key(0), highest)
        summaries[root] = summary
        return summary
    }

    mutating func checkVolume(_ r: VolumeRecord) {
        let dataBlocks = self.dataBlocks
        let highWater = self.highWater
        let summary = walk(r.mappingRoot, .mappingNode, level: nil, low: 0, high: UInt64.max) { walker, _, physical in
            walker.report.dataReferences += 1
            guard physical < dataBlocks else {
                walker.damage("mapping to data block \(physical), beyond the pool's \(dataBlocks)")
                return
            }
            if physical >= highWater {
                walker.damage("mapping to data block \(physical), above the high-water mark \(highWater)")
            }
            walker.dataRefs[Int(physical)] &+= 1
        }
        if let summary {
            let limit = r.virtualSize / blockSize + (r.virtualSize % blockSize == 0 ? 0 : 1)
            if summary.count > 0 && summary.high >= limit {
                damage("\(r.name) maps block \(summary.high), past its end (\(limit) blocks)")
            }
            if summary.count != r.mappedBlocks {
                report.fixable.append("\(r.name): \(summary.count) blocks mapped, record says \(r.mappedBlocks)")
                mappedCounts[r.id] = summary.count
            }
        }
        switch r.kind {
        case .snapshot:
            guard let (volume, _) = VolumeName.splitSnapshot(r.name) else {
                damage("snapshot \(r.name) has no '@' in its name")
                break
            }
            if r.ownerID != 0 {
                if let owner = records[r.ownerID] {
                    if owner.name != volume { damage("snapshot \(r.name) belongs to \(owner.name)") }
                } else {
                    damage("snapshot \(r.name) belongs to missing volume #\(r.ownerID)")
                }
            }
        case .volume:
            if VolumeName.splitSnapshot(r.name) != nil { damage("volume \(r.name) has '@' in its name") }
        }
        // Unmapped blocks of an origin-backed image are the origin's, not holes; the
        // record's fields were validated when it was read.
        if let origin = r.origin { report.originBacked.append((r.name, origin.locator)) }
        if r.parentID != 0 && records[r.parentID] == nil {
            damage("\(r.name) names missing parent #\(r.parentID)")
        }
    }

    mutating func checkMetadataCounts() {
        var stored: [UInt64: UInt32] = [:]
        for (block, count) in store.referencedBlocks() { stored[block] = count }
        for (block, count) in metadataRefs where stored[block] != count {
            damage("metadata block \(block) is referenced \(count) times, counted \(stored[block] ?? 0)")
        }
        for (block, count) in stored where metadataRefs[block] == nil {
            damage("metadata block \(block) is counted \(count) times but nothing references it")
        }
    }

    /// Each group's refcount block and free count: the live space map's (which the
    /// index must agree with), or what the committed index says.
    func groups() -> [(block: UInt64, free: UInt32)] {
        switch source {
        case .live(let live):
            return live.spaceMap.groupSummary()
        case .committed:
            let e = UInt64(DataSpaceMap.entriesPerGroup)
            let count = Int(dataBlocks / e + (dataBlocks % e == 0 ? 0 : 1))
            return (0..<count).map { g in
                guard let packed = indexEntries[UInt64(g)] else {
                    return (0, UInt32(min(e, dataBlocks - UInt64(g) * e)))
                }
                let (block, free) = RefcountLayout.unpackIndexValue(packed)
                return (block, UInt32(free))
            }
        }
    }

    mutating func checkDataCounts() {
        let e = DataSpaceMap.entriesPerGroup
        let summary = groups()
        for (g, group) in summary.enumerated() {
            let first = g * e
            let entries = min(e, Int(dataBlocks) - first)
            var counts: [UInt32]?
            if group.block != 0 {
                do {
                    let rcb = try read(group.block, .refcounts)
                    guard Int(rcb.bytes.le32(12)) == g else {
                        damage("refcount block \(group.block) belongs to group \(rcb.bytes.le32(12)), indexed as group \(g)")
                        continue
                    }
                    counts = (0..<e).map { RefcountLayout.count(rcb.bytes, $0) }
                } catch {
                    damage("\(error)")
                    continue
                }
            }
            var zero: UInt32 = 0
            for i in 0..<entries {
                let stored = counts?[i] ?? 0
                let computed = dataRefs[first + i]
                if stored == 0 { zero += 1 }
                if stored > computed {
                    report.leakedBlocks += 1
                } else if stored < computed {
                    damage("data block \(first + i) has \(computed) references but a count of \(stored)")
                }
            }
            if zero != group.free {
                report.fixable.append("group \(g): \(zero) free blocks, recorded \(group.free)")
            }
            if case .live = source {
                let indexed = indexEntries[UInt64(g)]
                if group.block != 0 {
                    let expected = RefcountLayout.packIndexValue(block: group.block, free: Int(group.free))
                    if indexed != expected { damage("space map index entry for group \(g) is stale") }
                } else if indexed != nil {
                    damage("space map index lists group \(g), which has no refcount block")
                }
            } else if indexEntries.keys.contains(where: { $0 >= UInt64(summary.count) }) && g == 0 {
                damage("space map index lists groups beyond the pool's \(summary.count)")
            }
        }
    }

    /// Fixes leaks and recomputable counts (only when there is no other damage).
    func repair(_ state: inout PoolState) throws {
        let spaceMap = state.spaceMap
        let e = DataSpaceMap.entriesPerGroup
        for g in 0..<spaceMap.groupCount {
            guard let counts = try spaceMap.storedCounts(group: g) else { continue }
            let entries = min(e, Int(spaceMap.dataBlocks) - g * e)
            for i in 0..<entries where counts[i] > dataRefs[g * e + i] {
                try spaceMap.repairCount(UInt64(g * e + i), to: dataRefs[g * e + i])
            }
            try spaceMap.recountGroup(g)
        }
        for (id, count) in mappedCounts {
            state.volumes[id]?.change { $0.mappedBlocks = count }
        }
    }
}

extension Pool {
    /// Metadata blocks the current state references (diagnostics and tests).
    public func metadataBlocksInUse() -> [UInt64] {
        lock.withLock { state in state.store.referencedBlocks().map(\.block) }
    }

    /// Metadata blocks asked of the store since open, cached or not (cost measurements).
    var metadataReads: Int { lock.withSharedAccess { $0.store.readCount } }

    /// Byte offset of the data region in the pool file.
    public var dataRegionOffset: UInt64 { dataOffset }
}

extension Pool {
    /// The data block behind each mapped virtual block of a range (layout diagnostics).
    func physicalBlocks(_ id: UInt64, blocks: Range<UInt64>) throws(PoolError) -> [UInt64: UInt64] {
        try lock.withSharedAccess { state throws(PoolError) in
            let volume = try volume(id, writing: false, in: state)
            var result: [UInt64: UInt64] = [:]
            _ = try mapErrors {
                try state.mappings.forEach(volume.record.mappingRoot, in: blocks) { (vb: UInt64, physical: UInt64) -> Bool in
                    result[vb] = physical
                    return true
                }
            }
            return result
        }
    }
}
