import Testing
import ThinFormat
import ThinMetadata
import ThinSystem

/// A fresh metadata store and data space map on a memory device.
func makeStore(metadataBlocks: UInt64 = 4096, dataBlocks: UInt64 = 10_000) throws -> (MetadataStore, DataSpaceMap) {
    let device = MemoryDevice(size: (2 + metadataBlocks) * 4096)
    let store = MetadataStore(device: device, regionStart: 2, regionBlocks: metadataBlocks, committedGeneration: 1)
    let spaceMap = try DataSpaceMap(store: store, indexRoot: 0, dataBlocks: dataBlocks, highWater: 0)
    store.finishScan()
    return (store, spaceMap)
}

func contents(_ tree: BTree, _ root: UInt64) throws -> [UInt64: UInt64] {
    var result: [UInt64: UInt64] = [:]
    try tree.forEach(root, in: 0..<UInt64.max) { k, v in
        result[k] = v
        return true
    }
    return result
}

@Suite struct BTreeTests {
    @Test func randomInsertRemoveMatchesDictionary() throws {
        let (store, _) = try makeStore()
        let tree = BTree(store: store, type: .volumeTableNode, values: .metadataBlocks(.volumeRecord))
        var root: UInt64 = 0
        var model: [UInt64: UInt64] = [:]
        var rng = SplitMix64(seed: 9)
        // Values must be real metadata references for release to work; use plain leaf
        // values by never releasing the tree here. They lie inside the region (2..<4098):
        // a tree checks every value it hands out.
        for step in 0..<20_000 {
            let key = rng.next() % 5000
            if rng.next() % 3 == 0 {
                let (newRoot, removed) = try tree.remove(root, key)
                root = newRoot
                #expect(removed == model.removeValue(forKey: key))
            } else {
                let value = 2 + rng.next() % 4096
                let (newRoot, replaced) = try tree.insert(root, key, value)
                root = newRoot
                #expect(replaced == model.updateValue(value, forKey: key))
            }
            if step % 2000 == 0 { #expect(try contents(tree, root) == model) }
        }
        #expect(try contents(tree, root) == model)
        for (key, value) in model { #expect(try tree.lookup(root, key) == value) }
        #expect(try tree.lookup(root, 999_999) == nil)
        #expect(try tree.count(root, in: 1000..<2000) == UInt64(model.keys.filter { (1000..<2000).contains($0) }.count))
    }

    @Test func sequentialInsertsFillLeavesNearlyFull() throws {
        let (store, _) = try makeStore()
        let tree = BTree(store: store, type: .volumeTableNode, values: .metadataBlocks(.volumeRecord))
        var root: UInt64 = 0
        let before = store.usedBlocks
        for key in 0..<UInt64(25_400) { root = try tree.insert(root, key, key).root }
        // 25,400 entries at 254 per leaf is 100 leaves; appending splits keep them full.
        #expect(store.usedBlocks - before <= 105)
    }

    @Test func sharedTreeDivergesWithoutAffectingTheOther() throws {
        let (store, spaceMap) = try makeStore()
        let tree = BTree(store: store, type: .mappingNode, values: .dataBlocks(spaceMap))
        var origin: UInt64 = 0
        let blocks = try spaceMap.allocate(3000, near: nil).flatMap { Array($0) }
        let fresh = try spaceMap.allocate(100, near: nil).flatMap { Array($0) }
        let baseline = store.usedBlocks
        for (i, block) in blocks.enumerated() { origin = try tree.insert(origin, UInt64(i), block).root }
        let usedBefore = store.usedBlocks
        let snapshot = origin
        try tree.retain(snapshot)
        #expect(store.usedBlocks == usedBefore)

        let original = try contents(tree, snapshot)
        // Diverge the origin: replace some entries (releasing the old blocks) and remove others.
        for i in 0..<100 {
            let (root, replaced) = try tree.insert(origin, UInt64(i * 7), fresh[i])
            origin = root
            try spaceMap.decRef(replaced!)
        }
        origin = try tree.removeAll(origin, in: 2000..<2500) { (_: UInt64, value: UInt64) throws(MetadataError) in try spaceMap.decRef(value) }
        #expect(try contents(tree, snapshot) == original)
        #expect(try tree.lookup(origin, 7) == fresh[1])
        #expect(try tree.lookup(origin, 2100) == nil)
        #expect(try spaceMap.refcount(blocks[7]) == 1)
        #expect(try spaceMap.refcount(blocks[8]) == 2)

        // Dropping both trees frees every node and every data block.
        try tree.release(origin)
        try tree.release(snapshot)
        #expect(store.usedBlocks == baseline)
        for block in blocks + fresh { #expect(try spaceMap.refcount(block) == 0) }
    }

}

@Suite struct DataSpaceMapTests {
    @Test func allocationIsContiguousFromHint() throws {
        let (_, spaceMap) = try makeStore()
        let runs = try spaceMap.allocate(50, near: 500)
        #expect(runs == [500..<550])
        let next = try spaceMap.allocate(10, near: 550)
        #expect(next == [550..<560])
        // The hinted block is taken (another stream): the allocation moves a run's length
        // (32 blocks) past the hint, leaving room for the stream that owns 540.
        let skipping = try spaceMap.allocate(10, near: 540)
        #expect(skipping == [572..<582])
        // Without a hint, allocation is first-fit from the cursor.
        #expect(try spaceMap.allocate(3, near: nil) == [582..<585])
    }

    /// The run search skips taken blocks a window at a time; it must still find the first
    /// run, as a block-by-block scan would, on any pattern of holes.
    @Test func movedAllocationTakesTheFirstLongEnoughRun() throws {
        let e = UInt64(DataSpaceMap.entriesPerGroup)
        var seed: UInt64 = 0x9E37_79B9_7F4A_7C15
        for round in 0..<20 {
            let (_, spaceMap) = try makeStore(dataBlocks: 4 * e)
            _ = try spaceMap.allocate(e, near: 0)
            // Holes freed in the same transaction are allocatable at once: runs of random
            // lengths, most shorter than the 32 a moved allocation needs.
            var free = Set<UInt64>()
            var block: UInt64 = 40
            while block < e {
                seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                let gap = 1 + (seed >> 33) % 40
                let hole = (seed >> 13) % (round % 2 == 0 ? 34 : 20)
                block = min(block + gap, e)
                for b in block..<min(block + hole, e) {
                    try spaceMap.decRef(b)
                    free.insert(b)
                }
                block += hole
            }
            let hint: UInt64 = 3
            let expected = (hint + 32..<e - 31).first { s in (s..<s + 32).allSatisfy(free.contains) } ?? e
            #expect(try spaceMap.allocate(1, near: hint) == [expected..<expected + 1], "round \(round)")
        }
    }

    enum RunComesBack: CaseIterable { case freedInTheSameTransaction, freedAndCommitted, unreserved }

    /// A group searched without finding a run is skipped by later searches; each way a run
    /// can open up in it again must make it found again.
    @Test(arguments: RunComesBack.allCases)
    func aGroupWithoutARunIsSearchedAgainOnceBlocksComeBack(_ way: RunComesBack) throws {
        let e = UInt64(DataSpaceMap.entriesPerGroup)
        let (store, spaceMap) = try makeStore(dataBlocks: 4 * e)
        var superblock = Superblock(generation: 1, dataBlockSize: 4096, uuid: [], metadataStart: 2, metadataBlocks: 4096, dataOffset: 1 << 24, dataBlocks: 4 * e, createdAt: 0)
        func commit() throws {
            try spaceMap.flushIndex()
            try store.commit(&superblock)
            spaceMap.transactionCommitted()
        }
        // Groups 0 and 1 taken; then group 1 gets a free block every 20: many free blocks
        // in it, no run of 32.
        _ = try spaceMap.allocate(2 * e, near: 0)
        if way != .freedInTheSameTransaction { try commit() }
        let holes = Set(stride(from: e + 40, to: 2 * e, by: 20))
        for block in holes { try spaceMap.decRef(block) }
        if way != .freedInTheSameTransaction { try commit() }
        let run = e + 100..<e + 133
        let hint: UInt64 = 3
        // The hinted block is taken: the search passes group 0 (full) and group 1 (no run).
        #expect(try spaceMap.allocate(1, near: hint) == [2 * e..<2 * e + 1])

        switch way {
        case .freedInTheSameTransaction:
            for block in run where !holes.contains(block) { try spaceMap.decRef(block) }
        case .freedAndCommitted:
            for block in run where !holes.contains(block) { try spaceMap.decRef(block) }
            #expect(try spaceMap.allocate(1, near: hint) == [2 * e + 1..<2 * e + 2], "freed blocks wait for the commit")
            try commit()
        case .unreserved:
            for block in run where !holes.contains(block) { try spaceMap.decRef(block) }
            try commit()
            #expect(try spaceMap.allocate(UInt64(run.count), near: run.lowerBound, reserveOnly: true) == [run])
            #expect(try spaceMap.allocate(1, near: hint) == [2 * e + 1..<2 * e + 2], "the run is reserved")
            for block in run { spaceMap.unreserve(block) }
        }
        #expect(try spaceMap.allocate(1, near: hint) == [run.lowerBound..<run.lowerBound + 1])
    }

    @Test func fullPoolRefusesWithoutAllocating() throws {
        let (_, spaceMap) = try makeStore(dataBlocks: 100)
        _ = try spaceMap.allocate(90, near: nil)
        #expect(throws: MetadataError.noDataSpace(needed: 11, available: 10)) { try spaceMap.allocate(11, near: nil) }
        #expect(spaceMap.freeBlocks == 10)
        #expect(try spaceMap.allocate(10, near: nil).reduce(0) { $0 + $1.count } == 10)
        #expect(spaceMap.freeBlocks == 0)
    }

    @Test func blocksFreedAreNotReusedBeforeCommit() throws {
        let (store, spaceMap) = try makeStore(dataBlocks: 2000)
        let first = try spaceMap.allocate(20, near: 0).flatMap { Array($0) }
        // Commit so the blocks belong to the last committed state.
        try spaceMap.flushIndex()
        var sb = Superblock(generation: 1, dataBlockSize: 4096, uuid: [], metadataStart: 2, metadataBlocks: 4096, dataOffset: 1 << 24, dataBlocks: 2000, createdAt: 0)
        try store.commit(&sb)
        spaceMap.transactionCommitted()
        for block in first { try spaceMap.decRef(block) }
        let again = try spaceMap.allocate(20, near: 0).flatMap { Array($0) }
        #expect(Set(again).isDisjoint(with: first))
        // A block allocated and freed inside one transaction is reusable at once.
        let temp = try spaceMap.allocate(1, near: 1500)[0].lowerBound
        try spaceMap.decRef(temp)
        #expect(try spaceMap.allocate(1, near: 1500)[0].lowerBound == temp)
    }

    @Test func sharingDropIsRemembered() throws {
        let (_, spaceMap) = try makeStore()
        let block = try spaceMap.allocate(1, near: nil)[0].lowerBound
        try spaceMap.incRef(block)
        try spaceMap.decRef(block)
        #expect(spaceMap.sharingDroppedThisTransaction(block))
        #expect(throws: MetadataError.self) { try spaceMap.decRef(block + 1) }
    }
}
