/// When a loop sends the replies its disk completions wrote: after a completion round
/// has run `maximumCompletions`, or its replies carry `maximumReadBytes` of read data,
/// or the completions ran out. Both loops (`LoopIO`, `LeanLoop`) run their completions
/// through `runCompletions(of:flush:)`, `completionsPerStep` at a time.
///
/// Why both limits (docs/performance.md, "Replies flushed by count and by bytes"): a
/// flush is a system call (and wakes the client), and where the CPU is the bound, 4 KiB
/// requests answered 4 completions per flush spent it where 64 per flush did not. Large
/// reads want the opposite: 1 MiB sequential reads flushed 64 completions at a time
/// lost up to 29 %, the client waiting for data the loop held back. A flush once
/// 256 KiB of read data is ready keeps those as they were. Loop-owned value.
struct CompletionFlushBudget {
    /// Completions run per call into the loop queue between two looks at the budget.
    static let completionsPerStep = 4
    static let maximumCompletions = 64
    static let maximumReadBytes = 256 << 10

    private var completions = 0
    private var readBytes = 0

    /// A completion wrote a read reply carrying `count` data bytes.
    mutating func readDataQueued(_ count: Int) {
        // Saturating: the sum only has to reach the limit.
        let (sum, overflow) = readBytes.addingReportingOverflow(max(0, count))
        readBytes = overflow ? Int.max : sum
    }

    /// After a step that ran `count` completions: whether to flush now. A step that ran
    /// none ends the round, and always flushes. Flushing starts a new budget.
    mutating func shouldFlush(afterRunning count: Int) -> Bool {
        completions &+= count
        guard count == 0 || completions >= Self.maximumCompletions || readBytes >= Self.maximumReadBytes else { return false }
        reset()
        return true
    }

    /// Runs `queue`'s completions a step at a time until none is left, submitting what
    /// they queued after each step and calling `flush` whenever the budget says (and
    /// always at the end). `flush` must not touch this budget. Loop thread only.
    mutating func runCompletions(of queue: NBDLoopQueue, flush: () -> Void) {
        while true {
            let ran = queue.runCompletions(atMost: Self.completionsPerStep)
            if shouldFlush(afterRunning: ran) { flush() }
            queue.submitQueued()
            if ran == 0 { return }
        }
    }

    /// The replies went out some other way (the end of the loop's round).
    mutating func reset() {
        completions = 0
        readBytes = 0
    }
}
