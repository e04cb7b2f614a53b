import ThinPool
import ThinSystem

/// A progress line on standard error, drawn only when it is a terminal (scripts and CI
/// logs stay quiet), at most ten times a second.
final class ProgressBar {
    private let label: String
    private let enabled = SystemInfo.isTerminal(2)
    private let started = SystemInfo.monotonicNanoseconds()
    private var lastDrawn: UInt64 = 0

    init(_ label: String) { self.label = label }

    func update(_ done: UInt64, of total: UInt64) {
        guard enabled else { return }
        let now = SystemInfo.monotonicNanoseconds()
        guard done == total || now - lastDrawn >= 100_000_000 else { return }
        lastDrawn = now
        let seconds = Double(now - started) / 1e9
        let rate = seconds > 0 ? UInt64(Double(done) / seconds) : 0
        SystemInfo.writeStandardError(
            "\r\(label) \(usageBar(used: done, total: total, width: 30)) \(percent(done, total)) \(formatBytes(done)) of \(formatBytes(total)), \(formatBytes(rate))/s\u{1B}[K")
    }

    func finish() {
        if enabled { SystemInfo.writeStandardError("\n") }
    }
}
