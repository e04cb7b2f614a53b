import NIOCore
import Testing

@testable import NBDServer

/// The token buckets behind `--limit`, on a clock the test controls.
@Suite struct RateLimitTests {
    let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func at(_ milliseconds: Int64) -> NIODeadline { start + .milliseconds(milliseconds) }

    @Test func aBurstPassesThenRequestsWaitTheirTurn() {
        let limit = NBDRateLimit(.init(operationsPerSecond: 100), now: start)
        // A tenth of a second's worth (10 requests) passes at once.
        for _ in 0..<10 { #expect(limit.reserve(bytes: 0, now: start) == .zero) }
        // Then each waits 10 ms more than the one before: arrival order, exact rate.
        #expect(limit.reserve(bytes: 0, now: start) == .milliseconds(10))
        #expect(limit.reserve(bytes: 0, now: start) == .milliseconds(20))
        // 100 ms later the debt (2 requests) is paid and 8 tokens are back.
        for _ in 0..<8 { #expect(limit.reserve(bytes: 0, now: at(100)) == .zero) }
        #expect(limit.reserve(bytes: 0, now: at(100)) > .zero)
    }

    @Test func bytesAreLimitedToo() {
        let limit = NBDRateLimit(.init(operationsPerSecond: 0, bytesPerSecond: 1 << 20), now: start)
        #expect(limit.reserve(bytes: 100 << 10, now: start) == .zero, "within the 100 KiB burst")
        // 1 MiB more at 1 MiB/s: about a second of debt.
        let wait = limit.reserve(bytes: 1 << 20, now: start)
        #expect(wait > .milliseconds(990) && wait < .milliseconds(1010))
    }

    @Test func noLimitNeverWaitsAndChangesApplyAtOnce() {
        let limit = NBDRateLimit(.init(operationsPerSecond: 0), now: start)
        for _ in 0..<10_000 { #expect(limit.reserve(bytes: 1 << 20, now: start) == .zero) }
        limit.set(.init(operationsPerSecond: 10))
        #expect(limit.rates == .init(operationsPerSecond: 10))
        _ = limit.reserve(bytes: 0, now: start)
        #expect(limit.reserve(bytes: 0, now: start) == .milliseconds(100))
        limit.set(.init(operationsPerSecond: 0))
        #expect(limit.reserve(bytes: 0, now: start) == .zero)
        #expect(limit.delayedNanoseconds == 100_000_000)
    }

    @Test func absurdRequestsAtTinyRatesDoNotTrap() {
        let limit = NBDRateLimit(.init(operationsPerSecond: 1, bytesPerSecond: 1), now: start)
        #expect(limit.reserve(bytes: Int.max, now: start) == .seconds(3600))
        #expect(limit.reserve(bytes: -5, now: .uptimeNanoseconds(0)) >= .zero, "a clock going back is ignored")
    }
}
