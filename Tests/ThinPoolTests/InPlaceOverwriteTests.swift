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
}

extension Pool {
    func lockedHasUncommittedChanges() -> Bool { lock.withSharedAccess { $0.hasUncommittedChanges } }
    func lockedStatistics() -> PoolStatistics { lock.withSharedAccess { $0.statistics } }
}
