import Testing

@testable import NBDServer

@Suite struct CompletionFlushBudgetTests {
    /// Small replies wait for `maximumCompletions`; a step that ran nothing (the end of
    /// the completions) always flushes; flushing starts a new budget.
    @Test func smallRepliesFlushByCountAndAtTheEnd() {
        var budget = CompletionFlushBudget()
        let step = CompletionFlushBudget.completionsPerStep
        var steps = 1
        while !budget.shouldFlush(afterRunning: step) { steps += 1 }
        #expect(steps * step == CompletionFlushBudget.maximumCompletions)
        let afterFlush = budget.shouldFlush(afterRunning: step)
        #expect(!afterFlush, "a new budget after the flush")
        let atTheEnd = budget.shouldFlush(afterRunning: 0)
        #expect(atTheEnd, "the end of the round flushes")
        let oneMore = budget.shouldFlush(afterRunning: 1)
        #expect(!oneMore)
    }

    /// Read data counts too: a step whose replies carry `maximumReadBytes` flushes at
    /// once, and `reset` (the round's own flush) forgets what was counted.
    @Test func readDataFlushesByBytes() {
        var budget = CompletionFlushBudget()
        budget.readDataQueued(CompletionFlushBudget.maximumReadBytes - 1)
        let short = budget.shouldFlush(afterRunning: 1)
        #expect(!short)
        budget.readDataQueued(1)
        let enough = budget.shouldFlush(afterRunning: 1)
        #expect(enough, "one large read's worth is enough")
        budget.readDataQueued(CompletionFlushBudget.maximumReadBytes)
        budget.reset()
        let afterReset = budget.shouldFlush(afterRunning: 1)
        #expect(!afterReset, "reset forgets the bytes")
        budget.readDataQueued(Int.max)
        budget.readDataQueued(Int.max)
        let saturated = budget.shouldFlush(afterRunning: 1)
        #expect(saturated, "absurd counts saturate, and flush")
    }
}
