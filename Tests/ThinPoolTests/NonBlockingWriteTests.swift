import Foundation
import TestSupport
import Testing
import ThinSystem

@testable import ThinPool

/// `Pool.writeInPlaceWithoutBlocking`, the event loops' write path: overwrites of owned
/// blocks go straight to the loop's disk queue; everything else says `.wouldBlock` and
/// changes nothing, and volume operations wait for the writes in flight.
@Suite struct NonBlockingWriteTests {
    static let cases = [("none", "io_uring"), ("none", "libaio"), ("writeback", "io_uring")]

    /// A pool on a real file with volume "v" (1 MiB, written whole, committed).
    private func makePool(_ cache: String) throws -> (Pool, TemporaryDirectory) {
        let directory = TemporaryDirectory("nonblocking-write")
        let pool = try Pool.create(
            path: directory.path + "/p.pool", geometry: PoolGeometry(dataSize: 64 << 20, blockSize: 65536, metadataSize: 4 << 20),
            cache: cache == "none" ? CacheMode.none : .writeback)
        _ = try pool.createVolume("v", size: 1 << 20)
        try pool.write("v", at: 0, pattern(1 << 20, seed: 1))
        try pool.commit()
        return (pool, directory)
    }

    private func makeQueue(_ kind: String) throws -> LoopDiskQueue {
        kind == "io_uring" ? try URingLoopQueue() : try AIOLoopQueue()
    }

    private func runUntil(_ queue: LoopDiskQueue, _ done: () -> Bool) {
        let deadline = Date().addingTimeInterval(10)
        while !done() && Date() < deadline {
            queue.submitQueued()
            if queue.runCompletions() == 0 { usleep(200) }
        }
    }

    private func started(_ start: Pool.NonBlockingWrite) -> Bool {
        if case .started = start { true } else { false }
    }

    @Test(arguments: cases) func anOverwriteOfOwnedBlocksRunsOnTheQueueAndChangesNoMetadata(cache: String, kind: String) throws {
        guard cache != "writeback" || kind == "io_uring" else { return }
        let (pool, _) = try makePool(cache)
        let queue = try makeQueue(kind)
        defer { queue.close() }
        let id = try pool.volumeID("v")
        // Across a block boundary: two blocks, two device writes.
        let data = AlignedBuffer(count: 8192)
        for i in 0..<8192 { data.bytes[i] = UInt8(truncatingIfNeeded: i * 3 + 1) }
        var outcome: PoolError?? = .none
        let start = pool.writeInPlaceWithoutBlocking(id, at: 65536 - 4096, from: UnsafeRawBufferPointer(data.bytes), queue: queue) {
            outcome = .some($0)
        }
        #expect(started(start))
        #expect(outcome == nil, "nothing completes before the queue runs")
        runUntil(queue) { outcome != nil }
        #expect(outcome == .some(nil))
        var expected = pattern(1 << 20, seed: 1)
        expected.replaceSubrange(61440..<69632, with: Array(data.bytes))
        #expect(try pool.read("v", at: 0, count: 1 << 20) == expected)
        #expect(!pool.lockedHasUncommittedChanges(), "an in-place write changes no metadata")
        #expect(pool.checkProblems() == nil)
        try pool.close()
    }

    @Test func writesThatNeedMoreThanDataIOSayWouldBlockAndChangeNothing() throws {
        let (pool, _) = try makePool("none")
        let queue = try URingLoopQueue()
        defer { queue.close() }
        let id = try pool.volumeID("v")
        let data = AlignedBuffer(count: 4096)
        for i in 0..<4096 { data.bytes[i] = 0x77 }
        let bytes = UnsafeRawBufferPointer(data.bytes)
        func attempt(_ volume: UInt64, at offset: UInt64, _ what: String, from source: UnsafeRawBufferPointer? = nil) {
            let start = pool.writeInPlaceWithoutBlocking(volume, at: offset, from: source ?? bytes, queue: queue) { _ in
                Issue.record("\(what): no completion after wouldBlock")
            }
            #expect(!started(start), "\(what)")
        }
        let noQueue = pool.writeInPlaceWithoutBlocking(id, at: 0, from: bytes, queue: nil) { _ in Issue.record("no queue") }
        #expect(!started(noQueue), "without a queue")
        // Blocks the volume does not map: allocation.
        _ = try pool.createVolume("empty", size: 1 << 20)
        attempt(try pool.volumeID("empty"), at: 0, "an unmapped block")
        // Blocks shared with a snapshot: copy-on-write.
        _ = try pool.snapshot("v@s")
        attempt(id, at: 4096, "a shared block")
        attempt(try pool.volumeID("v@s"), at: 0, "a snapshot")
        // Another write or a volume operation holds the range.
        _ = try pool.createVolume("w", size: 1 << 20)
        try pool.write("w", at: 0, pattern(1 << 20, seed: 2))
        let wid = try pool.volumeID("w")
        let hold = try #require(pool.rangeLocks.tryHold(wid, 0..<1))
        attempt(wid, at: 0, "a held range")
        pool.rangeLocks.release(hold)
        // An origin-backed volume, even over a block it has fetched.
        let origin = MemoryOrigin(size: 1 << 20, seed: 4)
        pool.setOriginOpener(origin)
        try pool.createOriginClone("o", origin: origin.record)
        _ = try pool.read("o", at: 0, count: 65536)
        pool.originStore.drain()
        attempt(try pool.volumeID("o"), at: 0, "an origin-backed volume")
        // O_DIRECT needs 4 KiB alignment.
        attempt(wid, at: 512, "an unaligned write", from: UnsafeRawBufferPointer(rebasing: bytes[0..<512]))
        // The pool lock held exclusively (a commit, a volume operation).
        let holding = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        Thread {
            pool.lock.withLock { _ in
                holding.signal()
                release.wait()
            }
        }.start()
        holding.wait()
        attempt(wid, at: 0, "the pool lock held exclusively")
        release.signal()
        // Nothing attempted changed anything, and the range held by none is free again.
        #expect(try pool.read("w", at: 0, count: 1 << 20) == pattern(1 << 20, seed: 2))
        #expect(try pool.read("empty", at: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
        var outcome: PoolError?? = .none
        #expect(started(pool.writeInPlaceWithoutBlocking(wid, at: 0, from: bytes, queue: queue) { outcome = .some($0) }))
        runUntil(queue) { outcome != nil }
        #expect(outcome == .some(nil))
        #expect(pool.checkProblems() == nil)
        try pool.close()
    }

    @Test func aSnapshotWaitsForTheWriteInFlightAndHoldsIt() throws {
        let (pool, _) = try makePool("none")
        let queue = try URingLoopQueue()
        defer { queue.close() }
        let id = try pool.volumeID("v")
        let data = AlignedBuffer(count: 65536)
        for i in 0..<65536 { data.bytes[i] = 0x5C }
        var outcome: PoolError?? = .none
        #expect(started(pool.writeInPlaceWithoutBlocking(id, at: 131072, from: UnsafeRawBufferPointer(data.bytes), queue: queue) {
            outcome = .some($0)
        }))
        // The write is queued, not finished: the snapshot must wait for it.
        let snapshotted = DispatchSemaphore(value: 0)
        Thread {
            _ = try? pool.snapshot("v@after")
            snapshotted.signal()
        }.start()
        #expect(snapshotted.wait(timeout: .now() + .milliseconds(300)) == .timedOut, "the snapshot waits for the write in flight")
        runUntil(queue) { outcome != nil }
        #expect(outcome == .some(nil))
        #expect(snapshotted.wait(timeout: .now() + 10) == .success)
        #expect(try pool.read("v@after", at: 131072, count: 65536) == [UInt8](repeating: 0x5C, count: 65536))
        // Now shared with the snapshot: the next write is not in place.
        let next = pool.writeInPlaceWithoutBlocking(id, at: 131072, from: UnsafeRawBufferPointer(data.bytes), queue: queue) { _ in }
        #expect(!started(next))
        #expect(pool.checkProblems() == nil)
        try pool.close()
    }
}
