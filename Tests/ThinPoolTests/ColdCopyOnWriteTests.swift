import Foundation
import Testing
import ThinPool
import ThinSystem

/// Copy-on-write under `--cache writeback` when the shared blocks are not in the page
/// cache: their old contents are read with O_DIRECT (FileDevice.readCopySources), and the
/// copies must hold exactly what the clone's writes and the snapshot's data say.
@Suite struct ColdCopyOnWriteTests {
    @Test func copiesOfUncachedBlocksHoldTheRightData() throws {
        let path = NSTemporaryDirectory() + "thinbd-coldcow-\(UUID().uuidString).pool"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let blockSize = 65536
        let size = 16 * blockSize
        var pool = try Pool.create(path: path, geometry: PoolGeometry(dataSize: 4 << 20, blockSize: UInt32(blockSize)), cache: .writeback)
        _ = try pool.createVolume("base", size: UInt64(size))
        let base = try pool.volumeID("base")
        let original = (0..<size).map { UInt8(truncatingIfNeeded: $0 / 4096 &* 31 &+ 7) }
        try original.withUnsafeBytes { try pool.write(base, at: 0, from: $0) }
        _ = try pool.snapshot("base@golden")
        _ = try pool.clone("base@golden", as: "job")
        try pool.flush()
        let job = try pool.volumeID("job")
        // Every shared block leaves the page cache.
        let fd = open(path, O_RDONLY)
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        close(fd)

        var expected = original
        // One write alone, then a batch over four blocks (their sources read side by side).
        let single = [UInt8](repeating: 0xA1, count: 4096)
        try single.withUnsafeBytes { try pool.write(job, at: UInt64(blockSize + 4096), from: $0) }
        expected.replaceSubrange(blockSize + 4096..<blockSize + 8192, with: single)
        let payloads = (0..<4).map { [UInt8](repeating: UInt8(0xB0 + $0), count: 4096 + 512 * $0) }
        let offsets = [3, 5, 6, 9].map { $0 * blockSize + 512 }
        let results = payloads.withUnsafeBufferPointers { buffers in
            pool.writeBatch(zip(offsets, buffers).map { Pool.BatchedWrite(volume: job, offset: UInt64($0), data: $1) })
        }
        #expect(results.allSatisfy { $0 == nil })
        for (offset, payload) in zip(offsets, payloads) { expected.replaceSubrange(offset..<offset + payload.count, with: payload) }

        func contents(_ name: String, of pool: Pool) throws -> [UInt8] {
            var bytes = [UInt8](repeating: 0, count: size)
            let id = try pool.volumeID(name)
            _ = try bytes.withUnsafeMutableBytes { try pool.read(id, at: 0, into: $0) }
            return bytes
        }
        #expect(try contents("job", of: pool) == expected)
        #expect(try contents("base@golden", of: pool) == original)
        #expect(pool.check().isClean)
        try pool.close()

        pool = try Pool.open(path: path, cache: .writeback)
        #expect(try contents("job", of: pool) == expected)
        #expect(try contents("base", of: pool) == original)
        #expect(pool.check().isClean)
        try pool.close()
    }
}

extension Array where Element == [UInt8] {
    /// The arrays' bytes as buffers valid inside `body`.
    func withUnsafeBufferPointers<R>(_ body: ([UnsafeRawBufferPointer]) throws -> R) rethrows -> R {
        var pointers: [UnsafeRawBufferPointer] = []
        func nest(_ index: Int) throws -> R {
            guard index < count else { return try body(pointers) }
            return try self[index].withUnsafeBytes { buffer in
                pointers.append(buffer)
                return try nest(index + 1)
            }
        }
        return try nest(0)
    }
}
