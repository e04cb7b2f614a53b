import Foundation
import TestSupport
import Testing
import ThinPool
import ThinSystem

/// `Pool.readWithoutBlocking`, the event loops' read path: it must return the same bytes
/// and extents as `read`, and say `.wouldBlock` instead of waiting.
@Suite struct NonBlockingReadTests {
    private func outcome(_ start: Pool.NonBlockingRead) -> String {
        switch start {
        case .completed(.success): "completed"
        case .completed(.failure(let error)): "failed: \(error)"
        case .started: "started"
        case .wouldBlock: "wouldBlock"
        }
    }

    @Test func uncachedMetadataSaysWouldBlockAndCachedGivesWhatReadGives() throws {
        let (pool, device) = try makeMemoryPool(dataSize: 16 << 20)
        _ = try pool.createVolume("v", size: 16 << 20)
        // Enough sparse mappings for a tree with interior nodes above its leaves.
        for i in 0..<1000 { try pool.write("v", at: UInt64(i) * 16384, [UInt8(i % 250 + 1)]) }
        let data = pattern(3 * 4096, seed: 11)
        let base: UInt64 = 10 << 20
        try pool.write("v", at: base + 8192, data)
        try pool.close()

        // Reopened: mapping leaves are not read at open, so the first lookup needs the disk.
        let reopened = try Pool.open(device: device)
        let id = try reopened.volumeID("v")
        var bytes = [UInt8](repeating: 0xEE, count: 6 * 4096)
        let first = bytes.withUnsafeMutableBytes { raw in
            reopened.readWithoutBlocking(id, at: base, into: raw, queue: nil) { _ in Issue.record("no callback unless started") }
        }
        #expect(outcome(first) == "wouldBlock")

        let expected = try reopened.read("v", at: base, count: 6 * 4096)
        let blockingExtents = try reopened.extents(id, at: base, count: 6 * 4096)
        let second = bytes.withUnsafeMutableBytes { raw in
            reopened.readWithoutBlocking(id, at: base, into: raw, queue: nil) { _ in Issue.record("no callback unless started") }
        }
        guard case .completed(.success(let extents)) = second else {
            Issue.record("expected an on-the-spot read, got \(outcome(second))")
            return
        }
        #expect(bytes == expected)
        #expect(Array(bytes[8192..<(8192 + data.count)]) == data)
        #expect(Array(bytes[4096..<8192]) == [UInt8](repeating: 0, count: 4096), "holes are zero-filled")
        #expect(extents == blockingExtents)

        // Bad requests fail on the spot, as they do for `read`.
        let beyond = bytes.withUnsafeMutableBytes { raw in
            reopened.readWithoutBlocking(id, at: 16 << 20, into: raw, queue: nil) { _ in }
        }
        #expect(outcome(beyond).hasPrefix("failed"))
        // A failed or refused read leaves the I/O gate as it found it: a commit still drains.
        try reopened.write("v", at: 0, [1, 2, 3])
        try reopened.commit()
        #expect(reopened.checkProblems() == nil)
        try reopened.close()
    }

    @Test func readsOnALoopQueueCompleteThroughIt() throws {
        let directory = TemporaryDirectory("nonblocking")
        let pool = try Pool.create(path: directory.path + "/p.pool", geometry: PoolGeometry(dataSize: 64 << 20, blockSize: 65536, metadataSize: 4 << 20), cache: CacheMode.none)
        #expect(pool.usesLoopQueues)
        _ = try pool.createVolume("v", size: 8 << 20)
        let id = try pool.volumeID("v")
        let data = pattern(200_000, seed: 5)
        try pool.write("v", at: 70_000, data)
        let queue = try AIOLoopQueue()
        let target = AlignedBuffer(count: 4 * 65536)
        /// Reads 4 blocks at `offset` through the loop queue; their extents, or nil.
        func readThroughQueue(at offset: UInt64) -> [Extent]? {
            var result: Result<[Extent], PoolError>?
            let start = pool.readWithoutBlocking(id, at: offset, into: target.bytes, queue: queue) { result = $0 }
            #expect(outcome(start) == "started")
            let deadline = Date().addingTimeInterval(10)
            while result == nil && Date() < deadline {
                queue.submitQueued()
                if queue.runCompletions() == 0 { usleep(200) }
            }
            guard case .success(let extents) = result else {
                Issue.record("read did not complete: \(String(describing: result))")
                return nil
            }
            return extents
        }

        guard let extents = readThroughQueue(at: 65536) else { return }
        #expect(Array(target.bytes) == (try pool.read("v", at: 65536, count: 4 * 65536)))
        // Mapped throughout: no extents, where `extents` lists the one mapped run.
        #expect(try pool.extents(id, at: 65536, count: 4 * 65536) == [Extent(offset: 65536, length: 4 * 65536, isMapped: true)])
        #expect(extents.isEmpty)
        // The blocking read still lists every run, the mapped span included.
        let scratch = AlignedBuffer(count: 4 * 65536)
        #expect(try pool.read(id, at: 65536, into: scratch.bytes) == [Extent(offset: 65536, length: 4 * 65536, isMapped: true)])

        // With a hole in the range, every run, as `read` reports them.
        guard let holedExtents = readThroughQueue(at: 0) else { return }
        #expect(Array(target.bytes) == (try pool.read("v", at: 0, count: 4 * 65536)))
        #expect(holedExtents == (try pool.extents(id, at: 0, count: 4 * 65536)))
        #expect(holedExtents.first == Extent(offset: 0, length: 65536, isMapped: false))
        queue.close()
        // The completion left the I/O gate: a commit (which drains it) finishes.
        try pool.commit()
        try pool.close()
    }
}
