import Foundation
import Testing
@testable import ThinPool
import ThinSystem

@Suite struct EngineContractTests {
    /// A snapshot writes the same small number of blocks however much the volume maps:
    /// it shares the mapping root instead of copying it.
    @Test func snapshotCostDoesNotGrowWithMappedSize() throws {
        func snapshotWrites(mappedBlocks: Int) throws -> Int {
            let (pool, device) = try makeMemoryPool(dataSize: 64 << 20, metadataSize: 8 << 20)
            try pool.createVolume("v", size: 64 << 20)
            let id = try pool.volumeID("v")
            for i in 0..<mappedBlocks {
                try [UInt8(1)].withUnsafeBytes { try pool.write(id, at: UInt64(i) * 4096, from: $0) }
            }
            try pool.commit()
            let before = device.writeCount
            try pool.snapshot("v@s")
            return device.writeCount - before
        }
        let small = try snapshotWrites(mappedBlocks: 1)
        let large = try snapshotWrites(mappedBlocks: 12_000)
        #expect(large == small, "snapshot wrote \(small) blocks with 1 block mapped, \(large) with 12,000")
        #expect(small <= 6)
    }

    /// Concurrent partial writes to the same blocks, while snapshots are taken: every
    /// sector ends with its owner's last write, and every snapshot holds, per sector, a
    /// version the owner really wrote.
    @Test(arguments: [false, true])
    func concurrentWritersAndSnapshotsStayConsistent(onRealFile: Bool) throws {
        let path = NSTemporaryDirectory() + "thinbd-concurrent-\(UUID().uuidString).pool"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let pool = onRealFile
            ? try Pool.create(path: path, geometry: PoolGeometry(dataSize: 32 << 20, blockSize: 16384))
            : try makeMemoryPool(dataSize: 32 << 20, blockSize: 16384).0
        let size = 256 << 10
        try pool.createVolume("v", size: UInt64(size))
        let id = try pool.volumeID("v")
        let sector = 512
        let writers = 4
        let rounds = 200
        // Sector s belongs to writer s % 4; writer w writes byte value (round % 250 + 1) with its id in the top bits.
        DispatchQueue.concurrentPerform(iterations: writers + 2) { worker in
            if worker == writers + 1 {
                // A reader: every sector it sees holds one writer's value, whole.
                var copy = [UInt8](repeating: 0, count: size)
                for _ in 0..<100 {
                    _ = try! copy.withUnsafeMutableBytes { try pool.read(id, at: 0, into: $0) }
                    for s in 0..<(size / sector) {
                        let first = copy[s * sector]
                        if first != 0 && Int(first >> 6) != s % writers {
                            Issue.record("reader saw another writer's data in sector \(s)")
                            return
                        }
                    }
                }
                return
            }
            if worker == writers {
                for i in 0..<20 {
                    try! pool.snapshot("v@s\(i)")
                    usleep(500)
                }
                return
            }
            var rng = SplitMix64(seed: UInt64(worker))
            for round in 0..<rounds {
                let sectors = (0..<(size / sector)).filter { $0 % writers == worker }
                let chosen = sectors[Int(rng.next() % UInt64(sectors.count))]
                let value = UInt8(worker << 6 | (round % 60 + 1))
                let bytes = [UInt8](repeating: value, count: sector)
                try! bytes.withUnsafeBytes { try pool.write(id, at: UInt64(chosen * sector), from: $0) }
                if round == rounds - 1 {
                    // Finish by writing every owned sector, so the final image is known.
                    let last = [UInt8](repeating: UInt8(worker << 6 | 63), count: sector)
                    for s in sectors { try! last.withUnsafeBytes { try pool.write(id, at: UInt64(s * sector), from: $0) } }
                }
            }
        }
        var image = [UInt8](repeating: 0, count: size)
        _ = try image.withUnsafeMutableBytes { try pool.read(id, at: 0, into: $0) }
        for s in 0..<(size / sector) {
            let expected = UInt8((s % writers) << 6 | 63)
            #expect(image[(s * sector)..<((s + 1) * sector)].allSatisfy { $0 == expected }, "sector \(s)")
        }
        for i in 0..<20 {
            let snap = try pool.volumeID("v@s\(i)")
            var copy = [UInt8](repeating: 0, count: size)
            _ = try copy.withUnsafeMutableBytes { try pool.read(snap, at: 0, into: $0) }
            for s in 0..<(size / sector) {
                let slice = copy[(s * sector)..<((s + 1) * sector)]
                let first = slice.first!
                #expect(slice.allSatisfy { $0 == first }, "snapshot \(i) sector \(s) is torn")
                #expect(first == 0 || Int(first >> 6) == s % writers, "snapshot \(i) sector \(s) holds another writer's data")
            }
        }
        #expect(pool.checkProblems() == nil)
        try pool.close()
    }

    /// While a commit waits for fdatasync, reads still look up mappings and complete:
    /// the commit admits readers during its I/O.
    @Test func readsCompleteWhileACommitWaitsForItsBarrier() throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        let id = try pool.volumeID("v")
        try pattern(65536, seed: 5).withUnsafeBytes { try pool.write(id, at: 0, from: $0) }
        device.holdBarriers()
        let commitDone = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            try? pool.commit()
            commitDone.signal()
        }
        #expect(device.barrierWaiting.wait(timeout: .now() + 10) == .success, "the commit never reached its barrier")
        let readDone = DispatchSemaphore(value: 0)
        let result = ResultBox()
        DispatchQueue.global().async {
            var bytes = [UInt8](repeating: 0, count: 65536)
            let ok = (try? bytes.withUnsafeMutableBytes { try pool.read(id, at: 0, into: $0) }) != nil
            result.set(ok && bytes == pattern(65536, seed: 5))
            readDone.signal()
        }
        let readFinished = readDone.wait(timeout: .now() + 10) == .success
        device.releaseBarriers()
        #expect(readFinished, "a read waited for the commit's barrier")
        #expect(result.get())
        #expect(commitDone.wait(timeout: .now() + 10) == .success)
        if !readFinished { _ = readDone.wait(timeout: .now() + 10) }
        #expect(pool.checkProblems() == nil)
    }

    /// A commit taken while a write's data is still on its way to new blocks records those
    /// blocks as free: a crash right after it leaks nothing and `check` stays clean.
    @Test func commitDuringAWriteInFlightLeaksNothingAfterACrash() throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        let id = try pool.volumeID("v")
        try pool.commit()
        device.holdWrites(in: pool.dataRegionOffset..<UInt64.max)
        let writeDone = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            try? pattern(65536, seed: 9).withUnsafeBytes { try pool.write(id, at: 0, from: $0) }
            writeDone.signal()
        }
        #expect(device.writeWaiting.wait(timeout: .now() + 10) == .success, "the write never reached the device")
        try pool.commit()
        let crashed = try Pool.open(device: device.imageAfterCrash(seed: 3, keepVolatile: 1.0))
        #expect(crashed.checkProblems() == nil)
        #expect(try crashed.read("v", at: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
        device.releaseWrites()
        #expect(writeDone.wait(timeout: .now() + 10) == .success)
        try pool.commit()
        #expect(try pool.read("v", at: 0, count: 65536) == pattern(65536, seed: 9))
        #expect(pool.checkProblems() == nil)
    }

    /// Two sequential writers to different regions of one volume, block by block in turn,
    /// still get mostly contiguous physical runs (not one block each, interleaved).
    @Test func interleavedSequentialWritersGetLongRuns() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 16 << 20)
        try pool.createVolume("v", size: 8 << 20)
        let id = try pool.volumeID("v")
        let one = [UInt8](repeating: 1, count: 4096)
        for i in 0..<256 {
            for region in [0, 1024] {
                try one.withUnsafeBytes { try pool.write(id, at: UInt64(region + i) * 4096, from: $0) }
            }
        }
        for region in [UInt64(0), 1024] {
            let physical = try pool.physicalBlocks(id, blocks: region..<(region + 256))
            let breaks = (region..<(region + 255)).filter { physical[$0 + 1] != physical[$0]! + 1 }.count
            #expect(breaks <= 16, "region at block \(region) is split into \(breaks + 1) physical runs")
        }
        #expect(pool.checkProblems() == nil)
    }

    /// An I/O error fails the one request, changes nothing, and the pool keeps working.
    @Test func injectedIOErrorsChangeNothing() throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        let original = pattern(64 << 10, seed: 1)
        try pool.write("v", at: 0, original)
        try pool.snapshot("v@s")
        let usedBefore = pool.info().dataUsedBytes
        device.failWrites(1)
        #expect(throws: PoolError.self) { try pool.write("v", at: 100, pattern(10_000, seed: 2)) }
        #expect(try pool.read("v", at: 0, count: 64 << 10) == original)
        #expect(pool.info().dataUsedBytes == usedBefore)
        device.failReads(1)
        #expect(throws: PoolError.self) { try pool.write("v", at: 100, pattern(100, seed: 3)) }
        #expect(try pool.read("v", at: 0, count: 64 << 10) == original)
        #expect(pool.checkProblems() == nil)
        try pool.write("v", at: 100, pattern(100, seed: 3))
        #expect(try pool.read("v", at: 100, count: 100) == pattern(100, seed: 3))
        #expect(try pool.read("v@s", at: 0, count: 64 << 10) == original)
        try pool.commit()
        #expect(pool.checkProblems() == nil)
    }

    @Test func fullPoolWorksAgainAfterGrow() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 256 << 10)
        try pool.createVolume("v", size: 4 << 20)
        let id = try pool.volumeID("v")
        #expect(throws: PoolError.noDataSpace("pool is out of data space (need 128 blocks, 64 free)")) {
            try pattern(512 << 10, seed: 1).withUnsafeBytes { try pool.write(id, at: 0, from: $0) }
        }
        #expect(pool.info().dataUsedBytes == 0)
        try pool.grow(to: 1 << 20)
        try pool.write("v", at: 0, pattern(512 << 10, seed: 1))
        #expect(try pool.read("v", at: 0, count: 512 << 10) == pattern(512 << 10, seed: 1))
        #expect(pool.info().dataTotalBytes == 1 << 20)
        #expect(pool.checkProblems() == nil)
    }

    @Test func outOfRangeAndReadOnlyRequestsAreRefused() throws {
        let (pool, _) = try makeMemoryPool()
        try pool.createVolume("v", size: 10_000)
        let id = try pool.volumeID("v")
        var buffer = [UInt8](repeating: 0, count: 100)
        #expect(throws: PoolError.self) { try buffer.withUnsafeMutableBytes { try pool.read(id, at: 9_950, into: $0) } }
        #expect(throws: PoolError.self) { try buffer.withUnsafeMutableBytes { try pool.read(id, at: UInt64.max - 10, into: $0) } }
        #expect(throws: PoolError.self) { try pool.trim(id, at: 0, count: 10_001) }
        #expect(throws: PoolError.self) { try pool.extents(id, at: 10_000, count: 1) }
        try pool.snapshot("v@s")
        let snap = try pool.volumeID("v@s")
        #expect(throws: PoolError.readOnly("snapshot v@s")) { try pool.writeZeroes(snap, at: 0, count: 10) }
        #expect(throws: PoolError.self) { try pool.resize("v@s", to: 1 << 20) }
        #expect(throws: PoolError.self) { try pool.snapshot("v@s") }
        #expect(throws: PoolError.self) { try pool.snapshot("v@s@x") }
        #expect(throws: PoolError.self) { try pool.clone("v", as: "bad name") }
        #expect(throws: PoolError.self) { try pool.rollback("v@nope") }
        #expect(throws: PoolError.self) { try pool.rename("v@s", to: "w@s") }
        // The last block is partial: a write ending exactly at the end works.
        try pool.write("v", at: 9_990, [UInt8](repeating: 1, count: 10))
        #expect(pool.checkProblems() == nil)
    }

    @Test func shrinkZeroesTheTailForLaterGrowth() throws {
        let (pool, _) = try makeMemoryPool()
        try pool.createVolume("v", size: 64 << 10)
        try pool.write("v", at: 0, pattern(64 << 10, seed: 4))
        try pool.snapshot("v@before")
        try pool.resize("v", to: 10_000)
        try pool.resize("v", to: 64 << 10)
        var expected = pattern(64 << 10, seed: 4)
        expected.replaceSubrange(10_000..<(64 << 10), with: [UInt8](repeating: 0, count: (64 << 10) - 10_000))
        #expect(try pool.read("v", at: 0, count: 64 << 10) == expected)
        #expect(try pool.read("v@before", at: 0, count: 64 << 10) == pattern(64 << 10, seed: 4))
        #expect(pool.checkProblems() == nil)
    }
}

@Suite struct MetadataSpaceTests {
    /// Exhausting metadata fails the operation that needed it; the reserve still lets
    /// commits, deletes and trims run, and the pool works again afterwards.
    @Test func metadataExhaustionLeavesThePoolUsable() throws {
        let (pool, device) = try makeMemoryPool(dataSize: 16 << 20, metadataSize: 1 << 20)
        try pool.createVolume("v", size: 8 << 20)
        let id = try pool.volumeID("v")
        // Three leaves' worth of mappings, then snapshots that each force new leaves.
        for block in 0..<760 {
            try [UInt8(1)].withUnsafeBytes { try pool.write(id, at: UInt64(block) * 4096, from: $0) }
        }
        var snapshots: [String] = []
        var exhausted = false
        for round in 0..<400 where !exhausted {
            do {
                try pool.snapshot("v@r\(round)")
                snapshots.append("v@r\(round)")
                for leaf in 0..<3 {
                    try [UInt8(2)].withUnsafeBytes { try pool.write(id, at: UInt64(leaf * 254 + round % 200) * 4096, from: $0) }
                }
            } catch PoolError.noMetadataSpace {
                exhausted = true
            }
        }
        #expect(exhausted)
        try pool.commit()
        #expect(pool.checkProblems() == nil)
        for name in snapshots.prefix(snapshots.count / 2) { try pool.delete(name) }
        try pool.trim(id, at: 0, count: 1 << 20)
        try pool.commit()
        try [UInt8(3)].withUnsafeBytes { try pool.write(id, at: 5 << 20, from: $0) }
        try pool.close()
        let reopened = try Pool.open(device: device)
        #expect(try reopened.read("v", at: 5 << 20, count: 1) == [3])
        #expect(reopened.checkProblems() == nil)
    }
}

final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set(_ v: Bool) { lock.lock(); value = v; lock.unlock() }
    func get() -> Bool { lock.lock(); defer { lock.unlock() }; return value }
}
