import TestSupport
import Testing
import ThinSystem

@testable import ThinPool

/// `Pool.differences`: the extents where two images of a lineage differ, found by
/// walking only the subtrees a change copied.
@Suite struct DifferencesTests {
    /// Random writes, trims and zeroes with snapshots in between; for every pair of
    /// images, the reported blocks are exactly those mapped differently, and they cover
    /// every block whose bytes differ.
    @Test(arguments: [UInt64(11), 12, 13])
    func reportsExactlyTheBlocksMappedDifferently(seed: UInt64) throws {
        let (pool, _) = try makeMemoryPool(dataSize: 16 << 20, blockSize: 4096, metadataSize: 4 << 20)
        let size: UInt64 = 2 << 20
        let blocks = size / 4096
        try pool.createVolume("v", size: size)
        let id = try pool.volumeID("v")
        var rng = SplitMix64(seed: seed)
        var images = ["v"]
        for round in 0..<6 {
            for _ in 0..<40 {
                let offset = rng.next() % size
                let length = min(size - offset, 1 + rng.next() % 20000)
                switch rng.next() % 6 {
                case 0: try pool.trim(id, at: offset, count: length)
                case 1: try pool.writeZeroes(id, at: offset, count: length, mayUnmap: rng.next() % 2 == 0)
                default:
                    let bytes = (0..<Int(length)).map { _ in UInt8(truncatingIfNeeded: rng.next() % 3) }
                    try bytes.withUnsafeBytes { try pool.write(id, at: offset, from: $0) }
                }
            }
            try pool.snapshot("v@s\(round)")
            images.append("v@s\(round)")
        }
        func contents(_ name: String) throws -> [UInt8] { try pool.read(name, at: 0, count: Int(size)) }
        for from in images {
            for to in images {
                let found = try pool.differences(from: from, to: to)
                #expect(found.related)
                let reported = Set(found.extents.flatMap { stride(from: $0.lowerBound / 4096, to: $0.upperBound / 4096, by: 1) })
                let mapsFrom = try pool.physicalBlocks(pool.volumeID(from), blocks: 0..<blocks)
                let mapsTo = try pool.physicalBlocks(pool.volumeID(to), blocks: 0..<blocks)
                let mappedDifferently = Set((0..<blocks).filter { mapsFrom[$0] != mapsTo[$0] })
                #expect(reported == mappedDifferently, "\(from) -> \(to)")
                let (a, b) = (try contents(from), try contents(to))
                for block in 0..<Int(blocks) where a[block * 4096..<(block + 1) * 4096] != b[block * 4096..<(block + 1) * 4096] {
                    #expect(reported.contains(UInt64(block)), "\(from) -> \(to): block \(block) differs but is not reported")
                }
                // Extents are sorted, merged and block-aligned.
                for (x, y) in zip(found.extents, found.extents.dropFirst()) { #expect(x.upperBound < y.lowerBound) }
                if from == to { #expect(found.extents.isEmpty) }
            }
        }
    }

    /// `changedExtents` (what `thinbd:changed:` answers) over arbitrary byte ranges: the
    /// runs cover the range in order, alternate, and are changed exactly where the
    /// whole-image differences are, clipped to the range. A deleted base is refused.
    @Test func changedExtentsAreTheDifferencesClippedToTheRange() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 16 << 20, blockSize: 4096, metadataSize: 4 << 20)
        let size: UInt64 = 1 << 20
        try pool.createVolume("v", size: size)
        let id = try pool.volumeID("v")
        var rng = SplitMix64(seed: 5)
        func scribble(_ count: Int) throws {
            for _ in 0..<count {
                let offset = rng.next() % size
                let length = min(size - offset, 1 + rng.next() % 30000)
                if rng.next() % 4 == 0 {
                    try pool.trim(id, at: offset, count: length)
                } else {
                    try [UInt8](repeating: 9, count: Int(length)).withUnsafeBytes { try pool.write(id, at: offset, from: $0) }
                }
            }
        }
        try scribble(30)
        try pool.snapshot("v@base")
        let baseID = try pool.volumeID("v@base")
        try scribble(12)
        let whole = try pool.differences(from: "v@base", to: "v").extents
        #expect(!whole.isEmpty)
        for _ in 0..<200 {
            let offset = rng.next() % size
            let count = 1 + rng.next() % (size - offset)
            let runs = try pool.changedExtents(id, since: baseID, at: offset, count: count)
            var position = offset
            for (run, next) in zip(runs, runs.dropFirst()) { #expect(run.isMapped != next.isMapped, "runs are merged") }
            for run in runs {
                #expect(run.offset == position && run.length > 0)
                let expected = whole.contains { $0.overlaps(run.offset..<run.offset + run.length) }
                #expect(expected == run.isMapped, "\(run) in \(offset)+\(count)")
                if run.isMapped {
                    #expect(whole.contains { $0.lowerBound <= run.offset && run.offset + run.length <= $0.upperBound })
                }
                position += run.length
            }
            #expect(position == offset + count)
        }
        try pool.delete("v@base")
        #expect(throws: PoolError.invalidArgument("the base snapshot (volume id \(baseID)) was deleted after it was chosen")) {
            try pool.changedExtents(id, since: baseID, at: 0, count: 4096)
        }
        #expect(try pool.comparableSnapshots(of: "v").isEmpty)
    }

    @Test func comparableSnapshotsAreTheWholeFamily() throws {
        let (pool, _) = try makeMemoryPool()
        for name in ["a", "b"] { try pool.createVolume(name, size: 1 << 20) }
        for name in ["a@1", "a@2", "b@1"] { _ = try pool.snapshot(name) }
        _ = try pool.clone("a@1", as: "c")
        _ = try pool.snapshot("c@x")
        let family = ["a@1", "a@2", "c@x"]
        for member in ["a", "a@1", "c", "c@x"] {
            #expect(try pool.comparableSnapshots(of: member).map(\.name) == family, "\(member)")
        }
        #expect(try pool.comparableSnapshots(of: "b").map(\.name) == ["b@1"])
    }

    @Test func unrelatedImagesDifferInEverythingEitherMaps() throws {
        let (pool, _) = try makeMemoryPool()
        try pool.createVolume("a", size: 1 << 20)
        try pool.createVolume("b", size: 1 << 20)
        try pool.write("a", at: 0, [UInt8](repeating: 1, count: 8192))
        try pool.write("b", at: 65536, [UInt8](repeating: 2, count: 4096))
        let found = try pool.differences(from: "a", to: "b")
        #expect(!found.related)
        #expect(found.extents == [0..<8192, 65536..<69632])
        #expect(try pool.differences(from: "a", to: "a").extents.isEmpty)
        #expect(throws: PoolError.self) { try pool.differences(from: "a", to: "nope") }
    }

    /// The cost follows the change: an 8 GiB volume with every block mapped, 1% of them
    /// rewritten in 20 runs after a snapshot. Counting metadata reads, not time.
    @Test func costFollowsTheChangeNotTheSize() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 10 << 30, blockSize: 65536, metadataSize: 64 << 20)
        let size: UInt64 = 8 << 30
        try pool.createVolume("v", size: size)
        let id = try pool.volumeID("v")
        // Maps every block without data I/O (new blocks above the high-water mark read as zeros).
        try pool.writeZeroes(id, at: 0, count: size, mayUnmap: false)
        try pool.snapshot("v@base")
        let blocks = size / 65536
        let changed = blocks / 100
        let runs: UInt64 = 20
        let runLength = changed / runs
        let chunk = [UInt8](repeating: 7, count: 512)
        for run in 0..<runs {
            let first = run * (blocks / runs) + 1000
            for block in first..<first + runLength {
                try chunk.withUnsafeBytes { try pool.write(id, at: block * 65536, from: $0) }
            }
        }
        try pool.snapshot("v@now")
        let before = pool.metadataReads
        let found = try pool.differences(from: "v@base", to: "v@now")
        let reads = pool.metadataReads - before
        #expect(found.changedBytes == runs * runLength * 65536)
        #expect(found.extents.count == Int(runs))
        // A leaf holds about 250 mappings: the change touches about 2 leaves per run on
        // each side, plus the interior nodes above them.
        let leaves = blocks / 250
        #expect(reads <= Int(runs) * 2 * 4 + 40, "\(reads) metadata reads for \(runs) runs")
        // Walking both trees whole would read every leaf of each: over ten times more.
        #expect(reads * 10 < 2 * Int(leaves), "\(reads) reads against \(leaves) leaves in each tree")
        // Identical images cost the two roots at most.
        let sameBefore = pool.metadataReads
        #expect(try pool.differences(from: "v@now", to: "v@now").extents.isEmpty)
        #expect(pool.metadataReads - sameBefore <= 2)
        print("differences: 8 GiB volume, \(changed) of \(blocks) blocks changed in \(runs) runs: \(reads) metadata reads (\(leaves) leaves per tree)")
    }
}
