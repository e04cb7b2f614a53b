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
        directory = Self.makeDirectory()
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

    /// This run's directory for pool files, made when missing.
    static func makeDirectory() -> String {
        let directory = (SystemInfo.environment("TMPDIR") ?? "/tmp") + "/thinbd-bench-\(SystemInfo.processID)"
        try! SystemInfo.makeDirectories(directory)
        return directory
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

/// A pool of 4 KiB blocks (`--cache writeback`) with a 1 GiB volume, every block written, a snapshot of it,
/// and a clone of that snapshot: each first write to one of the clone's blocks
/// allocates. The clone lives for the whole run, so its allocations accumulate as a
/// long random writer's do.
final class SmallBlockFixture: @unchecked Sendable {
    static let shared = SmallBlockFixture()

    let path: String
    let pool: Pool
    let blockSize: UInt64 = 4096
    let volumeBytes: UInt64 = 1 << 30
    let clone: UInt64
    var rng = SplitMix64(seed: 1)

    init() {
        // Not `Fixture.shared.directory`: that would build the 10 GiB fixture too.
        path = Fixture.makeDirectory() + "/bench-4k.pool"
        SystemInfo.removeFile(path)
        // Through the page cache, so that a write's data costs a copy, not a trip to the
        // disk, and what is measured is the engine's allocating path.
        pool = try! Pool.create(path: path, geometry: PoolGeometry(dataSize: 4 << 30, blockSize: 4096), cache: .writeback)
        let origin = try! pool.createVolume("origin", size: volumeBytes).id
        Fixture.map(pool, origin, bytes: volumeBytes, blockSize: blockSize)
        _ = try! pool.snapshot("origin@base")
        clone = try! pool.clone("origin@base", as: "clone").id
        try! pool.commit()
    }

    deinit {
        try? pool.close()
        SystemInfo.removeFile(path)
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

    // A block the clone has not written yet is shared with the snapshot, so its first
    // write allocates, and the hint (the block after the neighbour's) is taken: the
    // allocator's run search runs under the pool lock once per such write. It once probed
    // over a thousand blocks per allocation by the time a few hundred thousand had been
    // made (docs/performance.md, "The allocator's search").
    Benchmark("allocation (a clone's random first writes, 4 KiB blocks)", configuration: .init(metrics: [.wallClock, .throughput], scalingFactor: .kilo)) { benchmark in
        let fixture = SmallBlockFixture.shared
        let blocks = fixture.volumeBytes / fixture.blockSize
        let data = AlignedBuffer(count: Int(fixture.blockSize))
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let block = fixture.rng.next() % blocks
            try! fixture.pool.write(fixture.clone, at: block * fixture.blockSize, from: UnsafeRawBufferPointer(data.bytes))
        }
        benchmark.stopMeasurement()
        try! fixture.pool.commit()
    }
}
