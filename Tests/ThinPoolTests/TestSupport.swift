import ThinPool
import ThinSystem

/// A pool on a `MemoryDevice`, small enough for thousands of operations per test.
func makeMemoryPool(
    dataSize: UInt64 = 4 << 20, blockSize: UInt32 = 4096, metadataSize: UInt64 = 4 << 20
) throws -> (Pool, MemoryDevice) {
    let device = MemoryDevice(size: 0)
    let pool = try Pool.create(on: device, geometry: PoolGeometry(dataSize: dataSize, blockSize: blockSize, metadataSize: metadataSize))
    return (pool, device)
}

extension Pool {
    func write(_ name: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let id = try volumeID(name)
        try bytes.withUnsafeBytes { try write(id, at: offset, from: $0) }
    }

    func read(_ name: String, at offset: UInt64, count: Int) throws -> [UInt8] {
        let id = try volumeID(name)
        var bytes = [UInt8](repeating: 0xAA, count: count)
        _ = try bytes.withUnsafeMutableBytes { try read(id, at: offset, into: $0) }
        return bytes
    }

    /// Failure text of `check`, or nil when clean.
    func checkProblems() -> String? {
        let report = check()
        if report.isClean { return nil }
        return (report.damage + report.fixable + (report.leakedBlocks > 0 ? ["\(report.leakedBlocks) leaked blocks"] : []))
            .prefix(10).joined(separator: "\n")
    }
}

func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    var bytes = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
        var word = rng.next()
        for _ in 0..<8 where i < count {
            bytes[i] = UInt8(truncatingIfNeeded: word) | 1
            word >>= 8
            i += 1
        }
    }
    return bytes
}
