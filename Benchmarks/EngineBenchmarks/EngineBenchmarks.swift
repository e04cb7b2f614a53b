import Benchmark
import ThinPool
import ThinSystem

/// A pool file with two volumes: one with 64 MiB mapped, one with 8 GiB mapped.
/// Built once per run (the mapping is written one byte per 64 KiB block, so the file
/// stays small) and reused by every benchmark.
final class Fixture: @unchecked Sendable {
    static let shared = Fixture()

    let directory: String
    let pool: Pool
    let small: UInt64
    let large: UInt64
    let blockSize: UInt64 = 64 << 10
    var snapshots = 0

    init() {
        directory = (SystemInfo.environment("TMPDIR") ?? "/tmp") + "/thinbd-bench-\(SystemInfo.processID)"
        try! SystemInfo.makeDirectories(directory)
        let path = directory + "/bench.pool"
        SystemInfo.removeFile(path)
        pool = try! Pool.create(path: path, geometry: PoolGeometry(dataSize: 10 << 30))
        try! pool.createVolume("small", size: 64 << 20)
        try! pool.createVolume("large", size: 8 << 30)
        small = try! pool.volumeID("small")
        large = try! pool.volumeID("large")
        Self.map(pool, small, bytes: 64 << 20, blockSize: blockSize)
        Self.map(pool, large, bytes: 8 << 30, blockSize: blockSize)
        try! pool.commit()
    }

    /// Maps every block of the first `bytes` of a volume with a one-byte write.
    static func map(_ pool: Pool, _ id: UInt64, bytes: UInt64, blockSize: UInt64) {
        let one: [UInt8] = [1]
        var offset: UInt64 = 0
        one.withUnsafeBytes { byte in
            while offset < bytes {
                try! pool.write(id, at: offset, from: byte)
                offset += blockSize
            }
        }
    }

    func snapshotName(_ volume: String) -> String {
        snapshots += 1
        return "\(volume)@bench\(snapshots)"
    }

    deinit {
        try? pool.close()
        SystemInfo.removeFile(directory + "/bench.pool")
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(metrics: [.wallClock, .throughput], warmupIterations: 3, maxDuration: .seconds(10), maxIterations: 200)

    // Snapshot cost must not depend on how much the volume maps: compare these two.
    for (name, volume) in [("64MiB", "small"), ("8GiB", "large")] {
        Benchmark("snapshot, \(name) mapped", configuration: .init(metrics: [.wallClock], warmupIterations: 2, maxIterations: 50)) { benchmark in
            let fixture = Fixture.shared
            let snapshot = fixture.snapshotName(volume)
            benchmark.startMeasurement()
            try! fixture.pool.snapshot(snapshot)
            benchmark.stopMeasurement()
            try! fixture.pool.delete(snapshot)
        }
    }

    Benchmark("mapping lookups (8 GiB volume, random block)", configuration: .init(metrics: [.wallClock, .throughput], scalingFactor: .kilo)) { benchmark in
        let fixture = Fixture.shared
        var rng = SplitMix64(seed: 1)
        let blocks = (8 << 30) / fixture.blockSize
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let block = rng.next() % blocks
            blackHole(try! fixture.pool.extents(fixture.large, at: block * fixture.blockSize, count: 1))
        }
    }

    Benchmark("allocation (first write of a 64 KiB block)", configuration: .init(metrics: [.wallClock, .throughput], scalingFactor: .kilo)) { benchmark in
        let fixture = Fixture.shared
        let name = "alloc\(fixture.snapshots)"
        fixture.snapshots += 1
        try! fixture.pool.createVolume(name, size: 1 << 30)
        let id = try! fixture.pool.volumeID(name)
        let block = AlignedBuffer(count: Int(fixture.blockSize))
        benchmark.startMeasurement()
        for i in benchmark.scaledIterations {
            try! fixture.pool.write(id, at: UInt64(i) * fixture.blockSize, from: UnsafeRawBufferPointer(block.bytes))
        }
        benchmark.stopMeasurement()
        try! fixture.pool.delete(name)
    }
}
