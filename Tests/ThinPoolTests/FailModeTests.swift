import Testing
import ThinFormat
import ThinPool
import ThinSystem

/// A committed pool with two volumes, and the mapping leaf of `x` (its whole tree:
/// x maps a few blocks, so its root is one leaf that no other volume shares).
func poolWithDamageableLeaf() throws -> (device: MemoryDevice, leaf: UInt64) {
    let (device, added) = try blocksAdded(after: "y") { pool in
        try pool.createVolume("x", size: 1 << 20)
        try pool.write("x", at: 0, pattern(3 * 4096, seed: 2))
    }
    let leaves = mappingNodes(in: device, among: added, level: 0)
    #expect(leaves.count == 1, "x's mapping leaves: \(leaves)")
    return (device, try #require(leaves.first))
}

/// A pool with volume `base` (64 KiB written, committed); then `change` runs and the pool
/// is closed. Returns the device and the metadata blocks `change` added (as a reopened
/// pool counts them).
func blocksAdded(after base: String, _ change: (Pool) throws -> Void) throws -> (MemoryDevice, Set<UInt64>) {
    let (pool, device) = try makeMemoryPool(dataSize: 8 << 20)
    try pool.createVolume(base, size: 1 << 20)
    try pool.write(base, at: 0, pattern(64 << 10, seed: 1))
    try pool.commit()
    let before = Set(pool.metadataBlocksInUse())
    try change(pool)
    try pool.close()
    let reopened = try Pool.open(device: device)
    defer { try? reopened.close() }
    return (device, Set(reopened.metadataBlocksInUse()).subtracting(before))
}

/// The mapping-tree nodes of a level among `blocks` (read from the device's pages).
func mappingNodes(in device: MemoryDevice, among blocks: Set<UInt64>, level: UInt64) -> [UInt64] {
    blocks.filter { block in
        field(of: device, block: block, offset: 8, width: 2) == UInt64(BlockType.mappingNode.rawValue)
            && field(of: device, block: block, offset: 10, width: 2) == level
    }.sorted()
}

@Suite struct FailModeTests {
    /// The reported bug's shape: a mapping that points past the data region, with a valid
    /// CRC. Reading it fails that request only; the pool stops changing; everything else
    /// still reads; the flag makes the next read-write open insist on a check.
    @Test func damagedMappingFailsThatReadAndPutsThePoolInFailMode() throws {
        let (device, leaf) = try poolWithDamageableLeaf()
        // Entry 1's value: x's second block now maps far past the pool's data blocks.
        let valueOffset = 32 + 8 * NodeView.capacity + 8
        rewriteField(of: device, block: leaf, offset: valueOffset, width: 8) { _ in 1 << 40 }

        let pool = try Pool.open(device: device)
        #expect(pool.failure == nil)
        let seen = LockedValue<[String]>([])
        pool.onFailure { failure in seen.withLockedValue { $0.append(failure.reason) } }
        // The undamaged block of x and all of y read; the damaged block is an error.
        #expect(try pool.read("x", at: 0, count: 4096) == Array(pattern(3 * 4096, seed: 2)[0..<4096]))
        #expect(throws: PoolError.self) { try pool.read("x", at: 4096, count: 4096) }
        let failure = try #require(pool.failure)
        #expect(failure.reason.contains("corrupt block \(leaf)"), "\(failure.reason)")
        #expect(seen.withLockedValue { $0 } == [failure.reason], "the handler runs once")
        #expect(try pool.read("y", at: 0, count: 64 << 10) == pattern(64 << 10, seed: 1))
        #expect(pool.info().state == "failed")
        // Nothing changes any more, on any volume, and nothing is committed.
        let generation = pool.generation
        #expect {
            try pool.write("y", at: 0, [1, 2, 3])
        } throws: { error in
            guard case .failed = error as? PoolError else { return false }
            return true
        }
        #expect(throws: PoolError.self) { try pool.createVolume("z", size: 1 << 20) }
        #expect(throws: PoolError.self) { try pool.snapshot("y@after") }
        #expect(throws: PoolError.self) { try pool.flush() }
        _ = try? pool.read("x", at: 4096, count: 4096)
        #expect(seen.withLockedValue { $0.count } == 1)
        try pool.close()

        // The superblock is flagged: read-write needs a check or force; read-only opens.
        #expect {
            try Pool.open(device: device)
        } throws: { error in
            guard case .needsCheck = error as? PoolError else { return false }
            return "\(error)".contains("check --repair")
        }
        let readOnly = try Pool.open(device: device, readOnly: true)
        #expect(readOnly.needsCheck)
        #expect(readOnly.info().state == "needs-check")
        #expect(readOnly.generation == generation + 1, "only the flag was written")
        #expect(try readOnly.read("y", at: 0, count: 64 << 10) == pattern(64 << 10, seed: 1))
        try readOnly.close()
        // A repair that cannot fix the damage leaves the flag on.
        let forced = try Pool.open(device: device, force: true)
        #expect(!forced.check(repair: true).damage.isEmpty)
        try forced.close()
        #expect(throws: PoolError.self) { try Pool.open(device: device) }
    }

    @Test func repairWithoutDamageClearsTheFlag() throws {
        let (device, leaf) = try poolWithDamageableLeaf()
        let valueOffset = 32 + 8 * NodeView.capacity + 8
        let good = rewriteField(of: device, block: leaf, offset: valueOffset, width: 8) { _ in 1 << 40 }
        let pool = try Pool.open(device: device)
        _ = try? pool.read("x", at: 4096, count: 4096)
        #expect(pool.failure != nil)
        try pool.close()
        // Someone fixes the block by hand; the flag stays until a check says so.
        rewriteField(of: device, block: leaf, offset: valueOffset, width: 8) { _ in good }
        #expect(throws: PoolError.self) { try Pool.open(device: device) }
        let forced = try Pool.open(device: device, force: true)
        let report = forced.check(repair: true)
        #expect(report.damage.isEmpty, "\(report.damage)")
        #expect(!forced.needsCheck)
        try forced.close()
        let reopened = try Pool.open(device: device)
        #expect(reopened.info().state == "ok")
        try reopened.write("x", at: 4096, [9])
        try reopened.close()
    }

    /// A live check that finds damage in the last commit stops commits too.
    @Test func liveCheckThatFindsDamageEntersFailMode() throws {
        let (device, leaf) = try poolWithDamageableLeaf()
        rewriteField(of: device, block: leaf, offset: 32 + 8 * NodeView.capacity + 8, width: 8) { _ in 1 << 40 }
        let pool = try Pool.open(device: device)
        #expect(!pool.checkCommittedState().damage.isEmpty)
        #expect(pool.failure?.reason.hasPrefix("check found:") == true)
        #expect(throws: PoolError.self) { try pool.write("y", at: 0, [1]) }
        try pool.close()
    }

    /// The old bug: a snapshot whose commit failed was still in memory, and the next
    /// commit (auto-commit, FLUSH, close) made it durable although it had been reported
    /// as failed. Now the failed commit puts the pool in fail mode: nothing more is
    /// committed, and the pool reopens in its last commit.
    @Test(arguments: [SystemError.Code.io, .noSpace])
    func failedCommitNeverBecomesDurableLater(code: SystemError.Code) throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        try pool.write("v", at: 0, [1, 2, 3])
        try pool.commit()
        device.failWrites(1, with: code)
        #expect(throws: PoolError.self) { try pool.snapshot("v@s") }
        #expect(pool.failure?.kind == .commitFailed)
        // The device works again; nothing may commit the snapshot now.
        #expect {
            try pool.flush()
        } throws: { error in
            guard case .failed = error as? PoolError else { return false }
            return true
        }
        #expect(throws: PoolError.self) { try pool.write("v", at: 0, [9]) }
        try pool.commitInBackground()
        #expect(try pool.read("v", at: 0, count: 3) == [1, 2, 3], "reads go on")
        try pool.close()
        let reopened = try Pool.open(device: device)
        #expect((try? reopened.volumeInfo("v@s")) == nil, "the failed snapshot became durable")
        #expect(!reopened.needsCheck, "a failed commit is not damage: no check needed")
        #expect(try reopened.read("v", at: 0, count: 3) == [1, 2, 3])
        #expect(reopened.checkProblems() == nil)
        try reopened.write("v", at: 0, [4])
        try reopened.close()
    }

    /// A failed barrier (fdatasync) may have dropped the data it was to sync: the FLUSH
    /// that asked for it fails, and so does every later one.
    @Test func failedBarrierFailsThisAndEveryLaterFlush() throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        try pool.write("v", at: 0, [1])
        try pool.commit()
        try pool.write("v", at: 0, [2])  // in place: the flush is a barrier alone
        device.failBarriers(1)
        #expect(throws: PoolError.self) { try pool.flush() }
        #expect(throws: PoolError.self) { try pool.flush() }
        #expect(pool.failure?.kind == .commitFailed)
        try pool.close()
    }

    /// Damage the open-time walk meets (an interior node of one volume's tree) leaves the
    /// pool openable: the other volume and the undamaged ranges read, in fail mode.
    @Test(arguments: [false, true])
    func damagedInteriorNodeOpensInFailModeAndServesTheRest(readOnly: Bool) throws {
        let (device, added) = try blocksAdded(after: "y") { pool in
            try pool.createVolume("x", size: 4 << 20)
            // 600 mapped blocks: more than one leaf, so x's root is an interior node.
            for i in 0..<600 { try pool.write("x", at: UInt64(i) * 4096, [UInt8(i % 250 + 1)]) }
        }
        let roots = mappingNodes(in: device, among: added, level: 1)
        let root = try #require(roots.count == 1 ? roots.first : nil, "x's interior nodes: \(roots)")
        let firstChildKeyOfSecond = field(of: device, block: root, offset: 32 + 8, width: 8)
        rewriteField(of: device, block: root, offset: 32 + 8 * NodeView.capacity + 8, width: 8) { _ in 1 << 40 }

        let damaged = try Pool.open(device: device, readOnly: readOnly)
        let failure = try #require(damaged.failure, "open found the damage but did not enter fail mode")
        #expect(failure.reason.contains("x:"), "\(failure.reason)")
        #expect(damaged.info().state == "failed")
        #expect(try damaged.read("y", at: 0, count: 64 << 10) == pattern(64 << 10, seed: 1))
        #expect(try damaged.read("x", at: 0, count: 1) == [1])
        #expect(throws: PoolError.self) { try damaged.read("x", at: firstChildKeyOfSecond * 4096, count: 1) }
        #expect(!damaged.check().damage.isEmpty)
        #expect(throws: PoolError.self) { try damaged.write("y", at: 0, [1]) }
        try damaged.close()
    }

    /// A record whose name holds a NUL byte (valid CRC): the volume is left out rather
    /// than listed, printed or served under a name no rule allows.
    @Test func recordWithAControlByteInItsNameIsLeftOut() throws {
        let (device, added) = try blocksAdded(after: "good") { pool in try pool.createVolume("bad", size: 1 << 20) }
        let records = added.filter { field(of: device, block: $0, offset: 8, width: 2) == UInt64(BlockType.volumeRecord.rawValue) }
        let record = try #require(records.count == 1 ? records.first : nil, "\(records)")
        rewriteField(of: device, block: record, offset: 96 + 1, width: 1) { _ in 0 }  // "b\0d"

        let damaged = try Pool.open(device: device, readOnly: true)
        #expect(damaged.listVolumes().map(\.name) == ["good"])
        #expect(damaged.failure?.reason.contains("control character") == true, "\(String(describing: damaged.failure))")
        #expect(damaged.check().damage.contains { $0.contains("control character") })
        try damaged.close()
    }
}
