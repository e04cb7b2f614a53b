import Foundation
import Testing

@testable import ThinSystem

@Suite struct InFlightOperationsTests {
    @Test func anOperationCompletesOnceAfterItsLastPartWithItsFirstError() {
        let table = InFlightOperations(capacity: 4)
        var outcomes: [String] = []
        let slot = table.start(parts: 3) { error in outcomes.append(error?.description ?? "ok") }!
        #expect(table.count == 1)
        #expect(table.finishPart(of: slot, error: nil) == nil)
        #expect(table.finishPart(of: slot, error: SystemError(.io, "first")) == nil)
        let done = table.finishPart(of: slot, error: SystemError(.noSpace, "second"))
        #expect(done != nil)
        done?.completion(done?.error)
        #expect(outcomes.count == 1)
        #expect(outcomes[0].contains("first"))
        #expect(table.count == 0)
        #expect(!table.isStarted(slot))
        // A completion for a finished or unknown slot is ignored.
        #expect(table.finishPart(of: slot, error: nil) == nil)
        #expect(table.finishPart(of: -1, error: nil) == nil)
        #expect(table.finishPart(of: 4, error: nil) == nil)
    }

    @Test func slotsAreReusedAndAFullTableRefuses() {
        let table = InFlightOperations(capacity: 3)
        var finished: [Int] = []
        let slots = (0..<3).map { i in table.start(parts: 1) { _ in finished.append(i) }! }
        #expect(Set(slots).count == 3)
        #expect(table.start(parts: 1) { _ in } == nil)
        // Finished out of order: each runs its own completion.
        for slot in [slots[1], slots[2], slots[0]] {
            let done = table.finishPart(of: slot, error: nil)!
            done.completion(done.error)
        }
        #expect(finished == [1, 2, 0])
        // Every slot can be taken again.
        let again = (0..<3).compactMap { _ in table.start(parts: 2) { _ in } }
        #expect(Set(again) == Set(slots))
    }
}

@Suite struct RangeLockTests {
    @Test func overlappingRangesOfOneOwnerExcludeEachOtherAndReleaseInAnyOrder() {
        let locks = RangeLock()
        let a = locks.tryHold(1, 0..<4)!
        let b = locks.tryHold(1, 4..<8)!
        let c = locks.tryHold(1, 8..<12)!
        #expect(locks.tryHold(1, 3..<5) == nil)
        // Another owner's blocks are independent.
        let other = locks.tryHold(2, 0..<12)!
        locks.release(b)
        let middle = locks.tryHold(1, 4..<6)
        #expect(middle != nil)
        #expect(locks.tryHold(1, 0..<1) == nil)
        #expect(locks.tryHold(1, 11..<12) == nil)
        locks.release(a)
        locks.release(c)
        #expect(locks.tryHold(1, 0..<4) != nil)
        #expect(locks.tryHold(1, 8..<12) != nil)
        #expect(locks.tryHold(1, 5..<7) == nil)
        locks.release(middle!)
        locks.release(other)
        #expect(locks.tryHold(2, 5..<7) != nil)
    }

    /// Random holds and releases against a plain list of what is held: `tryHold`
    /// succeeds exactly when no held range of the same owner overlaps, slots are
    /// reused without mixing holds up, and a hold given back twice frees nothing else.
    @Test func randomHoldsAgreeWithAModel() {
        let locks = RangeLock()
        var random = SplitMix64(seed: 15)
        var model: [(owner: UInt64, range: Range<UInt64>, hold: RangeLock.Hold)] = []
        var mismatches = 0
        var released: [RangeLock.Hold] = []
        for _ in 0..<20_000 {
            if model.isEmpty || random.next() % 3 != 0 {
                let owner = random.next() % 3
                let lower = random.next() % 64
                let range = lower..<(lower + 1 + random.next() % 4)
                let expectFree = !model.contains { $0.owner == owner && $0.range.overlaps(range) }
                let hold = locks.tryHold(owner, range)
                if (hold != nil) != expectFree { mismatches += 1 }
                if let hold { model.append((owner, range, hold)) }
            } else {
                let index = Int(random.next() % UInt64(model.count))
                let gone = model.remove(at: index)
                locks.release(gone.hold)
                released.append(gone.hold)
                if random.next() % 8 == 0 {
                    // A second release of any earlier hold must not free a live one.
                    locks.release(released[Int(random.next() % UInt64(released.count))])
                }
            }
        }
        #expect(mismatches == 0)
        for entry in model {
            #expect(locks.tryHold(entry.owner, entry.range) == nil, "still held")
        }
    }

    @Test func aWaiterRunsOnceTheRangeIsReleased() {
        let locks = RangeLock()
        let hold = locks.tryHold(7, 10..<20)!
        let ran = WaitableValue(false)
        let waiter = Thread {
            locks.withRange(7, 15..<16) { ran.update { $0 = true } }
        }
        waiter.start()
        // Still held: the waiter has not run after a while.
        #expect(ran.wait(until: { $0 ? true : nil }, milliseconds: 200) == nil)
        locks.release(hold)
        #expect(ran.wait(until: { $0 ? true : nil }, milliseconds: 10_000) == true)
        // withRange gave its range back.
        let deadline = Date().addingTimeInterval(10)
        var again = locks.tryHold(7, 15..<16)
        while again == nil && Date() < deadline {
            Thread.sleep(forTimeInterval: 0.01)
            again = locks.tryHold(7, 15..<16)
        }
        #expect(again != nil)
    }
}
