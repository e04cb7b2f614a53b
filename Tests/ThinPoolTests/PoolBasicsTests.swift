import Testing
import ThinPool
import ThinSystem

@Suite struct PoolBasicsTests {
    @Test func unwrittenVolumeReadsZeros() throws {
        let (pool, _) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        #expect(try pool.read("v", at: 12345, count: 70000) == [UInt8](repeating: 0, count: 70000))
        #expect(pool.checkProblems() == nil)
    }

    @Test func writeThenReadAtUnalignedOffsets() throws {
        let (pool, _) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        let data = pattern(10000, seed: 1)
        try pool.write("v", at: 4000, data)
        #expect(try pool.read("v", at: 4000, count: 10000) == data)
        #expect(try pool.read("v", at: 0, count: 4000) == [UInt8](repeating: 0, count: 4000))
        #expect(try pool.read("v", at: 14000, count: 2000) == [UInt8](repeating: 0, count: 2000))
        #expect(pool.checkProblems() == nil)
    }

    @Test func snapshotKeepsPointInTimeImage() throws {
        let (pool, _) = try makeMemoryPool()
        try pool.createVolume("v", size: 256 << 10)
        let before = pattern(256 << 10, seed: 2)
        try pool.write("v", at: 0, before)
        try pool.snapshot("v@s1")
        let after = pattern(5000, seed: 3)
        try pool.write("v", at: 1000, after)
        #expect(try pool.read("v@s1", at: 0, count: 256 << 10) == before)
        var expected = before
        expected.replaceSubrange(1000..<6000, with: after)
        #expect(try pool.read("v", at: 0, count: 256 << 10) == expected)
        #expect(pool.checkProblems() == nil)
        #expect(throws: PoolError.self) { try pool.write("v@s1", at: 0, [1]) }
    }

    @Test func cloneIsWritableAndIndependent() throws {
        let (pool, _) = try makeMemoryPool()
        try pool.createVolume("base", size: 64 << 10)
        try pool.write("base", at: 0, pattern(64 << 10, seed: 4))
        try pool.snapshot("base@gold")
        try pool.clone("base@gold", as: "build")
        try pool.write("build", at: 100, [9, 9, 9])
        #expect(try pool.read("base", at: 100, count: 3) == Array(pattern(64 << 10, seed: 4)[100..<103]))
        #expect(try pool.read("build", at: 100, count: 3) == [9, 9, 9])
        try pool.delete("base")
        try pool.delete("base@gold")
        #expect(try pool.read("build", at: 0, count: 100) == Array(pattern(64 << 10, seed: 4)[0..<100]))
        #expect(pool.checkProblems() == nil)
    }

    @Test func deleteReturnsSpace() throws {
        let (pool, _) = try makeMemoryPool()
        let free0 = pool.info().dataFreeBytes
        try pool.createVolume("v", size: 1 << 20)
        try pool.write("v", at: 0, pattern(1 << 20, seed: 5))
        #expect(pool.info().dataFreeBytes == free0 - (1 << 20))
        try pool.delete("v")
        #expect(pool.info().dataFreeBytes == free0)
        #expect(pool.checkProblems() == nil)
    }

    @Test func fullPoolFailsWriteAndRecovers() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 256 << 10)
        try pool.createVolume("a", size: 1 << 20)
        try pool.createVolume("b", size: 1 << 20)
        try pool.write("a", at: 0, pattern(200 << 10, seed: 6))
        #expect(throws: PoolError.self) { try pool.write("b", at: 0, pattern(100 << 10, seed: 7)) }
        #expect(try pool.read("b", at: 0, count: 100 << 10) == [UInt8](repeating: 0, count: 100 << 10))
        #expect(try pool.read("a", at: 0, count: 200 << 10) == pattern(200 << 10, seed: 6))
        try pool.trim(pool.volumeID("a"), at: 0, count: 200 << 10)
        try pool.commit()
        try pool.write("b", at: 0, pattern(100 << 10, seed: 7))
        #expect(try pool.read("b", at: 0, count: 100 << 10) == pattern(100 << 10, seed: 7))
        #expect(pool.checkProblems() == nil)
    }

    @Test func extentsReportHolesAndData() throws {
        let (pool, _) = try makeMemoryPool()
        try pool.createVolume("v", size: 64 << 10)
        try pool.write("v", at: 8192, [1])
        let id = try pool.volumeID("v")
        let extents = try pool.extents(id, at: 0, count: 64 << 10)
        #expect(extents == [
            Extent(offset: 0, length: 8192, isMapped: false),
            Extent(offset: 8192, length: 4096, isMapped: true),
            Extent(offset: 12288, length: (64 << 10) - 12288, isMapped: false),
        ])
    }

    @Test func reopenKeepsCommittedState() throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        try pool.write("v", at: 777, pattern(50000, seed: 8))
        try pool.snapshot("v@a")
        try pool.close()
        let reopened = try Pool.open(device: device)
        #expect(try reopened.read("v", at: 777, count: 50000) == pattern(50000, seed: 8))
        #expect(try reopened.read("v@a", at: 777, count: 50000) == pattern(50000, seed: 8))
        #expect(reopened.checkProblems() == nil)
    }
}

@Suite struct EphemeralFlagTests {
    @Test func renamingAnEphemeralVolumeMakesItOrdinary() throws {
        let (pool, device) = try makeMemoryPool()
        _ = try pool.createVolume("build-1", size: 1 << 20, ephemeral: true)
        #expect(try pool.volumeInfo("build-1").isEphemeral)
        try pool.rename("build-1", to: "kept")
        #expect(try !pool.volumeInfo("kept").isEphemeral)
        try pool.close()
        #expect(try !Pool.open(device: device).volumeInfo("kept").isEphemeral)
    }
}
