import Foundation
import Testing
import ThinPool
import ThinSystem

/// A pool with volumes, data, snapshots and clones, committed and closed.
func populatedPool() throws -> (MemoryDevice, [UInt64]) {
    let (pool, device) = try makeMemoryPool(dataSize: 8 << 20)
    try pool.createVolume("a", size: 16 << 20)
    // Sparse writes: many mapping leaves and interior nodes for little data.
    for i in 0..<1200 { try pool.write("a", at: UInt64(i) * 12 * 1024, [UInt8(i % 250 + 1)]) }
    try pool.snapshot("a@one")
    try pool.write("a", at: 100_000, pattern(300_000, seed: 2))
    try pool.clone("a@one", as: "b")
    try pool.write("b", at: 7, pattern(70_000, seed: 3))
    try pool.close()
    let reopened = try Pool.open(device: device)
    let live = reopened.metadataBlocksInUse()
    try reopened.close()
    return (device, live)
}

/// Opens and fully exercises a damaged pool; returns whether damage was reported.
/// Any crash here fails the whole test run, which is the point.
func damageIsReported(_ device: MemoryDevice) -> Bool {
    let pool: Pool
    do {
        pool = try Pool.open(device: device)
    } catch {
        #expect(!"\(error)".isEmpty)
        return true
    }
    if !pool.check().isClean { return true }
    for volume in pool.listVolumes() {
        do {
            let id = try pool.volumeID(volume.name)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(volume.size), alignment: 4096)
            defer { buffer.deallocate() }
            try pool.read(id, at: 0, into: buffer)
        } catch {
            return true
        }
    }
    return false
}

@Suite struct CorruptionTests {
    @Test func everyLiveMetadataBlockIsProtected() throws {
        let (device, live) = try populatedPool()
        #expect(live.count > 15, "only \(live.count) live blocks")
        var rng = SplitMix64(seed: 5)
        for block in live {
            let image = device.snapshot()
            let offset = block * 4096 + rng.next() % 4096
            image.corrupt(at: offset, xor: UInt8(1 << (rng.next() % 8)))
            #expect(damageIsReported(image), "flipped a bit at \(offset) in live block \(block) and nothing noticed")
        }
    }

    @Test func randomGarbageAnywhereNeverCrashes() throws {
        let (device, _) = try populatedPool()
        var rng = SplitMix64(seed: 6)
        let metadataEnd = UInt64(8 << 20)
        for _ in 0..<60 {
            let image = device.snapshot()
            for _ in 0..<(1 + rng.next() % 8) {
                image.corrupt(at: rng.next() % metadataEnd, xor: UInt8(1 + rng.next() % 255))
            }
            _ = damageIsReported(image)
        }
    }

    @Test func wrongMagicIsNotAPool() throws {
        let (device, _) = try populatedPool()
        let image = device.snapshot()
        image.corrupt(at: 32)
        image.corrupt(at: 4096 + 32)
        #expect {
            try Pool.open(device: image)
        } throws: { error in
            guard case .notAPool = error as? PoolError else { return false }
            return true
        }
    }

    @Test func bothSuperblocksDamagedIsCorrupt() throws {
        let (device, _) = try populatedPool()
        let image = device.snapshot()
        image.corrupt(at: 200)
        image.corrupt(at: 4096 + 200)
        #expect {
            try Pool.open(device: image)
        } throws: { error in
            guard case .corrupt(let message) = error as? PoolError else { return false }
            return message.contains("superblock")
        }
    }

    @Test func truncatedFileIsReported() throws {
        let path = NSTemporaryDirectory() + "thinbd-trunc-\(UUID().uuidString).pool"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let pool = try Pool.create(path: path, geometry: PoolGeometry(dataSize: 64 << 20))
        try pool.createVolume("v", size: 1 << 20)
        try pool.close()
        #expect(truncate(path, 40 << 20) == 0)
        #expect {
            try Pool.open(path: path)
        } throws: { error in
            guard case .truncated = error as? PoolError else { return false }
            return true
        }
        #expect(truncate(path, 1000) == 0)
        #expect(throws: PoolError.self) { try Pool.open(path: path) }
    }

    @Test func garbageFileIsNotAPool() throws {
        let path = NSTemporaryDirectory() + "thinbd-garbage-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(pattern(1 << 20, seed: 9))))
        #expect {
            try Pool.open(path: path)
        } throws: { error in
            guard case .notAPool = error as? PoolError else { return false }
            return true
        }
    }
}

@Suite struct FilePoolTests {
    @Test(arguments: [CacheMode.none, CacheMode.writeback])
    func poolOnRealFileSurvivesReopen(cache: CacheMode) throws {
        let path = NSTemporaryDirectory() + "thinbd-file-\(UUID().uuidString).pool"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let pool = try Pool.create(path: path, geometry: PoolGeometry(dataSize: 256 << 20), cache: cache)
        #expect(pool.engineName == (cache == .none ? "libaio+O_DIRECT" : "pread/pwrite"))
        try pool.createVolume("v", size: 64 << 20)
        let data = pattern(3 << 20, seed: 11)
        try pool.write("v", at: 12345, data)
        try pool.snapshot("v@s")
        try pool.write("v", at: 12345, pattern(1000, seed: 12))
        #expect(throws: PoolError.self) { try Pool.open(path: path) }
        try pool.close()
        let reopened = try Pool.open(path: path, readOnly: true, cache: cache)
        #expect(try reopened.read("v@s", at: 12345, count: data.count) == data)
        #expect(try reopened.read("v", at: 12345, count: 1000) == pattern(1000, seed: 12))
        #expect(reopened.checkProblems() == nil)
        try reopened.close()
    }

    @Test func autoCommitMakesWritesDurableWithoutFlush() throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        let committer = AutoCommitter(pool: pool, milliseconds: 100)
        try pool.write("v", at: 0, [7, 7, 7])
        let generation = pool.generation
        var waited = 0
        while pool.generation == generation && waited < 50 {
            usleep(20_000)
            waited += 1
        }
        committer.stop()
        #expect(pool.generation > generation)
        let crashed = try Pool.open(device: device.imageAfterCrash(seed: 1, keepVolatile: 0))
        #expect(try crashed.read("v", at: 0, count: 3) == [7, 7, 7])
    }
}
