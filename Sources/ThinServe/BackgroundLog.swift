import Dispatch
import NIOConcurrencyHelpers
import ThinSystem

/// Standard error for the server's log, written by a thread of its own: a thread that
/// logs (an event loop closing a connection, a worker creating an ephemeral volume while
/// holding its lock) only appends to a queue, so a slow or stalled reader of standard
/// error (a full pipe) never stalls the server. The queue is bounded: past
/// `maximumLines` waiting lines new ones are dropped, and a line saying how many is
/// written once the writer catches up.
///
/// Use with swift-log's `StreamLogHandler(label:stream:)`, which formats each line.
public struct BackgroundStandardError: TextOutputStream, Sendable {
    private final class Queue: Sendable {
        struct State {
            var lines: [String] = []
            var dropped = 0
            /// Lines taken out and being written.
            var writing = false
        }

        let state = NIOLockedValueBox(State())
        let ready = DispatchSemaphore(value: 0)
        let maximumLines: Int

        init(maximumLines: Int) {
            self.maximumLines = maximumLines
            Thread.detach { [self] in drain() }
        }

        func append(_ text: String) {
            let queued = state.withLockedValue { state -> Bool in
                guard state.lines.count < maximumLines else {
                    state.dropped += 1
                    return false
                }
                state.lines.append(text)
                return true
            }
            if queued { ready.signal() }
        }

        private func drain() {
            while true {
                ready.wait()
                let (lines, dropped) = state.withLockedValue { state -> ([String], Int) in
                    defer {
                        state.lines.removeAll(keepingCapacity: true)
                        state.dropped = 0
                        state.writing = true
                    }
                    return (state.lines, state.dropped)
                }
                if !lines.isEmpty { SystemInfo.writeStandardError(lines.joined()) }
                if dropped > 0 { SystemInfo.writeStandardError("thinbd: \(dropped) log lines dropped (standard error was not read fast enough)\n") }
                state.withLockedValue { $0.writing = false }
            }
        }
    }

    private static let shared = Queue(maximumLines: 10_000)

    public init() {}

    public mutating func write(_ string: String) {
        Self.shared.append(string)
    }

    /// Waits up to about a second for queued lines to be written (before exiting).
    public static func flush() {
        for _ in 0..<100 {
            if shared.state.withLockedValue({ $0.lines.isEmpty && !$0.writing }) { break }
            SystemInfo.sleep(milliseconds: 10)
        }
    }
}
