import Testing
import ThinSystem

@testable import ThinPool

/// Writes that overwrite owned blocks in place change no metadata: the auto-commit has
/// nothing to do for them (it used to rewrite the volume record and sync every second),
/// while FLUSH still makes them durable.
@Suite struct InPlaceOverwriteTests {
    @Test func inPlaceOverwritesLeaveNothingToCommitAndAFlushStillMakesThemDurable() throws {
        let (pool, device) = try makeMemoryPool(dataSize: 4 << 20, blockSize: 4096, metadataSize: 4 << 20)
        _ = try pool.createVolume("v", size: 1 << 20)
        try pool.write("v", at: 0, [UInt8](repeating: 1, count: 16384))
        try pool.commit()
        let commits = pool.lockedStatistics().commits
        #expect(!pool.lockedHasUncommittedChanges())
        // In place: every block is the volume's own.
        try pool.write("v", at: 4096, [UInt8](repeating: 2, count: 8192))
        try pool.write("v", at: 100, [UInt8](repeating: 3, count: 10))
        #expect(!pool.lockedHasUncommittedChanges(), "in-place overwrites dirty nothing")
        try pool.commitInBackground()
        #expect(pool.lockedStatistics().commits == commits, "the auto-commit skips the interval")
        // A new block is a change again.
        try pool.write("v", at: 65536, [UInt8](repeating: 4, count: 4096))
        #expect(pool.lockedHasUncommittedChanges())
        try pool.flush()
        // After the flush, a power cut keeps every write.
        let crashed = device.imageAfterCrash(seed: 3, keepVolatile: 0)
        let reopened = try Pool.open(device: crashed)
        var expected = [UInt8](repeating: 1, count: 16384)
        expected.replaceSubrange(4096..<12288, with: [UInt8](repeating: 2, count: 8192))
        expected.replaceSubrange(100..<110, with: [UInt8](repeating: 3, count: 10))
        #expect(try reopened.read("v", at: 0, count: 16384) == expected)
        #expect(try reopened.read("v", at: 65536, count: 4096) == [UInt8](repeating: 4, count: 4096))
        #expect(reopened.checkProblems() == nil)
    }

    /// The auto-commit's lighter barriers: after a power cut right behind it, every
    /// block it mapped holds its data (a copy of a shared block, a whole new block, a
    /// partly written new one), while data overwritten in place since the last FLUSH may
    /// read as before it, as from a disk's write cache. A FLUSH then makes that durable.
    @Test func autoCommitMakesWhatItMapsDurableAndLeavesInPlaceDataToTheNextFlush() throws {
        let (pool, device) = try makeMemoryPool(dataSize: 4 << 20, blockSize: 4096, metadataSize: 4 << 20)
        _ = try pool.createVolume("v", size: 1 << 20)
        var expected = [UInt8](repeating: 0, count: 65536)
        func write(_ offset: Int, _ bytes: [UInt8]) throws {
            try pool.write("v", at: UInt64(offset), bytes)
            expected.replaceSubrange(offset..<offset + bytes.count, with: bytes)
        }
        try write(0, pattern(8192, seed: 1))
        try pool.snapshot("v@s")
        try write(16384, pattern(4096, seed: 2))
        try pool.flush()
        let flushed = expected

        try write(16384, pattern(4096, seed: 3))  // in place: the block is v's own
        try write(100, pattern(200, seed: 4))  // copy-on-write of a block v@s shares
        try write(32768, pattern(4096, seed: 5))  // a whole new block
        try write(49152 + 50, pattern(100, seed: 6))  // part of a new block
        try pool.commitInBackground()
        let generation = pool.generation

        let crashed = try Pool.open(device: device.imageAfterCrash(seed: 1, keepVolatile: 0))
        #expect(crashed.generation == generation, "the auto-commit is durable")
        #expect(crashed.checkProblems() == nil)
        let afterCut = try crashed.read("v", at: 0, count: 65536)
        #expect(afterCut[0..<8192] == expected[0..<8192], "the copy")
        #expect(afterCut[32768..<36864] == expected[32768..<36864], "the whole new block")
        #expect(afterCut[49152..<53248] == expected[49152..<53248], "the partly written new block")
        #expect(afterCut[16384..<20480] == flushed[16384..<20480], "data overwritten in place waits for a FLUSH")
        #expect(try crashed.read("v@s", at: 0, count: 8192) == Array(flushed[0..<8192]))

        try pool.flush()
        let flushedAgain = try Pool.open(device: device.imageAfterCrash(seed: 2, keepVolatile: 0))
        #expect(try flushedAgain.read("v", at: 0, count: 65536) == expected)
        #expect(flushedAgain.checkProblems() == nil)
    }
}

extension Pool {
    func lockedHasUncommittedChanges() -> Bool { lock.withSharedAccess { $0.hasUncommittedChanges } }
    func lockedStatistics() -> PoolStatistics { lock.withSharedAccess { $0.statistics } }
}
