import ThinFormat

/// Reference counts of data blocks, persisted in refcount blocks (1016 counts each, one
/// "group" per block) found through the space map index B-tree.
///
/// In memory it keeps, per group, the refcount block's location and how many entries
/// are zero; the index stores both, so open reads only the index, never the refcount
/// blocks. Allocation is next-fit from a hint: it looks at the hinted block first (so a
/// volume's consecutive blocks stay contiguous), then scans groups that have free
/// entries, never the whole pool block by block.
///
/// Transaction rules: a block whose count drops to zero is not handed out again until
/// the transaction commits (the last commit may still map it), and a block whose count
/// dropped but stays positive is reported by `sharingDroppedThisTransaction` so writers
/// do not overwrite it in place (the last commit may still share it).
public final class DataSpaceMap {
    public static let entriesPerGroup = RefcountLayout.entriesPerBlock

    let store: MetadataStore
    // `dataBlocks`, `groupBlock`, `decremented` and `sharedZeroBlock` are read by every
    // request's in-place check under the pool's shared access and written only under its
    // exclusive access; no access to them calls code that reaches them again. The
    // run-time exclusivity check (per thread) adds nothing here and cost about 75
    // instructions per access.
    @exclusivity(unchecked) public private(set) var dataBlocks: UInt64
    public private(set) var indexRoot: UInt64

    @exclusivity(unchecked) private var groupBlock: [UInt64] = []
    private var groupFree: [UInt32] = []
    /// Sum of `groupFree`, kept up to date so space queries are O(1).
    private var zeroCountTotal: UInt64 = 0
    private var groupPending: [UInt32] = []
    /// Blocks handed to writes still in flight: unavailable, but counted zero in the
    /// refcount blocks until `materialize`, so a commit taken meanwhile (and a crash after
    /// it) sees them free instead of leaked.
    private var reserved = BlockNumberSet()
    private var groupReserved: [UInt32] = []
    /// Groups a full search found without `streamRunLength` allocatable blocks in a row,
    /// skipped by later searches until one of their blocks becomes allocatable again.
    /// Without it, groups left with scattered holes were searched block by block on every
    /// allocation whose hint was taken: a clone's random first writes on a 4 KiB-block
    /// pool probed over a thousand blocks per allocation, under the pool lock. Only a
    /// placement hint: a group wrongly marked is merely not chosen for a new run.
    private var groupWithoutRun: [Bool] = []
    private var dirtyGroups: Set<Int> = []
    private var pendingFree = BlockNumberSet()
    private var allocatedThisTransaction = BlockNumberSet()
    @exclusivity(unchecked) private var decremented = BlockNumberSet()
    private var cursor: UInt64 = 0

    /// Data blocks at or above this were never written since creation (or since the
    /// last open punched them), so they read as zeros without being written.
    public private(set) var highWater: UInt64

    /// A block that holds zeros and that mappings may share for every block that must read
    /// as zeros without being unmapped (an unmapped block of an origin-backed image reads
    /// the origin). In memory only: forgotten when its last reference goes, so it is never
    /// handed out again while still named here, and writers never write it in place
    /// (`adoptSharedZero`). A pool that reopens adopts a new one; the old one is an
    /// ordinary shared block to its mappings.
    @exclusivity(unchecked) public private(set) var sharedZeroBlock: UInt64?

    /// Makes `block` (mapped, holding zeros, written by nobody else) the shared zero block.
    public func adoptSharedZero(_ block: UInt64) {
        guard block < dataBlocks else { return }
        sharedZeroBlock = block
    }

    /// Stops sharing the current zero block (it is near the most references a block holds).
    public func forgetSharedZero() { sharedZeroBlock = nil }

    private var index: BTree { BTree(store: store, type: .spaceMapIndexNode, values: .packedRefcountBlocks) }

    /// Loads the index (not the refcount blocks). Cost: O(groups / 254) block reads.
    public init(store: MetadataStore, indexRoot: UInt64, dataBlocks: UInt64, highWater: UInt64) throws(MetadataError) {
        self.store = store
        self.indexRoot = indexRoot
        self.dataBlocks = 0
        self.highWater = highWater
        resize(to: dataBlocks)
        let groups = groupBlock.count
        try index.scanReferences(indexRoot, readLeaves: true) { (packed: UInt64) throws(MetadataError) in
            _ = try store.scanReference(RefcountLayout.unpackIndexValue(packed).block, type: .refcounts)
        }
        try index.forEach(indexRoot, in: 0..<UInt64.max) { (group: UInt64, packed: UInt64) throws(MetadataError) -> Bool in
            let (block, free) = RefcountLayout.unpackIndexValue(packed)
            guard group < groups, free <= Int(Self.entriesInGroup(Int(group), dataBlocks: dataBlocks)) else {
                throw .corruptBlock(block, .spaceMapIndexNode, "index entry for group \(group) (free \(free)) is out of range")
            }
            self.groupBlock[Int(group)] = block
            self.adjustFree(Int(group), free - Int(self.groupFree[Int(group)]))
            return true
        }
    }

    static func entriesInGroup(_ group: Int, dataBlocks: UInt64) -> UInt64 {
        let start = UInt64(group) * UInt64(entriesPerGroup)
        return min(UInt64(entriesPerGroup), dataBlocks - start)
    }

    /// Extends the map to `newCount` data blocks (pool growth). Cost: O(new groups).
    public func resize(to newCount: UInt64) {
        precondition(newCount >= dataBlocks)
        let oldGroups = groupBlock.count
        let groups = Int((newCount + UInt64(Self.entriesPerGroup) - 1) / UInt64(Self.entriesPerGroup))
        if oldGroups > 0 {
            // The last group gains the entries that now fall inside the pool.
            let last = oldGroups - 1
            let gained = Self.entriesInGroup(last, dataBlocks: newCount) - Self.entriesInGroup(last, dataBlocks: dataBlocks)
            adjustFree(last, Int(gained))
            if gained > 0 { dirtyGroups.insert(last) }
        }
        for g in oldGroups..<groups {
            groupBlock.append(0)
            groupFree.append(0)
            groupWithoutRun.append(false)
            adjustFree(g, Int(Self.entriesInGroup(g, dataBlocks: newCount)))
            groupPending.append(0)
            groupReserved.append(0)
        }
        dataBlocks = newCount
    }

    @inline(__always)
    private func adjustFree(_ g: Int, _ delta: Int) {
        if delta > 0 { groupWithoutRun[g] = false }
        groupFree[g] = UInt32(Int(groupFree[g]) + delta)
        zeroCountTotal = UInt64(Int(zeroCountTotal) + delta)
    }

    // MARK: Queries

    public var freeBlocks: UInt64 {
        zeroCountTotal - UInt64(pendingFree.count) - UInt64(reserved.count)
    }

    public var usedBlocks: UInt64 { dataBlocks - freeBlocks - UInt64(pendingFree.count) }


    /// The reference count of data block `block`. Cost: one cached block read. With
    /// `cachedOnly`, a refcount block that is not cached throws `.notCached`.
    public func refcount(_ block: UInt64, cachedOnly: Bool = false) throws(MetadataError) -> UInt32 {
        let g = Int(block / UInt64(Self.entriesPerGroup))
        guard block < dataBlocks else { throw .refcountInvariant("data block \(block) is beyond the pool's \(dataBlocks)") }
        let location = groupBlock[g]
        if location == 0 { return 0 }
        let rcb = try readGroup(g, location, cachedOnly: cachedOnly)
        return RefcountLayout.count(rcb.bytes, Int(block % UInt64(Self.entriesPerGroup)))
    }

    /// Whether `block` is the shared zero block. (A method rather than the property
    /// read from another module: that read came with a run-time exclusivity check.)
    @inline(__always)
    public func isSharedZero(_ block: UInt64) -> Bool { block == sharedZeroBlock }

    /// True when the last commit may still share `block` although its count is now 1.
    public func sharingDroppedThisTransaction(_ block: UInt64) -> Bool { decremented.contains(block) }

    private func readGroup(_ g: Int, _ location: UInt64, cachedOnly: Bool = false) throws(MetadataError) -> MetadataBlock {
        let rcb = try store.read(location, .refcounts, cachedOnly: cachedOnly)
        guard Int(rcb.bytes.le32(12)) == g else {
            throw .corruptBlock(location, .refcounts, "belongs to group \(rcb.bytes.le32(12)), indexed as group \(g)")
        }
        return rcb
    }

    private func writableGroup(_ g: Int) throws(MetadataError) -> MetadataBlock {
        dirtyGroups.insert(g)
        if groupBlock[g] == 0 {
            let rcb = try store.allocate(.refcounts)
            rcb.bytes.setLE32(12, UInt32(g))
            groupBlock[g] = rcb.number
            return rcb
        }
        _ = try readGroup(g, groupBlock[g])
        let rcb = try store.shadow(groupBlock[g], .refcounts).block
        groupBlock[g] = rcb.number
        return rcb
    }

    // MARK: Reference counting

    public func incRef(_ block: UInt64) throws(MetadataError) {
        guard block < dataBlocks else { throw .refcountInvariant("reference to data block \(block) beyond the pool") }
        let g = Int(block / UInt64(Self.entriesPerGroup))
        let i = Int(block % UInt64(Self.entriesPerGroup))
        let rcb = try writableGroup(g)
        let count = RefcountLayout.count(rcb.bytes, i)
        guard count > 0, count < UInt32.max else {
            throw .refcountInvariant("data block \(block) gained a reference with count \(count)")
        }
        RefcountLayout.setCount(rcb.bytes, i, count + 1)
    }

    public func decRef(_ block: UInt64) throws(MetadataError) {
        guard block < dataBlocks else { throw .refcountInvariant("release of data block \(block) beyond the pool") }
        let g = Int(block / UInt64(Self.entriesPerGroup))
        let i = Int(block % UInt64(Self.entriesPerGroup))
        let rcb = try writableGroup(g)
        let count = RefcountLayout.count(rcb.bytes, i)
        guard count > 0 else { throw .refcountInvariant("data block \(block) released with count 0") }
        RefcountLayout.setCount(rcb.bytes, i, count - 1)
        if count > 1 {
            decremented.insert(block)
            return
        }
        if block == sharedZeroBlock { sharedZeroBlock = nil }
        adjustFree(g, 1)
        if !allocatedThisTransaction.remove(block) {
            pendingFree.insert(block)
            groupPending[g] += 1
        }
    }

    // MARK: Allocation

    @inline(__always)
    private func allocatable(_ block: UInt64, in rcb: MetadataBlock?) -> Bool {
        if let rcb, RefcountLayout.count(rcb.bytes, Int(block % UInt64(Self.entriesPerGroup))) != 0 { return false }
        return !pendingFree.contains(block) && !reserved.contains(block)
    }

    /// Hands out `count` blocks, each with one reference, as contiguous runs, starting at
    /// `hint` when it is free. Throws `noDataSpace` without allocating anything when the
    /// pool has fewer free blocks. Cost: O(count) plus the groups skipped.
    ///
    /// With `reserveOnly`, the blocks are only set aside: their counts stay zero on disk
    /// until `materialize` gives each its reference (or `unreserve` returns it).
    public func allocate(_ count: UInt64, near hint: UInt64?, reserveOnly: Bool = false) throws(MetadataError) -> [Range<UInt64>] {
        let available = freeBlocks
        guard count <= available else { throw .noDataSpace(needed: count, available: available) }
        var runs: [Range<UInt64>] = []
        var remaining = count
        var position = (hint.map { $0 < dataBlocks ? $0 : 0 }) ?? cursor
        // A hint says a sequential stream continues. When another stream took the hinted
        // block, move to a free run long enough to continue in, instead of interleaving
        // block by block with the other stream.
        // The search starts a run's length past the hint, leaving the stream that took the
        // hinted block room to keep growing contiguously too.
        if let hint, hint < dataBlocks, try !isAllocatable(hint),
            let run = try findFreeRun(from: (hint + Self.streamRunLength) % dataBlocks, length: Self.streamRunLength)
        {
            position = run
        }
        while remaining > 0 {
            guard let start = try findAllocatable(from: position) else {
                throw .refcountInvariant("free count says \(available) blocks free but none was found")
            }
            var end = start
            while end - start < remaining, end < dataBlocks {
                let g = Int(end / UInt64(Self.entriesPerGroup))
                let location = groupBlock[g]
                let rcb = location == 0 ? nil : try readGroup(g, location)
                guard allocatable(end, in: rcb) else { break }
                if reserveOnly {
                    reserved.insert(end)
                    groupReserved[g] += 1
                } else {
                    let writable = try writableGroup(g)
                    RefcountLayout.setCount(writable.bytes, Int(end % UInt64(Self.entriesPerGroup)), 1)
                    adjustFree(g, -1)
                    allocatedThisTransaction.insert(end)
                }
                end += 1
            }
            runs.append(start..<end)
            remaining -= end - start
            position = end < dataBlocks ? end : 0
            highWater = max(highWater, end)
        }
        cursor = position
        return runs
    }

    /// Gives a reserved block its first reference (the write that reserved it maps it now).
    public func materialize(_ block: UInt64) throws(MetadataError) {
        guard reserved.remove(block) else {
            throw .refcountInvariant("data block \(block) was not reserved")
        }
        let g = Int(block / UInt64(Self.entriesPerGroup))
        groupReserved[g] -= 1
        let writable = try writableGroup(g)
        RefcountLayout.setCount(writable.bytes, Int(block % UInt64(Self.entriesPerGroup)), 1)
        adjustFree(g, -1)
        allocatedThisTransaction.insert(block)
    }

    /// Returns a reserved block unused (its write failed).
    public func unreserve(_ block: UInt64) {
        guard reserved.remove(block) else { return }
        let g = Int(block / UInt64(Self.entriesPerGroup))
        groupReserved[g] -= 1
        groupWithoutRun[g] = false
    }

    /// How many free blocks in a row a stream that lost its hinted block looks for.
    static let streamRunLength: UInt64 = 32

    private func isAllocatable(_ block: UInt64) throws(MetadataError) -> Bool {
        let g = Int(block / UInt64(Self.entriesPerGroup))
        let location = groupBlock[g]
        return allocatable(block, in: location == 0 ? nil : try readGroup(g, location))
    }

    /// The start of the first run of `length` allocatable blocks (within one group) at or
    /// after `position`, searching every group at most once; nil when there is none.
    ///
    /// Each candidate window is checked from its last block back: a taken block there
    /// moves the window past it, so a stretch of taken blocks costs about one check per
    /// `length` blocks, not one per block. A clone's random first writes call this once
    /// per allocation (their hint, the block after the neighbour's, is taken), so this
    /// is on the copy-on-write path.
    private func findFreeRun(from position: UInt64, length: UInt64) throws(MetadataError) -> UInt64? {
        let groups = groupBlock.count
        let e = UInt64(Self.entriesPerGroup)
        var g = Int(position / e)
        var first = position % e
        for _ in 0...groups {
            if !groupWithoutRun[g], UInt64(groupFree[g]) >= UInt64(groupPending[g] + groupReserved[g]) + length {
                let location = groupBlock[g]
                let rcb = location == 0 ? nil : try readGroup(g, location)
                let limit = Self.entriesInGroup(g, dataBlocks: dataBlocks)
                let base = UInt64(g) * e
                var runStart = first
                while runStart + length <= limit {
                    // The window is runStart..<runStart+length; find its last taken block.
                    var probe = runStart + length
                    while probe > runStart, allocatable(base + probe - 1, in: rcb) { probe -= 1 }
                    if probe == runStart { return base + runStart }
                    runStart = probe
                }
                if first == 0 && length == Self.streamRunLength { groupWithoutRun[g] = true }
            }
            g = g + 1 == groups ? 0 : g + 1
            first = 0
        }
        return nil
    }

    /// The first allocatable block at or after `position`, wrapping around once.
    private func findAllocatable(from position: UInt64) throws(MetadataError) -> UInt64? {
        let groups = groupBlock.count
        let e = UInt64(Self.entriesPerGroup)
        var g = Int(position / e)
        var first = position % e
        for _ in 0...groups {
            if groupFree[g] > groupPending[g] + groupReserved[g] {
                let location = groupBlock[g]
                let rcb = location == 0 ? nil : try readGroup(g, location)
                let limit = Self.entriesInGroup(g, dataBlocks: dataBlocks)
                var i = first
                while i < limit {
                    let block = UInt64(g) * e + i
                    if allocatable(block, in: rcb) { return block }
                    i += 1
                }
            }
            g = g + 1 == groups ? 0 : g + 1
            first = 0
        }
        return nil
    }

    // MARK: Commit

    /// Writes changed groups' locations and free counts into the index. Call before the
    /// metadata commit. Cost: O(changed groups × log groups).
    public func flushIndex() throws(MetadataError) {
        for g in dirtyGroups.sorted() where groupBlock[g] != 0 {
            let packed = RefcountLayout.packIndexValue(block: groupBlock[g], free: Int(groupFree[g]))
            let (root, _) = try index.insert(indexRoot, UInt64(g), packed)
            indexRoot = root
        }
        dirtyGroups.removeAll(keepingCapacity: true)
    }

    /// After a successful commit: freed blocks become allocatable.
    public func transactionCommitted() {
        precondition(dirtyGroups.isEmpty)
        pendingFree.removeAll()
        for g in groupPending.indices where groupPending[g] != 0 {
            groupPending[g] = 0
            groupWithoutRun[g] = false
        }
        allocatedThisTransaction.removeAll()
        decremented.removeAll()
    }

    /// Blocks freed in the current transaction (for discarding their storage after commit).
    public var blocksPendingFree: BlockNumberSet { pendingFree }

    /// Group locations and free counts as the index would store them (for `check`).
    public func groupSummary() -> [(block: UInt64, free: UInt32)] {
        (0..<groupBlock.count).map { (groupBlock[$0], groupFree[$0]) }
    }

    /// Overwrites one count (for `check --repair`). The caller commits.
    public func repairCount(_ block: UInt64, to value: UInt32) throws(MetadataError) {
        let g = Int(block / UInt64(Self.entriesPerGroup))
        let i = Int(block % UInt64(Self.entriesPerGroup))
        let rcb = try writableGroup(g)
        let old = RefcountLayout.count(rcb.bytes, i)
        RefcountLayout.setCount(rcb.bytes, i, value)
        if old == 0 && value != 0 { adjustFree(g, -1) }
        if old != 0 && value == 0 { adjustFree(g, 1) }
    }

    /// Recomputes one group's free count from its refcount block (for `check --repair`).
    public func recountGroup(_ g: Int) throws(MetadataError) {
        guard groupBlock[g] != 0 else { return }
        let rcb = try readGroup(g, groupBlock[g])
        var free: UInt32 = 0
        for i in 0..<Int(Self.entriesInGroup(g, dataBlocks: dataBlocks)) where RefcountLayout.count(rcb.bytes, i) == 0 {
            free += 1
        }
        if free != groupFree[g] {
            adjustFree(g, Int(free) - Int(groupFree[g]))
            dirtyGroups.insert(g)
        }
    }

    /// Raw counts of a group as stored (for `check`): nil when the group has no block.
    public func storedCounts(group g: Int) throws(MetadataError) -> [UInt32]? {
        guard groupBlock[g] != 0 else { return nil }
        let rcb = try readGroup(g, groupBlock[g])
        return (0..<Self.entriesPerGroup).map { RefcountLayout.count(rcb.bytes, $0) }
    }

    public var groupCount: Int { groupBlock.count }

    /// Forgets that blocks at or above the high-water mark may hold data (after the open
    /// path punched them, or to disable the optimisation with `dataBlocks`).
    public func setHighWater(_ value: UInt64) { highWater = value }
}
