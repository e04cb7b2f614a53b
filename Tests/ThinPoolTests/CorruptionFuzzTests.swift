import Foundation
import Testing
import ThinFormat
import ThinPool
import ThinSystem

/// The corruption fuzzer: damage that checksums cannot see.
///
/// Each round takes the committed image of a pool with volumes, a snapshot, a clone and
/// data, picks one metadata block the pool uses (superblocks included), rewrites one
/// field of it with a value chosen to hurt (0, 1, all ones, off by one, another block's
/// number, a random one) and seals the block again with a correct CRC, the way a buggy
/// writer or a stray write of a valid block would leave it. Then it does everything a
/// user could do with the pool: open, check, info, list and the tree, export every
/// volume, served reads and writes (the loop's non-blocking read and the server's write
/// batches), write-zeroes, trim, snapshot, clone, delete, commit and check again.
///
/// The rule it enforces is the project's: bad input gets an error, never a trap, a
/// hang or an unbounded allocation. A trap ends the test process (the failure is the
/// crash, and the round and seed printed before it); a round that runs longer than the
/// watchdog allows is reported and aborts.
///
/// `THINBD_FUZZ_ROUNDS` and `THINBD_FUZZ_SEED` run it longer (tools/fuzz-corruption.sh).
struct CorruptionFuzzer {
    let pristine: MemoryDevice
    let live: [UInt64]
    var rng: SplitMix64

    init(seed: UInt64) throws {
        let (device, live) = try populatedPool()
        pristine = device
        self.live = MetadataLayout.superblockSlots + live
        rng = SplitMix64(seed: seed)
    }

    mutating func random(_ n: Int) -> Int { Int(rng.next() % UInt64(max(n, 1))) }

    /// Where a field lies in a block and how wide it is, by block type.
    mutating func pickField(in page: [UInt8]) -> (offset: Int, width: Int) {
        let type = UInt16(page[8]) | UInt16(page[9]) << 8
        let count = Int(UInt32(page[12]) | UInt32(page[13]) << 8 | UInt32(page[14]) << 16 | UInt32(page[15]) << 24)
        let header: [(Int, Int)] = [(10, 2), (12, 4), (24, 8)]
        var fields: [(Int, Int)]
        switch BlockType(rawValue: type) {
        case .superblock:
            fields = [(40, 4), (44, 4), (48, 4), (52, 4)] + [72, 80, 88, 96, 104, 112, 120, 128, 136, 144].map { ($0, 8) }
        case .mappingNode, .volumeTableNode, .spaceMapIndexNode:
            let capacity = NodeView.capacity
            // Mostly entries in use, sometimes the one after the last.
            let entry = min(random(min(count, capacity) + 1), capacity - 1)
            fields = [(32 + 8 * entry, 8), (32 + 8 * capacity + 8 * entry, 8)]
            fields += fields  // entries are where most of the damage matters
        case .volumeRecord:
            let nameLength = Int(UInt16(page[58]) | UInt16(page[59]) << 8)
            fields = [32, 40, 48, 64, 72, 80, 88].map { ($0, 8) } + [(56, 1), (57, 1), (58, 2), (96 + random(min(nameLength, 255) + 1), 1)]
        case .refcounts:
            fields = [(12, 4), (32 + 4 * random(RefcountLayout.entriesPerBlock), 4)]
        case nil:
            fields = []
        }
        fields += header
        return fields[random(fields.count)]
    }

    /// A value meant to break assumptions: bounds, off-by-ones, other blocks' numbers.
    mutating func hostileValue(replacing original: UInt64, width: Int) -> UInt64 {
        let all: UInt64 = width == 8 ? .max : (1 << UInt64(width * 8)) - 1
        let choices: [UInt64] = [
            0, 1, 2, all, all - 1, 1 << UInt64(width * 8 - 1), original &+ 1, original &- 1, original &* 2,
            original ^ (1 << UInt64(random(width * 8))), rng.next(), live[random(live.count)],
            live[random(live.count)] &+ 1, UInt64(random(5000)),
        ]
        return choices[random(choices.count)] & all
    }

    /// One damaged copy of the pool and what was done to it.
    mutating func damagedImage() -> (MemoryDevice, String) {
        let image = pristine.snapshot()
        let block = live[random(live.count)]
        let (offset, width) = pickField(in: image.page(block))
        let original = rewriteField(of: image, block: block, offset: offset, width: width) { original in
            hostileValue(replacing: original, width: width)
        }
        return (image, "block \(block) offset \(offset) (\(width) bytes): \(original) -> \(field(of: image, block: block, offset: offset, width: width))")
    }
}

/// A little-endian field of a metadata block.
func field(of image: MemoryDevice, block: UInt64, offset: Int, width: Int) -> UInt64 {
    let page = image.page(block)
    var value: UInt64 = 0
    for i in 0..<width { value |= UInt64(page[offset + i]) << UInt64(8 * i) }
    return value
}

/// Rewrites a little-endian field of a metadata block and seals the block again with a
/// correct CRC, as a buggy writer would leave it. Returns the field's old value.
@discardableResult
func rewriteField(
    of image: MemoryDevice, block: UInt64, offset: Int, width: Int, _ newValue: (UInt64) -> UInt64
) -> UInt64 {
    var page = image.page(block)
    let original = field(of: image, block: block, offset: offset, width: width)
    let value = newValue(original)
    for i in 0..<width { page[offset + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * i)) }
    let crc = CRC32C.checksum(Array(page[4...]))
    for i in 0..<4 { page[i] = UInt8(truncatingIfNeeded: crc >> UInt32(8 * i)) }
    image.patch(at: block * UInt64(MetadataLayout.blockSize), with: page)
    return original
}

/// Everything a user can do with a pool, on a damaged one. Returns whether any step
/// reported the damage. Every error is expected; a trap or hang is the failure.
func exerciseDamagedPool(_ image: MemoryDevice) -> Bool {
    let pool: Pool
    do {
        pool = try Pool.open(device: image)
    } catch {
        return true
    }
    defer { try? pool.close() }
    var noticed = !pool.check().isClean
    _ = pool.info()
    let volumes = pool.listVolumes()
    for volume in volumes {
        // The tree: every volume's parent and its own record.
        if (try? pool.volumeInfo(volume.name)) == nil { noticed = true }
        if let parent = volume.parent, (try? pool.volumeInfo(parent)) == nil { noticed = true }
    }
    let chunk = 1 << 20
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { buffer.deallocate() }
    for volume in volumes {
        guard let id = try? pool.volumeID(volume.name) else {
            noticed = true
            continue
        }
        // Export: every byte (up to 32 MiB; a damaged size may say a petabyte, which is
        // thin and legal, and then the last MiB too), and the extents a copy tool asks for.
        let exported = min(volume.size, 32 << 20)
        var offsets = Array(stride(from: 0, to: exported, by: chunk))
        if exported < volume.size { offsets.append(volume.size - UInt64(chunk)) }
        for offset in offsets {
            let length = Int(min(UInt64(chunk), volume.size - offset))
            do {
                try pool.read(id, at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length]))
            } catch {
                noticed = true
            }
        }
        if (try? pool.extents(id, at: 0, count: volume.size)) == nil { noticed = true }
        // Served: the event loop's non-blocking read, then the server's write batches.
        let probe = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<4096])
        if case .completed(.failure) = pool.readWithoutBlocking(id, at: 0, into: probe, queue: nil, completion: { _ in }) {
            noticed = true
        }
        guard volume.kind != .snapshot, volume.size >= 8192 else { continue }
        let data = UnsafeRawBufferPointer(rebasing: buffer[0..<4096])
        let results = pool.writeBatch([
            Pool.BatchedWrite(volume: id, offset: 0, data: data),
            Pool.BatchedWrite(volume: id, offset: volume.size - 4096, data: data, forceUnitAccess: true),
        ])
        if results.contains(where: { $0 != nil }) { noticed = true }
        if (try? pool.writeZeroes(id, at: 4096, count: 65536, mayUnmap: false)) == nil { noticed = true }
        if (try? pool.trim(id, at: 0, count: min(volume.size, 1 << 20))) == nil { noticed = true }
    }
    if let first = volumes.first(where: { $0.kind == .volume }) {
        if (try? pool.snapshot("\(first.name)@fuzz")) == nil { noticed = true }
        if (try? pool.clone("\(first.name)@fuzz", as: "fuzz-clone")) == nil { noticed = true }
        if (try? pool.delete("\(first.name)@fuzz")) == nil { noticed = true }
    }
    if let last = volumes.last, (try? pool.delete(last.name)) == nil { noticed = true }
    if (try? pool.commit()) == nil { noticed = true }
    if !pool.check().isClean { noticed = true }
    return noticed
}

/// Aborts the process, with the round that hung, when a round runs past its deadline.
final class FuzzWatchdog: @unchecked Sendable {
    private let lock = NSLock()
    private var round = ""
    private var startedAt = Date()
    private var finished = false
    private let limit: TimeInterval

    init(limit: TimeInterval) {
        self.limit = limit
        let thread = Thread { [weak self] in
            while let self, self.poll() { Thread.sleep(forTimeInterval: 1) }
        }
        thread.start()
    }

    func begin(_ description: String) {
        lock.withLock {
            round = description
            startedAt = Date()
        }
    }

    func stop() { lock.withLock { finished = true } }

    private func poll() -> Bool {
        lock.withLock {
            if !finished && Date().timeIntervalSince(startedAt) > limit {
                FileHandle.standardError.write("corruption fuzzer: round hung for \(Int(limit)) s: \(round)\n".data(using: .utf8)!)
                abort()
            }
            return !finished
        }
    }
}

@Suite struct CorruptionFuzzTests {
    @Test func hostileMetadataWithValidChecksumsNeverTrapsOrHangs() throws {
        let environment = ProcessInfo.processInfo.environment
        let rounds = environment["THINBD_FUZZ_ROUNDS"].flatMap { Int($0) } ?? 600
        let seed = environment["THINBD_FUZZ_SEED"].flatMap { UInt64($0) } ?? 20261201
        var fuzzer = try CorruptionFuzzer(seed: seed)
        let watchdog = FuzzWatchdog(limit: 60)
        defer { watchdog.stop() }
        var noticed = 0
        let verbose = environment["THINBD_FUZZ_VERBOSE"] != nil
        for round in 0..<rounds {
            let (image, damage) = fuzzer.damagedImage()
            let description = "seed \(seed) round \(round): \(damage)"
            watchdog.begin(description)
            if verbose { FileHandle.standardError.write((description + "\n").data(using: .utf8)!) }
            if exerciseDamagedPool(image) { noticed += 1 }
        }
        print("corruption fuzzer: seed \(seed), \(rounds) rounds, \(noticed) noticed the damage, no trap, no hang")
        // Most rewrites hit something that matters; if almost none is noticed, the
        // fuzzer is not reaching the metadata it means to.
        #expect(noticed * 3 > rounds, "only \(noticed) of \(rounds) rounds noticed the damage")
    }
}
