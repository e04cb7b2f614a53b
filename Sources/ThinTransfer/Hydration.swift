import ThinControl
import ThinPool
import ThinSystem

/// What `thinbd hydrate --json` prints.
public struct HydrationResult: Codable, Sendable, Equatable {
    public var name: String
    /// Bytes fetched from the origin by this run.
    public var fetchedBytes: UInt64
    public var seconds: Double

    enum CodingKeys: String, CodingKey {
        case name, seconds
        case fetchedBytes = "fetched_bytes"
    }
}

extension ImageTransfer {
    /// Fetches every block of origin-backed volume `name` that is still at the origin,
    /// 64 MiB of the volume per step, at most `rate` bytes a second (nil: as fast as
    /// the origin gives them), then drops the origin record. Through the server when it
    /// has the pool (one control request per step, so other commands interleave), else
    /// on the pool opened here. Clients keep using the volume meanwhile.
    public func hydrate(name: String, rate: UInt64?, progress: Progress = { _, _ in }) throws(TransferError) -> HydrationResult {
        let started = SystemInfo.monotonicNanoseconds()
        let step: (Range<UInt64>) throws(TransferError) -> HydrateResult
        var size: UInt64 = 0
        if let server = try server() {
            guard let volume = try server.run(.list, as: [VolumeSummary].self).first(where: { $0.name == name }) else {
                throw TransferError("no such volume or snapshot: \(name)")
            }
            size = volume.size
            step = { (window) throws(TransferError) in try server.run(.hydrate(name: name, window: window), as: HydrateResult.self) }
            return try hydrate(name: name, size: size, rate: rate, started: started, step: step, progress: progress)
        }
        return try withOfflinePool(readOnly: false) { pool throws(TransferError) in
            size = try pooled { () throws(PoolError) in try pool.volumeInfo(name).size }
            let commands = PoolCommands(pool: pool, served: nil)
            let local: (Range<UInt64>) throws(TransferError) -> HydrateResult = { (window) throws(TransferError) in
                do throws(ControlError) {
                    guard case .hydrated(let result) = try commands.run(.hydrate(name: name, window: window)) else {
                        throw ControlError(code: "io", message: "hydrate returned another result")
                    }
                    return result
                } catch {
                    throw TransferError(error.message)
                }
            }
            return try hydrate(name: name, size: size, rate: rate, started: started, step: local, progress: progress)
        }
    }

    private func hydrate(
        name: String, size: UInt64, rate: UInt64?, started: UInt64, step: (Range<UInt64>) throws(TransferError) -> HydrateResult,
        progress: Progress
    ) throws(TransferError) -> HydrationResult {
        let window: UInt64 = 64 << 20
        var fetched: UInt64 = 0
        var offset: UInt64 = 0
        while true {
            let result = try step(offset..<min(offset + window, max(size, 1)))
            fetched += result.fetchedBytes
            offset = min(offset + window, size)
            progress(offset, size)
            if result.complete || offset >= size {
                if !result.complete {
                    // Writes that raced the pass can leave nothing but the final check: one more.
                    let last = try step(0..<0)
                    guard last.complete else {
                        throw TransferError("\(name) still has \(last.remainingBytes) bytes at its origin; run hydrate again")
                    }
                }
                break
            }
            if let rate, rate > 0 {
                // Paced by what was fetched so far against the time it should have taken.
                let due = Double(fetched) / Double(rate) * 1e9
                let elapsed = Double(SystemInfo.monotonicNanoseconds() - started)
                if due > elapsed { SystemInfo.sleep(milliseconds: Int((due - elapsed) / 1e6)) }
            }
        }
        return HydrationResult(name: name, fetchedBytes: fetched, seconds: Double(SystemInfo.monotonicNanoseconds() - started) / 1e9)
    }
}
