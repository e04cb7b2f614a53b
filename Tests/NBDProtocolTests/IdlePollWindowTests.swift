import Testing

@testable import NBDServer

/// `IdlePollWindow` on its own: how long an idle loop polls, as the arrival times of
/// requests say.
@Suite struct IdlePollWindowTests {
    let maximum: UInt64 = 50_000

    @Test func startsAtTheMaximumAndStaysThereWhilePollsCatchTheNextRequest() {
        let window = IdlePollWindow(maximum: maximum)
        #expect(window.budget == maximum)
        #expect(!window.measuring, "nothing to measure until the loop sleeps")
    }

    @Test func aClientThatPausesLongerThanTheMaximumStopsThePolling() {
        var window = IdlePollWindow(maximum: maximum)
        var now: UInt64 = 1_000_000
        var budgets: [UInt64] = []
        for _ in 0..<10 {
            budgets.append(window.budget)
            now += window.budget
            window.sleeping(at: now)
            #expect(window.measuring)
            now += 200_000  // the next request comes 200 µs later
            window.workArrived(at: now)
            #expect(!window.measuring)
        }
        #expect(budgets.prefix(5) == [50_000, 25_000, 12_500, 6_250, 3_125])
        #expect(budgets.suffix(4).allSatisfy { $0 == 0 }, "\(budgets)")
    }

    @Test func requestsArrivingSoonAfterTheLoopSleptGrowTheBudgetBack() {
        var window = IdlePollWindow(maximum: maximum)
        var now: UInt64 = 0
        // Long pauses first: polling stops.
        for _ in 0..<8 {
            now += window.budget
            window.sleeping(at: now)
            now += 1_000_000
            window.workArrived(at: now)
        }
        #expect(window.budget == 0)
        // Then a client at queue depth 1: each request 30 µs after the last reply.
        var budgets: [UInt64] = []
        for _ in 0..<8 {
            let quietFor: UInt64 = 30_000
            if window.budget >= quietFor {
                // The poll would catch it: the loop never sleeps.
                budgets.append(window.budget)
                continue
            }
            now += window.budget
            window.sleeping(at: now)
            now += quietFor - window.budget
            window.workArrived(at: now)
            budgets.append(window.budget)
        }
        #expect(budgets.first == IdlePollWindow.smallest)
        #expect(budgets.last! >= 30_000, "the poll catches every request again: \(budgets)")
        #expect(budgets == budgets.sorted(), "the budget only grows: \(budgets)")
    }

    @Test func aRequestJustPastTheBudgetButWithinTheMaximumGrowsIt() {
        var window = IdlePollWindow(maximum: maximum)
        // Shrink once with a long pause.
        window.sleeping(at: 0)
        window.workArrived(at: 1_000_000)
        #expect(window.budget == 25_000)
        // The next request came 10 µs after a 25 µs poll ran out: 35 µs of quiet.
        window.sleeping(at: 2_000_000)
        window.workArrived(at: 2_010_000)
        #expect(window.budget == maximum)
    }

    @Test func zeroMaximumNeverPollsNorMeasures() {
        var window = IdlePollWindow(maximum: 0)
        #expect(window.budget == 0)
        window.sleeping(at: 10)
        #expect(!window.measuring)
        window.workArrived(at: 20)
        #expect(window.budget == 0)
    }

    @Test func clocksThatJumpDoNotTrap() {
        var window = IdlePollWindow(maximum: maximum)
        window.sleeping(at: UInt64.max - 5)
        window.workArrived(at: 3)  // earlier than the sleep: counted as no sleep at all
        #expect(window.budget == maximum)
        window.sleeping(at: 0)
        window.workArrived(at: UInt64.max)
        #expect(window.budget == maximum / 2)
    }
}
