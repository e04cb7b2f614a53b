import Foundation
import TestSupport
import Testing
import ThinPool

/// The example of docs/embedding.md, compiled and run: keep the two in step.
@Suite struct EmbeddingExampleTests {
    @Test func embeddingExampleRuns() throws {
        let directory = TemporaryDirectory("embedding")
        let path = directory.path + "/builds.pool"

        // --- docs/embedding.md example begins ---
        // A 1 GiB pool in one sparse file, with 64 KiB blocks.
        let pool = try Pool.create(
            path: path, geometry: PoolGeometry(dataSize: 1 << 30, blockSize: 65536, metadataSize: 16 << 20))
        let base = try pool.createVolume("base", size: 4 << 30)   // overcommitted: fine

        // Fill the golden image, then freeze it.
        let image = [UInt8](repeating: 0xAB, count: 1 << 20)
        try image.withUnsafeBytes { try pool.write(base.id, at: 0, from: $0) }
        try pool.snapshot("base@golden")

        // Each build gets a writable clone: constant time, shares every block.
        let build = try pool.clone("base@golden", as: "build-1")
        try [UInt8](repeating: 0x01, count: 4096).withUnsafeBytes { try pool.write(build.id, at: 0, from: $0) }
        try pool.flush()                       // durable: survives a crash from here on

        var first = [UInt8](repeating: 0, count: 8192)
        let extents = try first.withUnsafeMutableBytes { try pool.read(build.id, at: 0, into: $0) }

        try pool.delete("build-1")             // its own blocks go back to the pool
        try pool.close()
        // --- docs/embedding.md example ends ---

        #expect(first[0..<4096].allSatisfy { $0 == 0x01 })
        #expect(first[4096...].allSatisfy { $0 == 0xAB })
        #expect(extents.allSatisfy { $0.isMapped })
        let reopened = try Pool.open(path: path)
        #expect(reopened.listVolumes().map(\.name) == ["base", "base@golden"])
        let report = reopened.check()
        #expect(report.isClean)
        try reopened.close()
    }
}
