/// Polls an event loop for its next event for a short while before it goes to sleep.
///
/// Why: a client at queue depth 1 sends its next request a few tens of microseconds
/// after the reply, and a disk read comes back in about a hundred. A loop that sleeps
/// at once leaves its CPU idle, and waking an idle CPU is slow where the CPU is
/// virtual: the host must schedule it again (measured on the 2-vCPU guest this project
/// is benchmarked on: 4K cached reads at QD1 took about 57 µs with the loop sleeping at
/// once and 35-36 µs with it polling; reads from the disk 100-125 µs and 80-90 µs;
/// docs/performance.md). qemu's event loop polls the same way (`poll-max-ns`).
///
/// Implemented outside this module (ThinSystem does the system calls).
public protocol NBDIdlePoller: AnyObject, Sendable {
    /// Returns true as soon as the loop has an event waiting, false once `nanoseconds`
    /// have passed without one. Cost: the calling thread busy for up to `nanoseconds`,
    /// with a poll and a yield per round.
    func pollUntilReady(nanoseconds: UInt64) -> Bool
    /// Releases what the poller holds; it is not used afterwards.
    func close()
}

/// How long an idle loop polls before it sleeps: up to `maximum`, adapted to when work
/// actually arrives. A value with no clock of its own: the caller passes the times.
///
/// - The loop has nothing to do but wait for its own descriptors (a request, a disk
///   completion): it polls for `budget`.
/// - The poll caught the next event: nothing changes.
/// - The poll ran out (or the budget was 0) and the loop slept: the next event (a
///   request, or completions) tells how long the loop was quiet. If that was within `maximum`, a longer
///   poll would have caught it, so the budget doubles (from `smallest` when it was 0).
///   If it was longer, no poll up to `maximum` would have, so the budget halves, down to
///   0 below `smallest`. A client that pauses longer than `maximum` between requests
///   therefore costs a few polls in all, not one per request.
struct IdlePollWindow {
    /// The longest poll, in nanoseconds; 0 turns polling off.
    let maximum: UInt64
    /// The next poll's length, in nanoseconds.
    private(set) var budget: UInt64
    /// When the loop last went to sleep without catching the next event (nil while
    /// nothing is being measured).
    private(set) var sleptAt: UInt64?

    /// Shorter polls are not worth the task that runs them.
    static let smallest: UInt64 = 2_000

    init(maximum: UInt64) {
        self.maximum = maximum
        budget = maximum
    }

    /// Whether a request's arrival is being waited for (`workArrived` then adapts).
    var measuring: Bool { sleptAt != nil }

    /// The loop sleeps at `now` without having caught an event (its poll ran out, or
    /// the budget was 0).
    mutating func sleeping(at now: UInt64) {
        guard maximum > 0 else { return }
        sleptAt = now
    }

    /// Work arrived at `now` after the loop slept: adapt the budget to the quiet time.
    mutating func workArrived(at now: UInt64) {
        guard let sleptAt else { return }
        self.sleptAt = nil
        // The poll (`budget`) came first, then the sleep; clocks never run backwards,
        // but nothing here traps if one did.
        let slept = now >= sleptAt ? now - sleptAt : 0
        let (quiet, overflow) = slept.addingReportingOverflow(budget)
        if !overflow && quiet <= maximum {
            budget = budget > maximum / 2 ? maximum : min(maximum, max(Self.smallest, budget * 2))
        } else {
            budget /= 2
            if budget < Self.smallest { budget = 0 }
        }
    }
}
