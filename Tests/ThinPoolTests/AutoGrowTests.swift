import Testing
import ThinPool
import ThinSystem

@Suite struct AutoGrowTests {
    @Test func aFullPoolGrowsByStepsUpToItsMaximum() throws {
        let device = MemoryDevice(size: 0)
        let pool = try Pool.create(on: device, geometry: PoolGeometry(dataSize: 64 * 4096, blockSize: 4096, metadataSize: 4 << 20))
        try pool.createVolume("v", size: 1 << 20)
        let grownTo = LockedSizes()
        pool.autoGrow = AutoGrowPolicy(step: 32 * 4096, maximum: 128 * 4096) { grownTo.append($0) }
        // 100 blocks into 64: the write grows the pool (two steps at once) instead of failing.
        try pool.write("v", at: 0, [UInt8](repeating: 7, count: 100 * 4096))
        #expect(pool.info().dataTotalBytes == 128 * 4096)
        #expect(grownTo.values == [128 * 4096])
        #expect(try pool.read("v", at: 99 * 4096, count: 4096) == [UInt8](repeating: 7, count: 4096))
        // At the maximum, a full pool fails as before and changes nothing.
        #expect(throws: PoolError.self) { try pool.write("v", at: 100 * 4096, [UInt8](repeating: 8, count: 40 * 4096)) }
        #expect(try pool.growByStep() == nil)
        #expect(pool.checkProblems() == nil)
        // The grown size is committed, and survives reopening.
        try pool.flush()
        let reopened = try Pool.open(device: device)
        #expect(reopened.info().dataTotalBytes == 128 * 4096)
        #expect(reopened.checkProblems() == nil)
    }

    /// A crash after an autogrow but before its commit: the file is longer than the pool
    /// says, and its tail holds uncommitted writes. Opening cuts it off, so the next grow
    /// reads zeros there, never those writes.
    @Test func anUncommittedGrowLeavesNothingBehindAfterACrash() throws {
        let device = MemoryDevice(size: 0)
        let pool = try Pool.create(on: device, geometry: PoolGeometry(dataSize: 64 * 4096, blockSize: 4096, metadataSize: 4 << 20))
        try pool.createVolume("v", size: 1 << 20)
        pool.autoGrow = AutoGrowPolicy(step: 32 * 4096, maximum: 128 * 4096)
        try pool.write("v", at: 0, [UInt8](repeating: 0x77, count: 90 * 4096))
        let committedEnd = pool.dataRegionOffset + 64 * 4096
        #expect(device.size > committedEnd)
        // Every write reached the disk; the superblock still says 64 blocks.
        let image = device.snapshot()
        let reopened = try Pool.open(device: image)
        #expect(image.size == committedEnd)
        #expect(reopened.info().dataTotalBytes == 64 * 4096)
        #expect(reopened.checkProblems() == nil)
        try reopened.grow(to: 128 * 4096)
        var tail = [UInt8](repeating: 0xAA, count: 64 * 4096)
        try tail.withUnsafeMutableBytes { try image.read(into: $0, at: committedEnd) }
        #expect(tail.allSatisfy { $0 == 0 }, "uncommitted data survived in the grown region")
    }

    @Test func growByStepGrowsAheadAndStopsAtTheMaximum() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 64 * 4096, blockSize: 4096)
        #expect(try pool.growByStep() == nil, "no policy, no growth")
        pool.autoGrow = AutoGrowPolicy(step: 20 * 4096, maximum: 100 * 4096)
        #expect(try pool.growByStep() == 84 * 4096)
        #expect(try pool.growByStep() == 100 * 4096, "the last step stops at the maximum")
        #expect(try pool.growByStep() == nil)
        #expect(pool.info().dataTotalBytes == 100 * 4096)
        #expect(pool.checkProblems() == nil)
    }
}

final class LockedSizes: @unchecked Sendable {
    private let lock = Lock()
    private var sizes: [UInt64] = []
    func append(_ size: UInt64) { lock.withLock { sizes.append(size) } }
    var values: [UInt64] { lock.withLock { sizes } }
}
