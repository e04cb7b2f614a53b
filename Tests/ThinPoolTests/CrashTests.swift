import Testing
import ThinPool
import ThinSystem

/// One deterministic workload, run until the simulated power cut.
struct CrashWorkload {
    let blockSize = 4096
    var pool: Pool
    let device: MemoryDevice
    var rng: SplitMix64
    var model: [String: [UInt8]] = [:]
    /// The model at the last commit that returned.
    var committed: [String: [UInt8]] = [:]
    var committedGeneration: UInt64
    /// The model a commit in progress would make durable.
    var attempted: [String: [UInt8]]?
    /// Contents each block took since the last commit, per volume: after a crash a
    /// block touched since the commit may show any of them, byte by byte.
    var touched: [String: [Int: [[UInt8]]]] = [:]
    var step = 0
    /// Some commits are the auto-commit's (`commitInBackground`, lighter barriers).
    let autoCommits: Bool
    /// Generations the auto-commit made since the last full commit, and the one it was
    /// making when power went: after a crash in either, blocks touched since the last
    /// full commit may show any of their versions (data overwritten in place waits for
    /// a FLUSH), and everything else must be as committed.
    var autoCommitGenerations: Set<UInt64> = []
    var latestGeneration: UInt64

    init(seed: UInt64, cutAtWrite: Int?, cutAtBarrier: Int? = nil, autoCommits: Bool = false) throws {
        self.autoCommits = autoCommits
        rng = SplitMix64(seed: seed)
        (pool, device) = try makeMemoryPool(dataSize: 2 << 20, blockSize: UInt32(blockSize))
        for name in ["a", "b"] {
            try pool.createVolume(name, size: 96 << 10)
            model[name] = [UInt8](repeating: 0, count: 96 << 10)
        }
        committed = model
        committedGeneration = pool.generation
        latestGeneration = committedGeneration
        if let cutAtWrite { device.cutPower(atWrite: cutAtWrite) }
        if let cutAtBarrier { device.cutPower(atBarrier: cutAtBarrier) }
    }

    mutating func random(_ n: Int) -> Int { Int(rng.next() % UInt64(max(n, 1))) }

    mutating func pickWritable() -> String {
        let names = model.keys.filter { !$0.contains("@") }.sorted()
        return names[random(names.count)]
    }

    mutating func noteTouched(_ name: String, _ range: Range<Int>) {
        let bytes = model[name]!
        for block in (range.lowerBound / blockSize)...((range.upperBound - 1) / blockSize) {
            let start = block * blockSize
            touched[name, default: [:]][block, default: []].append(Array(bytes[start..<min(start + blockSize, bytes.count)]))
        }
    }

    mutating func committedNow() {
        committed = model
        committedGeneration = pool.generation
        latestGeneration = committedGeneration
        autoCommitGenerations = []
        attempted = nil
        touched = [:]
    }

    /// Runs one operation; throws when the device lost power.
    mutating func runStep() throws {
        step += 1
        let choice = random(20)
        let name = pickWritable()
        let size = model[name]!.count
        let offset = random(size - 1)
        let length = 1 + random(min(size - offset, 3 * blockSize) - 1)
        switch choice {
        case 0..<9:
            let data = pattern(length, seed: rng.next())
            model[name]!.replaceSubrange(offset..<offset + length, with: data)
            noteTouched(name, offset..<offset + length)
            try pool.write(name, at: UInt64(offset), data)
        case 9..<11:
            model[name]!.replaceSubrange(offset..<offset + length, with: [UInt8](repeating: 0, count: length))
            noteTouched(name, offset..<offset + length)
            try pool.writeZeroes(pool.volumeID(name), at: UInt64(offset), count: UInt64(length))
        case 11:
            let first = (offset + blockSize - 1) / blockSize * blockSize
            let end = (offset + length) / blockSize * blockSize
            if first < end {
                model[name]!.replaceSubrange(first..<end, with: [UInt8](repeating: 0, count: end - first))
                noteTouched(name, first..<end)
            }
            try pool.trim(pool.volumeID(name), at: UInt64(offset), count: UInt64(length))
        case 14 where autoCommits:
            autoCommitGenerations.insert(latestGeneration + 1)
            try pool.commitInBackground()
            latestGeneration = pool.generation
            autoCommitGenerations = autoCommitGenerations.filter { $0 <= latestGeneration }
        case 12..<15:
            attempted = model
            try pool.commit()
            committedNow()
        case 15, 16:
            let snap = "\(name)@s\(step)"
            var next = model
            next[snap] = model[name]
            attempted = next
            try pool.snapshot(snap)
            model = next
            committedNow()
        case 17:
            let clone = "c\(step)"
            guard model.count < 10 else { return }
            var next = model
            next[clone] = model[name]
            attempted = next
            try pool.clone(name, as: clone)
            model = next
            committedNow()
        default:
            let victims = model.keys.filter { $0.contains("@") || $0.hasPrefix("c") }.sorted()
            guard !victims.isEmpty else { return }
            let victim = victims[random(victims.count)]
            var next = model
            next[victim] = nil
            attempted = next
            try pool.delete(victim)
            model = next
            committedNow()
        }
    }

    /// How many device writes and barriers `steps` operations of this seed make, run
    /// once without faults (the points the fault and power-cut tests aim at).
    static func dryRun(seed: UInt64, steps: Int, autoCommits: Bool = false) throws -> (writes: Int, barriers: Int) {
        var dry = try CrashWorkload(seed: seed, cutAtWrite: nil, autoCommits: autoCommits)
        let (writes, barriers) = (dry.device.writeCount, dry.device.barrierCount)
        for _ in 0..<steps { try dry.runStep() }
        return (dry.device.writeCount - writes, dry.device.barrierCount - barriers)
    }

    /// Reopens the crashed image and checks it against the model.
    func verifyAfterCrash(seed: UInt64, keepVolatile: Double) throws -> String? {
        let image = device.imageAfterCrash(seed: seed, keepVolatile: keepVolatile)
        let reopened: Pool
        do {
            reopened = try Pool.open(device: image)
        } catch {
            return "open after crash failed: \(error)"
        }
        if let problems = reopened.checkProblems() { return "check after crash: \(problems)" }
        let generation = reopened.generation
        let expected: [String: [UInt8]]
        var allowTouched = false
        if generation == committedGeneration || autoCommitGenerations.contains(generation) {
            expected = committed
            allowTouched = true
        } else if generation == latestGeneration + 1, let attempted {
            expected = attempted
        } else {
            return "generation \(generation) after crash, last commit \(latestGeneration)"
        }
        let names = Set(reopened.listVolumes().map(\.name))
        guard names == Set(expected.keys) else { return "volumes \(names.sorted()) expected \(expected.keys.sorted())" }
        for (name, bytes) in expected {
            let actual = try reopened.read(name, at: 0, count: bytes.count)
            if actual == bytes { continue }
            guard allowTouched, let blocks = touched[name] else { return "\(name) lost committed data" }
            for i in 0..<bytes.count where actual[i] != bytes[i] {
                let block = i / blockSize
                let inner = i % blockSize
                guard let versions = blocks[block], versions.contains(where: { $0[inner] == actual[i] }) else {
                    return "\(name) byte \(i) is \(actual[i]): neither the committed value \(bytes[i]) nor a later write"
                }
            }
        }
        // The pool stays usable after recovery.
        try reopened.createVolume("after-crash", size: 1 << 20)
        try reopened.write("after-crash", at: 0, [1, 2, 3])
        try reopened.commit()
        return reopened.checkProblems()
    }
}

@Suite struct CrashTests {
    static let steps = 100

    /// Cuts power at 240 points spread over a workload's write stream, keeping none, some
    /// or all of the writes since the last barrier; every reopen must be clean and hold
    /// exactly the committed data.
    @Test func powerCutAtManyPointsKeepsCommittedData() throws {
        let seed: UInt64 = 42
        let totalWrites = try CrashWorkload.dryRun(seed: seed, steps: Self.steps).writes
        #expect(totalWrites > 240)

        var failures: [String] = []
        var cutsThatHit = 0
        for point in 0..<240 {
            let cut = 1 + point * totalWrites / 240
            var run = try CrashWorkload(seed: seed, cutAtWrite: cut)
            for _ in 0..<Self.steps {
                do {
                    try run.runStep()
                } catch {
                    break
                }
            }
            if run.device.powerIsCut { cutsThatHit += 1 }
            let keep = [0.0, 0.5, 1.0][point % 3]
            if let failure = try run.verifyAfterCrash(seed: UInt64(point), keepVolatile: keep) {
                failures.append("cut at write \(cut) (keep \(keep)): \(failure)")
            }
        }
        #expect(cutsThatHit >= 200)
        #expect(failures.isEmpty, "\(failures.prefix(5).joined(separator: "\n"))")
    }

    /// Cuts power at every barrier of the workload: the window between writing metadata
    /// and the superblock, and between the superblock and its barrier.
    @Test func powerCutAtEveryBarrierKeepsCommittedData() throws {
        let seed: UInt64 = 43
        let barriers = try CrashWorkload.dryRun(seed: seed, steps: Self.steps).barriers
        #expect(barriers > 30)
        var failures: [String] = []
        for cut in 1...barriers {
            for keep in [0.3, 0.7] {
                var run = try CrashWorkload(seed: seed, cutAtWrite: nil, cutAtBarrier: cut)
                for _ in 0..<Self.steps {
                    do { try run.runStep() } catch { break }
                }
                #expect(run.device.powerIsCut)
                if let failure = try run.verifyAfterCrash(seed: UInt64(cut) * 31 + UInt64(keep * 10), keepVolatile: keep) {
                    failures.append("cut at barrier \(cut) (keep \(keep)): \(failure)")
                }
            }
        }
        #expect(failures.isEmpty, "\(failures.prefix(5).joined(separator: "\n"))")
    }

    /// The workload with some of its commits made by the auto-commit, whose lighter
    /// barriers make durable only what it maps: power is cut at 160 writes and at every
    /// barrier. Each reopen must be clean, in a commit that was made or under way, with
    /// committed data intact and touched blocks showing one of their versions.
    @Test func powerCutsAmongAutoCommitsKeepCommittedData() throws {
        let seed: UInt64 = 46
        let (totalWrites, barriers) = try CrashWorkload.dryRun(seed: seed, steps: Self.steps, autoCommits: true)
        var failures: [String] = []
        var cuts: [(write: Int?, barrier: Int?)] = (0..<160).map { (1 + $0 * totalWrites / 160, nil) }
        cuts += (1...barriers).map { (nil, $0) }
        var sawAutoCommitGeneration = false
        for (index, cut) in cuts.enumerated() {
            var run = try CrashWorkload(seed: seed, cutAtWrite: cut.write, cutAtBarrier: cut.barrier, autoCommits: true)
            for _ in 0..<Self.steps {
                do { try run.runStep() } catch { break }
            }
            let keep = [0.0, 0.5, 1.0][index % 3]
            if let failure = try run.verifyAfterCrash(seed: UInt64(index), keepVolatile: keep) {
                failures.append("cut at \(cut) (keep \(keep)): \(failure)")
            }
            if !run.autoCommitGenerations.isEmpty { sawAutoCommitGeneration = true }
        }
        #expect(sawAutoCommitGeneration, "no cut fell after an auto-commit")
        #expect(failures.isEmpty, "\(failures.prefix(5).joined(separator: "\n"))")
    }

    /// Two volumes share a block in the last commit. One stops sharing it (by writing or
    /// trimming); the other then writes it. That write must not land in place, or a
    /// crash would show it in the first volume, which never wrote it.
    @Test(arguments: [false, true])
    func blockSharedInLastCommitIsNeverOverwrittenInPlace(trimFirst: Bool) throws {
        let (pool, device) = try makeMemoryPool()
        let original = pattern(4096, seed: 1)
        try pool.createVolume("a", size: 64 << 10)
        try pool.write("a", at: 0, original)
        try pool.clone("a", as: "c")
        let a = try pool.volumeID("a")
        if trimFirst {
            try pool.trim(a, at: 0, count: 4096)
        } else {
            try pool.write("a", at: 0, pattern(4096, seed: 2))
        }
        try pool.write("c", at: 0, pattern(4096, seed: 3))
        let reopened = try Pool.open(device: device.imageAfterCrash(seed: 1, keepVolatile: 1.0))
        #expect(try reopened.read("a", at: 0, count: 4096) == original)
        #expect(try reopened.read("c", at: 0, count: 4096) == original)
        #expect(reopened.checkProblems() == nil)
    }

    /// Writes after the N-th are silently lost (a lying device): open must refuse or
    /// present a consistent older state, never crash.
    @Test func droppedWritesNeverCrashOpen() throws {
        for n in stride(from: 0, to: 120, by: 7) {
            var run = try CrashWorkload(seed: 7, cutAtWrite: nil)
            run.device.dropWrites(after: n)
            for _ in 0..<40 { try? run.runStep() }
            do {
                let reopened = try Pool.open(device: run.device.snapshot())
                _ = reopened.check()
            } catch {
                #expect(!error.description.isEmpty)
            }
        }
    }
}

/// A failing device under the crash workload's random operations: the Nth write, or the
/// Nth barrier, fails once (EIO) and the device works again afterwards. The operation
/// that met it fails; the pool written so far then opens in exactly its last commit (or
/// the commit in flight, when its superblock landed before a later barrier failed), with
/// only acknowledged or failed-and-retried writes on top of it in blocks written since,
/// and `check` is clean.
@Suite struct FaultInjectionTests {
    static let steps = 100

    func runUntilFailure(_ run: inout CrashWorkload) -> Bool {
        for _ in 0..<Self.steps {
            do {
                try run.runStep()
            } catch {
                return true
            }
        }
        return false
    }

    @Test func everyFailedWriteLeavesTheLastCommit() throws {
        let seed: UInt64 = 44
        let totalWrites = try CrashWorkload.dryRun(seed: seed, steps: Self.steps).writes
        var failures: [String] = []
        var hits = 0
        for n in stride(from: 1, through: totalWrites, by: max(1, totalWrites / 300)) {
            var run = try CrashWorkload(seed: seed, cutAtWrite: nil)
            run.device.failWrite(number: n)
            if runUntilFailure(&run) { hits += 1 }
            run.pool.abandon()
            if let failure = try run.verifyAfterCrash(seed: UInt64(n), keepVolatile: 1.0) {
                failures.append("write \(n) failed: \(failure)")
            }
        }
        #expect(hits > 200, "only \(hits) injected failures were met")
        #expect(failures.isEmpty, "\(failures.prefix(5).joined(separator: "\n"))")
    }

    @Test func everyFailedBarrierLeavesTheLastCommitAndStopsCommits() throws {
        let seed: UInt64 = 45
        let barriers = try CrashWorkload.dryRun(seed: seed, steps: Self.steps).barriers
        #expect(barriers > 30)
        var failures: [String] = []
        for n in 1...barriers {
            var run = try CrashWorkload(seed: seed, cutAtWrite: nil)
            run.device.failBarrier(number: n)
            #expect(runUntilFailure(&run), "barrier \(n) was never met")
            // A failed barrier may have lost what it was to sync: nothing commits now.
            #expect(run.pool.failure?.kind == .commitFailed, "barrier \(n): \(String(describing: run.pool.failure))")
            #expect(throws: PoolError.self) { try run.pool.commit() }
            run.pool.abandon()
            if let failure = try run.verifyAfterCrash(seed: UInt64(n), keepVolatile: 1.0) {
                failures.append("barrier \(n) failed: \(failure)")
            }
        }
        #expect(failures.isEmpty, "\(failures.prefix(5).joined(separator: "\n"))")
    }
}
