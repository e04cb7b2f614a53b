import Foundation
import TestSupport
import Testing
import ThinFormat
import ThinSystem

@testable import ThinPool

/// An origin in memory that counts what is read from it and can be made to fail.
final class MemoryOrigin: VolumeOrigin, OriginOpener, @unchecked Sendable {
    let bytes: [UInt8]
    private let state = LockedValue((reads: 0, bytesRead: UInt64(0), down: false, anotherImage: false, delay: UInt32(0)))

    /// With `zeroStart..<zeroEnd`: those bytes are zeros, and the origin says so
    /// (`zeroRanges`), as an NBD server with base:allocation does.
    let zeros: Range<UInt64>?

    init(size: Int, seed: UInt64, zeros: Range<Int>? = nil) {
        var bytes = pattern(size, seed: seed)
        if let zeros { bytes.replaceSubrange(zeros, with: [UInt8](repeating: 0, count: zeros.count)) }
        self.bytes = bytes
        self.zeros = zeros.map { UInt64($0.lowerBound)..<UInt64($0.upperBound) }
    }

    func zeroRanges(in range: Range<UInt64>) -> [Range<UInt64>] {
        guard let zeros else { return [] }
        let clipped = zeros.clamped(to: range)
        return clipped.isEmpty ? [] : [clipped]
    }

    var reads: Int { state.withLockedValue { $0.reads } }
    var bytesRead: UInt64 { state.withLockedValue { $0.bytesRead } }
    func setDown(_ down: Bool) { state.withLockedValue { $0.down = down } }
    /// Each read takes this long (a slow network), so that requests overlap.
    func setDelay(microseconds: UInt32) { state.withLockedValue { $0.delay = microseconds } }
    /// Opening finds another image behind the same address.
    func setAnotherImage(_ another: Bool) { state.withLockedValue { $0.anotherImage = another } }

    var record: VolumeRecord.Origin { VolumeRecord.Origin(kind: .file, locator: "/memory/origin", size: UInt64(bytes.count)) }

    func open(_ origin: VolumeRecord.Origin) throws(PoolError) -> VolumeOrigin {
        guard origin.size == UInt64(bytes.count), !state.withLockedValue({ $0.anotherImage }) else {
            throw .originMismatch("the clone was made from another image")
        }
        return self
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(PoolError) {
        let (down, delay) = state.withLockedValue { state -> (Bool, UInt32) in
            if !state.down {
                state.reads += 1
                state.bytesRead += UInt64(buffer.count)
            }
            return (state.down, state.delay)
        }
        if delay > 0 { usleep(delay) }
        if down { throw .originUnavailable("the origin is down") }
        precondition(offset + UInt64(buffer.count) <= UInt64(bytes.count))
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
    }
}

/// Origin-backed volumes in the engine: fetch on first read, keep, copy up, local zeros.
@Suite struct OriginTests {
    /// A pool with volume "c" cloned from a 1 MiB origin plus 1000 bytes (the last block is partial).
    func setUp() throws -> (Pool, MemoryOrigin, UInt64) {
        let (pool, _) = try makeMemoryPool(dataSize: 16 << 20, blockSize: 4096, metadataSize: 4 << 20)
        let origin = MemoryOrigin(size: (1 << 20) + 1000, seed: 9)
        pool.setOriginOpener(origin)
        try pool.createOriginClone("c", origin: origin.record)
        return (pool, origin, try pool.volumeID("c"))
    }

    @Test func aReadFetchesOnceAndTheBlocksAreKept() throws {
        let (pool, origin, id) = try setUp()
        #expect(try pool.volumeInfo("c").size == UInt64(origin.bytes.count))
        #expect(try pool.read("c", at: 5000, count: 20000) == Array(origin.bytes[5000..<25000]))
        #expect(try pool.extents(id, at: 0, count: UInt64(origin.bytes.count)).allSatisfy(\.isMapped), "origin ranges are data")
        pool.originStore.drain()
        let before = origin.reads
        #expect(try pool.read("c", at: 4096, count: 16384) == Array(origin.bytes[4096..<20480]))
        #expect(origin.reads == before, "fetched blocks are read locally")
        #expect(try pool.read("c", at: 0, count: origin.bytes.count) == origin.bytes)
        pool.originStore.drain()
        // Everything fetched once: the whole origin, in whole blocks, no more.
        #expect(origin.bytesRead == UInt64(origin.bytes.count))
        #expect(try pool.volumeInfo("c").mappedBytes == UInt64((origin.bytes.count + 4095) / 4096 * 4096))
        #expect(pool.checkProblems() == nil)
    }

    @Test func partialWritesKeepTheOriginsOtherBytesAndZeroesAreLocal() throws {
        let (pool, origin, id) = try setUp()
        var expected = origin.bytes
        try pool.write("c", at: 10, [UInt8](repeating: 0xAB, count: 100))
        expected.replaceSubrange(10..<110, with: [UInt8](repeating: 0xAB, count: 100))
        // Write-zeroes and trim over whole blocks: local zeros, never fetched again.
        try pool.writeZeroes(id, at: 8192, count: 8192, mayUnmap: true)
        expected.replaceSubrange(8192..<16384, with: [UInt8](repeating: 0, count: 8192))
        try pool.trim(id, at: 20480 - 100, count: 4096 + 200)
        expected.replaceSubrange(20480..<24576, with: [UInt8](repeating: 0, count: 4096))
        // A partial zeroing keeps the rest of its block from the origin.
        try pool.writeZeroes(id, at: 30000, count: 10, mayUnmap: true)
        expected.replaceSubrange(30000..<30010, with: [UInt8](repeating: 0, count: 10))
        let reads = origin.bytesRead
        #expect(try pool.read("c", at: 0, count: 40960) == Array(expected[0..<40960]))
        // Of the first ten blocks, 0 and 7 were fetched by the partial write and zeroing,
        // 2, 3 and 5 are local zeros: that read fetched 1, 4, 6, 8 and 9 only.
        #expect(origin.bytesRead - reads == 5 * 4096, "\(origin.bytesRead - reads)")
        pool.originStore.drain()
        #expect(try pool.read("c", at: 0, count: origin.bytes.count) == expected)
        #expect(pool.checkProblems() == nil)
    }

    @Test func anUnreachableOriginFailsOnlyUnfetchedReads() throws {
        let (pool, origin, id) = try setUp()
        _ = try pool.read("c", at: 0, count: 8192)
        pool.originStore.drain()
        origin.setDown(true)
        #expect(try pool.read("c", at: 0, count: 8192) == Array(origin.bytes[0..<8192]), "fetched blocks still read")
        #expect(throws: PoolError.originUnavailable("the origin is down")) { try pool.read("c", at: 65536, count: 4096) }
        try pool.write("c", at: 131072, [UInt8](repeating: 5, count: 4096))
        #expect(try pool.read("c", at: 131072, count: 4096) == [UInt8](repeating: 5, count: 4096), "whole-block writes need no origin")
        #expect(throws: PoolError.self) { try pool.write("c", at: 200_000, [UInt8](repeating: 5, count: 10)) }
        #expect(pool.originStatistics.errors >= 2)
        origin.setDown(false)
        #expect(try pool.read("c", at: 65536, count: 4096) == Array(origin.bytes[65536..<69632]), "back without a restart")
        _ = id
    }

    @Test func snapshotsAndClonesOfAnOriginCloneKeepTheOrigin() throws {
        let (pool, origin, _) = try setUp()
        _ = try pool.read("c", at: 0, count: 4096)
        pool.originStore.drain()
        _ = try pool.snapshot("c@s")
        _ = try pool.clone("c@s", as: "d")
        #expect(try pool.volumeInfo("c@s").origin == origin.record && pool.volumeInfo("d").origin == origin.record)
        let reads = origin.reads
        #expect(try pool.read("c@s", at: 0, count: 12288) == Array(origin.bytes[0..<12288]))
        #expect(origin.reads == reads + 1, "the snapshot fetched what the volume had not")
        pool.originStore.drain()
        #expect(try pool.read("c@s", at: 4096, count: 4096) == Array(origin.bytes[4096..<8192]))
        #expect(origin.reads == reads + 1, "a snapshot keeps what it fetched too (its contents do not change)")
        #expect(try pool.volumeInfo("c@s").mappedBytes == 3 * 4096)
        #expect(try pool.read("d", at: 100_000, count: 5000) == Array(origin.bytes[100_000..<105_000]))
        #expect(pool.checkProblems() == nil)
    }

    @Test func hydrationFetchesWhatIsLeftAndThenDropsTheOrigin() throws {
        let (pool, origin, id) = try setUp()
        _ = try pool.read("c", at: 0, count: 100_000)
        pool.originStore.drain()
        try pool.write("c", at: 500_000, [UInt8](repeating: 0x77, count: 4096 * 3))
        let before = origin.bytesRead
        let first = try pool.hydrate("c", window: 0..<(512 << 10))
        #expect(!first.complete && first.remainingBytes > 0)
        // Of the window's 128 blocks, the read fetched 0-24 and the write (with its two
        // partial ends fetched) mapped 122-125.
        #expect(first.fetchedBytes == (128 - 25 - 4) * 4096)
        let last = try pool.hydrate("c", window: (512 << 10)..<UInt64.max)
        #expect(last.complete && last.remainingBytes == 0)
        #expect(origin.bytesRead - before == first.fetchedBytes + last.fetchedBytes)
        #expect(try pool.volumeInfo("c").origin == nil, "the origin record is dropped")
        origin.setDown(true)
        var expected = origin.bytes
        expected.replaceSubrange(500_000..<500_000 + 4096 * 3, with: [UInt8](repeating: 0x77, count: 4096 * 3))
        #expect(try pool.read("c", at: 0, count: origin.bytes.count) == expected, "it reads without the origin")
        #expect(try pool.hydrate("c", window: 0..<1).complete)
        #expect(pool.checkProblems() == nil)
        _ = id
    }

    @Test func theOriginRecordSurvivesReopenAndACrashLosesNoFetchedBlockHalfway() throws {
        let device = MemoryDevice(size: 0)
        let origin = MemoryOrigin(size: 256 << 10, seed: 4)
        do {
            let pool = try Pool.create(on: device, geometry: PoolGeometry(dataSize: 16 << 20, blockSize: 4096, metadataSize: 4 << 20))
            pool.setOriginOpener(origin)
            try pool.createOriginClone("c", origin: origin.record)
            _ = try pool.read("c", at: 0, count: 65536)
            pool.originStore.drain()
            try pool.flush()
            _ = try pool.read("c", at: 65536, count: 65536)
            pool.originStore.drain()
            // A crash: the second fetch's blocks were stored but never committed.
            pool.abandon()
        }
        let reopened = try Pool.open(device: device)
        #expect(try reopened.volumeInfo("c").origin == origin.record)
        #expect(try reopened.volumeInfo("c").mappedBytes == 65536, "committed fetches stay; uncommitted ones are gone whole")
        #expect(throws: PoolError.self) { try reopened.read("c", at: 65536, count: 4096) }
        reopened.setOriginOpener(origin)
        #expect(try reopened.read("c", at: 0, count: 256 << 10) == origin.bytes)
        #expect(reopened.checkProblems() == nil)
    }

    @Test func anotherImageIsRefusedAtOpenReportedOnceAndAcceptedWhenRightAgain() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 16 << 20, blockSize: 4096, metadataSize: 4 << 20)
        let origin = MemoryOrigin(size: 1 << 20, seed: 3)
        try pool.createOriginClone("c", origin: origin.record)
        let events = LockedValue([OriginEvent]())
        pool.onOriginChange { event in events.withLockedValue { $0.append(event) } }
        origin.setAnotherImage(true)
        pool.setOriginOpener(origin)
        #expect(pool.originRefusal(of: "c") == nil, "nothing known yet")
        pool.probeOrigins()
        #expect(pool.originRefusal(of: "c") == .originMismatch("the clone was made from another image"))
        #expect(throws: PoolError.originMismatch("the clone was made from another image")) { try pool.read("c", at: 0, count: 4096) }
        #expect(origin.reads == 0, "nothing is read from another image")
        #expect(events.withLockedValue { $0.count } == 1, "one report per outage, not per read")
        // The right image again: after the backoff (10 s for another image) it is used.
        origin.setAnotherImage(false)
        pool.origins.withLockedValue { catalog in
            for key in catalog.refused.keys { catalog.refused[key]?.until = 0 }
        }
        #expect(try pool.read("c", at: 0, count: 4096) == Array(origin.bytes[0..<4096]))
        #expect(pool.originRefusal(of: "c") == nil)
        let reported = events.withLockedValue { $0 }
        #expect(reported.count == 2 && reported[1].problem == nil && reported[1].locator == origin.record.locator)
    }

    @Test func originRangesCountAsDataForAFullSendAndCheckListsTheOriginBacked() throws {
        let (pool, origin, _) = try setUp()
        try pool.write("c", at: 8192, [UInt8](repeating: 1, count: 4096))
        let size = UInt64(origin.bytes.count)
        let whole = try pool.differences(from: nil, to: "c")
        #expect(whole.extents == [0..<(size + 4095) / 4096 * 4096], "unmapped blocks are the origin's, not holes")
        _ = try pool.snapshot("c@a")
        try pool.write("c", at: 65536, [UInt8](repeating: 2, count: 4096))
        #expect(try pool.differences(from: "c@a", to: "c").extents == [65536..<69632], "the same origin on both sides cancels out")
        let report = pool.check()
        #expect(report.isClean)
        #expect(report.originBacked.map(\.name).sorted() == ["c", "c@a"])
    }

    @Test func aClonesFetchesWarmItsSourceSoTheNextCloneFetchesNothing() throws {
        let (pool, origin, _) = try setUp()
        _ = try pool.snapshot("c@golden")
        _ = try pool.clone("c@golden", as: "build1")
        // A whole-block write that lands before the fetched block is stored: the block
        // still goes to the source, whose later clones read it.
        try pool.write("build1", at: 409_600, [UInt8](repeating: 8, count: 4096))
        try pool.storeFetched(try pool.volumeID("build1"), block: 100, Array(origin.bytes[409_600..<413_696]))
        #expect(try pool.read("build1", at: 0, count: 300_000) == Array(origin.bytes[0..<300_000]))
        pool.originStore.drain()
        try pool.write("build1", at: 0, [UInt8](repeating: 9, count: 8192))
        try pool.delete("build1")
        let reads = origin.reads
        _ = try pool.clone("c@golden", as: "build2")
        #expect(try pool.read("build2", at: 0, count: 300_000) == Array(origin.bytes[0..<300_000]), "the first build's writes stayed its own")
        #expect(try pool.read("build2", at: 409_600, count: 4096) == Array(origin.bytes[409_600..<413_696]))
        #expect(origin.reads == reads, "the second clone fetched nothing the first one fetched")
        #expect(try pool.read("c", at: 4096, count: 200_000) == Array(origin.bytes[4096..<204_096]))
        #expect(origin.reads == reads, "the source volume has the blocks too")
        #expect(pool.checkProblems() == nil)
    }

    @Test func aWholeBlockAClonesOverwritesIsStillFetchedForItsSource() throws {
        let (pool, origin, _) = try setUp()
        _ = try pool.snapshot("c@golden")
        _ = try pool.clone("c@golden", as: "build1")
        try pool.write("build1", at: 50 * 4096, [UInt8](repeating: 7, count: 3 * 4096))
        pool.originWarmer.drain()
        #expect(origin.reads == 3, "the three blocks, fetched behind the write for the source")
        #expect(try pool.read("build1", at: 50 * 4096, count: 3 * 4096) == [UInt8](repeating: 7, count: 3 * 4096))
        _ = try pool.clone("c@golden", as: "build2")
        #expect(try pool.read("build2", at: 50 * 4096, count: 3 * 4096) == Array(origin.bytes[50 * 4096..<53 * 4096]))
        #expect(origin.reads == 3, "the next clone finds them local")
        // A volume with no ancestor on the origin has nothing to warm.
        try pool.write("c", at: 80 * 4096, [UInt8](repeating: 1, count: 4096))
        pool.originWarmer.drain()
        #expect(origin.reads == 3)
        #expect(pool.checkProblems() == nil)
    }

    @Test func blocksTheOriginSaysAreZerosAreNotFetched() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 16 << 20, blockSize: 4096, metadataSize: 4 << 20)
        // Zeros from the middle of block 2 to the middle of block 10: blocks 3-9 whole.
        let origin = MemoryOrigin(size: 1 << 20, seed: 5, zeros: 10_000..<43_000)
        pool.setOriginOpener(origin)
        try pool.createOriginClone("c", origin: origin.record)
        #expect(try pool.read("c", at: 0, count: 65536) == Array(origin.bytes[0..<65536]))
        #expect(origin.bytesRead == UInt64(16 - 7) * 4096, "blocks 3-9 were not read from the origin")
        #expect(pool.originStatistics.fetchedBytes == origin.bytesRead)
        pool.originStore.drain()
        #expect(try pool.volumeInfo("c").mappedBytes == 65536, "the zero blocks are kept too (as metadata)")
        #expect(try pool.read("c", at: 0, count: 65536) == Array(origin.bytes[0..<65536]))
        #expect(pool.checkProblems() == nil)
    }

    /// Holds the store worker until the returned semaphore is signalled, so that fetched
    /// blocks stay unmapped as long as a test needs.
    func holdStores(_ pool: Pool) -> DispatchSemaphore {
        let release = DispatchSemaphore(value: 0)
        pool.originStore.submit { release.wait() }
        return release
    }

    @Test func readsThatDoNotLineUpWithBlocksFetchEachBlockOnce() throws {
        let (pool, origin, _) = try setUp()
        let release = holdStores(pool)
        // 32 KiB reads from 1 KiB in: every read shares a block with the one before, and
        // no fetched block is stored yet when the next read comes.
        for step in 0..<16 {
            let offset = 1024 + step * 32768
            #expect(try pool.read("c", at: UInt64(offset), count: 32768) == Array(origin.bytes[offset..<offset + 32768]))
        }
        let blocks = (1024 + 16 * 32768 + 4095) / 4096
        #expect(origin.bytesRead == UInt64(blocks * 4096), "each block fetched once, though unstored")
        #expect(pool.originInFlight.count == blocks, "fetched blocks wait for their store")
        release.signal()
        pool.originStore.drain()
        #expect(pool.originInFlight.count == 0, "stored blocks are forgotten")
        #expect(try pool.read("c", at: 0, count: blocks * 4096) == Array(origin.bytes[0..<blocks * 4096]))
        #expect(origin.bytesRead == UInt64(blocks * 4096), "and read locally after")
        #expect(pool.checkProblems() == nil)
    }

    @Test func requestsThatOverlapWaitForOneFetchAcrossClonesOfTheSameOrigin() throws {
        let (pool, origin, _) = try setUp()
        _ = try pool.snapshot("c@golden")
        _ = try pool.clone("c@golden", as: "build1")
        _ = try pool.clone("c@golden", as: "build2")
        let release = holdStores(pool)
        origin.setDelay(microseconds: 200_000)
        let results = LockedValue([String: [UInt8]]())
        let group = DispatchGroup()
        for (index, name) in ["c", "build1", "build2", "c@golden"].enumerated() {
            DispatchQueue.global().async(group: group) {
                usleep(UInt32(index) * 20_000)
                let bytes = try? pool.read(name, at: 8192, count: 65536)
                results.withLockedValue { $0[name] = bytes }
            }
        }
        group.wait()
        for name in ["c", "build1", "build2", "c@golden"] {
            #expect(results.withLockedValue { $0[name] } == Array(origin.bytes[8192..<73728]), "\(name)")
        }
        #expect(origin.bytesRead == 65536, "four overlapping requests, one fetch")
        release.signal()
        pool.originStore.drain()
        #expect(pool.originInFlight.count == 0)
        #expect(pool.checkProblems() == nil)
    }

    @Test func aFailedFetchLeavesNothingClaimedAndTheNextRequestFetchesItself() throws {
        let (pool, origin, _) = try setUp()
        origin.setDown(true)
        #expect(throws: PoolError.self) { try pool.read("c", at: 4096, count: 8192) }
        #expect(pool.originInFlight.count == 0, "a failed fetch leaves no block for others to wait on")
        origin.setDown(false)
        // Past the reconnect backoff a failed read starts.
        let deadline = SystemInfo.monotonicNanoseconds() + 5_000_000_000
        var bytes: [UInt8]? = nil
        while bytes == nil && SystemInfo.monotonicNanoseconds() < deadline {
            bytes = try? pool.read("c", at: 4096, count: 8192)
            if bytes == nil { usleep(50_000) }
        }
        #expect(bytes == Array(origin.bytes[4096..<12288]))
        pool.originStore.drain()
        #expect(pool.originInFlight.count == 0)
    }

    @Test func zerosInAnOriginBackedImageShareOneBlockAndWritesOverThemCopy() throws {
        let device = MemoryDevice(size: 0)
        let origin = MemoryOrigin(size: 4 << 20, seed: 12, zeros: 0..<(1 << 20))
        let blocks = 1024
        var expected = origin.bytes
        do {
            // 2 MiB of data space for a 4 MiB image: zeros must not take space.
            let pool = try Pool.create(on: device, geometry: PoolGeometry(dataSize: 2 << 20, blockSize: 4096, metadataSize: 4 << 20))
            pool.setOriginOpener(origin)
            try pool.createOriginClone("c", origin: origin.record)
            let id = try pool.volumeID("c")
            let used = pool.info().dataUsedBytes
            // The first MiB, zeros at the origin, read and stored; the rest trimmed and zeroed.
            #expect(try pool.read("c", at: 0, count: 1 << 20) == Array(expected[0..<(1 << 20)]))
            pool.originStore.drain()
            try pool.trim(id, at: 1 << 20, count: 2 << 20)
            try pool.writeZeroes(id, at: 3 << 20, count: 1 << 20, mayUnmap: true)
            expected.replaceSubrange((1 << 20)..<(4 << 20), with: [UInt8](repeating: 0, count: 3 << 20))
            #expect(try pool.volumeInfo("c").mappedBytes == UInt64(blocks * 4096), "every block is local")
            #expect(pool.info().dataUsedBytes - used == 4096, "one shared zero block")
            // Writes over shared zeros copy: whole blocks, parts of blocks, in a snapshot's clone too.
            _ = try pool.snapshot("c@z")
            try pool.write("c", at: 4096, [UInt8](repeating: 1, count: 4096))
            try pool.write("c", at: 2_000_000, [UInt8](repeating: 2, count: 100))
            expected.replaceSubrange(4096..<8192, with: [UInt8](repeating: 1, count: 4096))
            expected.replaceSubrange(2_000_000..<2_000_100, with: [UInt8](repeating: 2, count: 100))
            #expect(try pool.read("c", at: 0, count: 4 << 20) == expected)
            #expect(try pool.read("c@z", at: 0, count: 4 << 20) == [UInt8](repeating: 0, count: 4 << 20), "the snapshot still reads zeros")
            #expect(origin.bytesRead == 0, "nothing was read from the origin: it said zeros")
            #expect(pool.checkProblems() == nil)
            try pool.flush()
        }
        // Reopened: the old zero block is an ordinary shared block; new zeros get a new one.
        let reopened = try Pool.open(device: device)
        reopened.setOriginOpener(origin)
        let id = try reopened.volumeID("c")
        try reopened.write("c", at: 8192, [UInt8](repeating: 3, count: 8192))
        try reopened.trim(id, at: 8192, count: 8192)
        expected.replaceSubrange(8192..<16384, with: [UInt8](repeating: 0, count: 8192))
        try reopened.delete("c@z")
        #expect(try reopened.read("c", at: 0, count: 4 << 20) == expected)
        #expect(reopened.checkProblems() == nil)
    }

    @Test func aFreedZeroBlockIsForgottenAndNeverHandedOutAsZeros() throws {
        let (pool, _, id) = try setUp()
        try pool.trim(id, at: 0, count: 8192)
        #expect(pool.lockedSpaceMapZeroBlock() != nil)
        // Rewriting both blocks drops every reference to the zero block: it is forgotten,
        // and may hold data once reallocated.
        try pool.write("c", at: 0, [UInt8](repeating: 4, count: 8192))
        try pool.flush()
        #expect(pool.lockedSpaceMapZeroBlock() == nil)
        try pool.write("c", at: 65536, [UInt8](repeating: 5, count: 4096 * 8))
        try pool.trim(id, at: 16384, count: 4096)
        #expect(try pool.read("c", at: 16384, count: 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(try pool.read("c", at: 65536, count: 4096 * 8) == [UInt8](repeating: 5, count: 4096 * 8))
        #expect(pool.checkProblems() == nil)
    }
}

extension OriginTests {
    @Test func hydratingAnImageWithHolesFetchesItsDataInRunsAndSharesOneZeroBlock() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 16 << 20, blockSize: 4096, metadataSize: 4 << 20)
        // 8 MiB with 6 MiB the origin says are zeros: hydration must fit in 16 MiB with room.
        let origin = MemoryOrigin(size: 8 << 20, seed: 8, zeros: (1 << 20)..<(7 << 20))
        pool.setOriginOpener(origin)
        try pool.createOriginClone("c", origin: origin.record)
        let used = pool.info().dataUsedBytes
        let step = try pool.hydrate("c", window: 0..<UInt64.max)
        #expect(step.complete)
        #expect(step.fetchedBytes == 2 << 20, "only the data is fetched, and counted")
        #expect(origin.bytesRead == 2 << 20)
        #expect(origin.reads <= 2 * ((1 << 20) / (4 << 20) + 1), "in runs of up to 4 MiB, not block by block: \(origin.reads)")
        #expect(pool.info().dataUsedBytes - used == (2 << 20) + 4096, "the data and one zero block")
        #expect(try pool.read("c", at: 0, count: 8 << 20) == origin.bytes)
        #expect(pool.checkProblems() == nil)
    }

    @Test func theZeroBlockIsNeverWrittenInPlaceEvenWithOneReference() throws {
        let (pool, origin, id) = try setUp()
        try pool.trim(id, at: 0, count: 4096)
        // One mapping holds the zero block; a partial write over it must copy, not write it.
        try pool.write("c", at: 100, [UInt8](repeating: 6, count: 100))
        try pool.trim(id, at: 5 * 4096, count: 4096)
        #expect(try pool.read("c", at: 5 * 4096, count: 4096) == [UInt8](repeating: 0, count: 4096))
        var expected = [UInt8](repeating: 0, count: 4096)
        expected.replaceSubrange(100..<200, with: [UInt8](repeating: 6, count: 100))
        #expect(try pool.read("c", at: 0, count: 4096) == expected)
        #expect(origin.bytesRead == 0)
        #expect(pool.checkProblems() == nil)
    }
}

extension Pool {
    /// The shared zero block, read under the pool lock (for tests).
    func lockedSpaceMapZeroBlock() -> UInt64? {
        (try? lock.withSharedAccess { state throws(PoolError) in state.spaceMap.sharedZeroBlock }) ?? nil
    }
}
