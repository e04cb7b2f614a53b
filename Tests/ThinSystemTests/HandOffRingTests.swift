import Foundation
import Testing
import ThinSystem

@Suite struct HandOffRingTests {
    /// Staged elements stay invisible until published; a full ring refuses more;
    /// elements come out in order across the wrap of the slot array.
    @Test func publishesInOrderAndRefusesWhenFull() {
        let ring = HandOffRing<Int>(minimumCapacity: 3)
        #expect(ring.capacity == 4, "rounded up to a power of two")
        #expect(ring.take() == nil)
        #expect(ring.stage(1) && ring.stage(2))
        #expect(ring.stagedCount == 2)
        #expect(ring.take() == nil, "staged is not published")
        #expect(ring.isEmpty)
        #expect(ring.publish())
        #expect(!ring.publish(), "nothing new to publish")
        #expect(ring.stagedCount == 0)
        #expect(!ring.isEmpty)
        #expect(ring.stage(3) && ring.stage(4))
        #expect(!ring.stage(5), "four held: full")
        ring.publish()
        #expect(ring.take() == 1)
        #expect(ring.stage(5), "a taken slot is free again")
        ring.publish()
        var out: [Int] = []
        while let value = ring.take() { out.append(value) }
        #expect(out == [2, 3, 4, 5])
        for value in 6...13 {
            #expect(ring.stage(value))
            ring.publish()
            #expect(ring.take() == value, "around the wrap")
        }
        #expect(ring.isEmpty)
    }

    /// `hasRoom` answers for staged elements too, and sees slots the consumer freed.
    @Test func roomCountsStagedElementsAndFreedSlots() {
        let ring = HandOffRing<Int>(minimumCapacity: 4)
        #expect(ring.hasRoom(for: 4))
        #expect(!ring.hasRoom(for: 5))
        #expect(ring.stage(1) && ring.stage(2) && ring.stage(3))
        #expect(ring.hasRoom(for: 1))
        #expect(!ring.hasRoom(for: 2), "staged elements take room before they are published")
        ring.publish()
        _ = ring.take()
        _ = ring.take()
        #expect(ring.hasRoom(for: 3), "taken slots are free again")
    }

    /// Elements left in the ring are released with it (no leak, no double release).
    @Test func releasesWhatIsLeftWhenFreed() {
        final class Token {
            static let lock = NSLock()
            nonisolated(unsafe) static var alive = 0
            init() { Self.lock.withLock { Self.alive += 1 } }
            deinit { Self.lock.withLock { Self.alive -= 1 } }
        }
        do {
            let ring = HandOffRing<Token>(minimumCapacity: 8)
            for _ in 0..<5 { #expect(ring.stage(Token())) }
            ring.publish()
            #expect(ring.stage(Token()), "one staged, not published")
            _ = ring.take()
            #expect(Token.lock.withLock { Token.alive } == 5)
        }
        #expect(Token.lock.withLock { Token.alive } == 0)
    }

    /// One producer thread and one consumer thread: every element arrives once, in
    /// order, through many wraps of a small ring.
    @Test func carriesASequenceBetweenTwoThreads() async {
        let ring = HandOffRing<UInt64>(minimumCapacity: 16)
        let total: UInt64 = 500_000
        let producer = Thread {
            var next: UInt64 = 0
            while next < total {
                if ring.stage(next) {
                    next += 1
                    if next % 7 == 0 { ring.publish() }
                } else {
                    ring.publish()
                    sched_yield()
                }
            }
            ring.publish()
        }
        producer.start()
        var expected: UInt64 = 0
        var outOfOrder = 0
        let deadline = Date().addingTimeInterval(60)
        while expected < total && Date() < deadline {
            guard let value = ring.take() else {
                sched_yield()
                continue
            }
            if value != expected { outOfOrder += 1 }
            expected = value + 1
        }
        #expect(expected == total, "every element arrived")
        #expect(outOfOrder == 0)
        #expect(ring.isEmpty)
    }
}
