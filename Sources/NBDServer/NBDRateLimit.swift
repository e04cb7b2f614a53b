import Atomics
import NIOConcurrencyHelpers
import NIOCore

/// A per-export rate limit: two token buckets (operations and bytes per second) shared
/// by every connection to the export, as nbdkit's rate filter and qemu's throttle groups
/// do, so one runaway client cannot starve the others.
///
/// Reservation style: a request takes its tokens at once, even into debt, and is told
/// how long to wait before it runs; later requests queue behind that debt, so waiting
/// requests run in arrival order and the average rate is exact. Up to a tenth of a
/// second's worth may pass without waiting (the burst). Nothing ever blocks: the
/// server delays the request on its event loop by the returned time.
///
/// Thread-safe; cost per request: one atomic load when unlimited, else one lock and a
/// few arithmetic operations.
public final class NBDRateLimit: Sendable {
    public struct Rates: Equatable, Sendable {
        /// Operations per second; 0 = no limit.
        public var operationsPerSecond: UInt64
        /// Bytes per second; 0 = no limit.
        public var bytesPerSecond: UInt64

        public init(operationsPerSecond: UInt64, bytesPerSecond: UInt64 = 0) {
            self.operationsPerSecond = operationsPerSecond
            self.bytesPerSecond = bytesPerSecond
        }

        public var isUnlimited: Bool { operationsPerSecond == 0 && bytesPerSecond == 0 }
    }

    private struct Bucket {
        var rate: Double = 0
        var tokens: Double = 0

        var burst: Double { max(1, rate / 10) }

        mutating func refill(seconds: Double) {
            guard rate > 0 else { return }
            tokens = min(burst, tokens + seconds * rate)
        }

        /// Takes `amount` tokens; returns the seconds until the debt is paid.
        mutating func take(_ amount: Double) -> Double {
            guard rate > 0 else { return 0 }
            tokens -= amount
            return tokens >= 0 ? 0 : -tokens / rate
        }

        mutating func set(rate newRate: UInt64) {
            rate = Double(newRate)
            tokens = min(tokens, burst)
            if rate == 0 { tokens = 0 }
        }
    }

    private struct State {
        var rates: Rates
        var operations = Bucket()
        var bytes = Bucket()
        var lastRefill: NIODeadline
        var delayedNanoseconds: UInt64 = 0
    }

    private let state: NIOLockedValueBox<State>
    /// Whether any rate is set: every export has a limit object (so a rule added later
    /// applies to open connections), and an unlimited one must cost a request no lock.
    private let limited: ManagedAtomic<Bool>

    public init(_ rates: Rates, now: NIODeadline = .now()) {
        var initial = State(rates: rates, lastRefill: now)
        initial.operations.set(rate: rates.operationsPerSecond)
        initial.bytes.set(rate: rates.bytesPerSecond)
        initial.operations.tokens = initial.operations.burst
        initial.bytes.tokens = initial.bytes.burst
        state = NIOLockedValueBox(initial)
        limited = ManagedAtomic(!rates.isUnlimited)
    }

    public var rates: Rates { state.withLockedValue { $0.rates } }

    /// Total time requests were told to wait, for metrics.
    public var delayedNanoseconds: UInt64 { state.withLockedValue { $0.delayedNanoseconds } }

    /// Changes the limit; requests already told to wait keep their delay.
    public func set(_ rates: Rates) {
        state.withLockedValue { state in
            state.rates = rates
            state.operations.set(rate: rates.operationsPerSecond)
            state.bytes.set(rate: rates.bytesPerSecond)
            limited.store(!rates.isUnlimited, ordering: .relaxed)
        }
    }

    /// Takes one operation of `bytes` bytes; returns how long it must wait before it runs.
    public func reserve(bytes: Int, now: NIODeadline = .now()) -> TimeAmount {
        guard limited.load(ordering: .relaxed) else { return .zero }
        return state.withLockedValue { state in
            let elapsed = now > state.lastRefill ? Double((now - state.lastRefill).nanoseconds) / 1e9 : 0
            state.lastRefill = max(now, state.lastRefill)
            state.operations.refill(seconds: elapsed)
            state.bytes.refill(seconds: elapsed)
            let wait = max(state.operations.take(1), state.bytes.take(Double(max(bytes, 0))))
            // Bounded: at most an hour of debt is reported (absurd requests at tiny rates).
            let nanoseconds = Int64(min(wait, 3600) * 1e9)
            state.delayedNanoseconds &+= UInt64(nanoseconds)
            return .nanoseconds(nanoseconds)
        }
    }
}
