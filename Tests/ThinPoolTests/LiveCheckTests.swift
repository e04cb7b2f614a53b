import Foundation
import Testing
import ThinPool
import ThinSystem

/// `checkCommittedState`, the check a served pool runs: it walks a pinned commit from
/// the disk while writers change and commit the pool, and must find it clean every time.
/// Without the pin, blocks of the walked commit are reused by later commits and the walk
/// reads blocks of the wrong type or generation.
@Suite struct LiveCheckTests {
    @Test func committedStateChecksCleanWhileWritersCommit() throws {
        let (pool, _) = try makeMemoryPool(dataSize: 32 << 20, blockSize: 4096, metadataSize: 8 << 20)
        _ = try pool.createVolume("v", size: 16 << 20)
        for i in 0..<4000 { try pool.write("v", at: UInt64(i) * 4096, [UInt8(i % 200 + 1)]) }
        try pool.commit()
        let stop = ThreadFlag()
        let writerDone = DispatchSemaphore(value: 0)
        let writerError = ThreadFlag()
        let writes = Counter()
        DispatchQueue.global().async {
            var rng = SplitMix64(seed: 5)
            var step = 0
            while !stop.isSet {
                do {
                    let offset = (rng.next() % 4000) * 4096
                    try pool.write("v", at: offset, [UInt8(truncatingIfNeeded: rng.next()) | 1])
                    step += 1
                    if step % 2 == 0 { try pool.commit() }
                    if step % 200 == 0 {
                        _ = try pool.snapshot("v@s\(step)")
                        if step % 400 == 0 { try pool.delete("v@s\(step - 200)") }
                    }
                    writes.add()
                } catch {
                    writerError.set()
                    break
                }
            }
            writerDone.signal()
        }
        var checks = 0
        var writesDuringChecks = 0
        // At least 20 checks, and on until the writer has done 1,000 writes (both run
        // freely; a deadline bounds the loop on a starved machine).
        let deadline = Date().addingTimeInterval(60)
        while (checks < 20 || writes.value < 1000) && Date() < deadline {
            let before = writes.value
            let report = pool.checkCommittedState()
            writesDuringChecks += writes.value - before
            #expect(report.isClean, "check \(checks): \((report.damage + report.fixable).prefix(5))")
            #expect(report.volumesChecked >= 1)
            if !report.isClean { break }
            checks += 1
        }
        stop.set()
        writerDone.wait()
        #expect(!writerError.isSet, "the writer failed")
        #expect(writesDuringChecks > 0, "no write completed while the checks ran (\(writes.value) in all)")
        // Every block held for the pinned walks is free again, and the pool is consistent.
        #expect(pool.checkProblems() == nil)
    }
}

final class ThreadFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var flag = false
    var isSet: Bool { lock.withLock { flag } }
    func set() { lock.withLock { flag = true } }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    var value: Int { lock.withLock { count } }
    func add() { lock.withLock { count += 1 } }
}
