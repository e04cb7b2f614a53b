import Testing
import ThinPool
import ThinSystem

/// `Pool.writeBatch`, the server's write path: each write must end as if the batch had
/// been written one by one, in order, with its own outcome.
@Suite struct WriteBatchTests {
    /// Runs `writes` (volume name, offset, bytes, FUA) as one batch; returns the outcomes.
    private func batch(_ pool: Pool, _ writes: [(String, UInt64, [UInt8], Bool)]) throws -> [PoolError?] {
        let ids = try writes.map { try pool.volumeID($0.0) }
        // The byte arrays stay alive (and unmoved) for the call.
        let storage = writes.map { $0.2 }
        return storage.withUnsafeBufferPointer { arrays in
            var pointers: [UnsafeRawBufferPointer] = []
            for array in arrays {
                pointers.append(array.withUnsafeBytes { $0 })
            }
            return pool.writeBatch(writes.indices.map {
                Pool.BatchedWrite(volume: ids[$0], offset: writes[$0].1, data: pointers[$0], forceUnitAccess: writes[$0].3)
            })
        }
    }

    @Test func batchEndsAsSequentialWritesWouldWithOwnOutcomes() throws {
        let (pool, device) = try makeMemoryPool(dataSize: 8 << 20)
        _ = try pool.createVolume("v", size: 1 << 20)
        try pool.write("v", at: 0, pattern(64 * 1024, seed: 1))
        try pool.snapshot("v@s")
        try pool.clone("v@s", as: "c")
        var model = [String: [UInt8]]()
        model["v"] = try pool.read("v", at: 0, count: 1 << 20)
        model["c"] = model["v"]

        let writes: [(String, UInt64, [UInt8], Bool)] = [
            ("v", 100, pattern(5000, seed: 2), false),          // partial blocks, copy-on-write (shared with v@s)
            ("v", 3000, pattern(300, seed: 3), false),          // overlaps the first: must land after it
            ("c", 4096, pattern(8192, seed: 4), false),         // the clone: copy-on-write too
            ("v@s", 0, [1, 2, 3], false),                       // read-only: its own error
            ("v", (1 << 20) - 2, [9, 9, 9, 9], false),          // past the end: its own error
            ("v", 500_000, pattern(4096, seed: 5), true),       // fresh block, FUA
            ("v", 3100, [0xEE], false),                         // overlaps both early writes
        ]
        let barriersBefore = device.barrierCount
        let outcomes = try batch(pool, writes)
        #expect(outcomes.count == writes.count)
        #expect(outcomes[3]?.description.contains("read-only") == true, "\(String(describing: outcomes[3]))")
        #expect(outcomes[4] != nil)
        for i in [0, 1, 2, 5, 6] { #expect(outcomes[i] == nil, "write \(i): \(String(describing: outcomes[i]))") }
        #expect(device.barrierCount > barriersBefore, "a FUA write commits")

        var durable = model
        for (i, (name, offset, bytes, _)) in writes.enumerated() where outcomes[i] == nil {
            model[name]!.replaceSubrange(Int(offset)..<Int(offset) + bytes.count, with: bytes)
            // Writes 1 and 6 overlap earlier ones, so they run in later rounds, after
            // the FUA write's commit: not covered by it.
            if i != 1 && i != 6 { durable[name]!.replaceSubrange(Int(offset)..<Int(offset) + bytes.count, with: bytes) }
        }
        #expect(try pool.read("v", at: 0, count: 1 << 20) == model["v"]!)
        #expect(try pool.read("c", at: 0, count: 1 << 20) == model["c"]!)
        #expect(try pool.read("v@s", at: 0, count: 64 * 1024) == pattern(64 * 1024, seed: 1), "the snapshot keeps its data")
        #expect(pool.checkProblems() == nil)

        // The FUA write and everything of its round survive a power cut right now.
        let crashed = try Pool.open(device: device.imageAfterCrash(seed: 9, keepVolatile: 0))
        let afterCrash = try crashed.read("v", at: 0, count: 1 << 20)
        let firstDifference = afterCrash.indices.first { afterCrash[$0] != durable["v"]![$0] }
        #expect(firstDifference == nil, "first difference at \(String(describing: firstDifference)); model \(model["v"]![firstDifference ?? 0])")
        #expect(try crashed.read("c", at: 0, count: 1 << 20) == durable["c"]!)
        #expect(crashed.checkProblems() == nil)
    }

    @Test func aFailedDeviceBatchFallsBackToOneByOne() throws {
        let (pool, device) = try makeMemoryPool(dataSize: 8 << 20)
        _ = try pool.createVolume("v", size: 1 << 20)
        let writes: [(String, UInt64, [UInt8], Bool)] = (0..<6).map { ("v", UInt64($0) * 20_000, pattern(3000, seed: UInt64($0)), false) }
        // The combined batch fails once; retried one by one, every write then succeeds.
        device.failWrites(1)
        let outcomes = try batch(pool, writes)
        #expect(outcomes.allSatisfy { $0 == nil }, "\(outcomes)")
        for (_, offset, bytes, _) in writes {
            #expect(try pool.read("v", at: offset, count: bytes.count) == bytes)
        }
        // A device that keeps failing fails every write, and leaks nothing.
        device.failWrites(100)
        let failed = try batch(pool, writes.map { ($0.0, $0.1 + 1000, $0.2, $0.3) })
        #expect(failed.allSatisfy { $0 != nil })
        device.failWrites(0)
        try pool.commit()
        #expect(pool.checkProblems() == nil)
    }
}
