import Synchronization

/// A fixed-capacity queue from exactly one producing thread to exactly one consuming
/// thread, without a lock: the producer stages elements and publishes them with one
/// store; the consumer takes them in order with one load per batch it sees.
///
/// Why not a mutex: an event loop hands work to a helper thread and takes the outcomes
/// back many thousand times a second. With a mutex (and a condition variable to wake
/// the helper), the loop was seen blocked in the kernel on the helper's side of the
/// lock: the loop must never wait, and here it cannot, since neither side ever holds
/// anything the other needs.
///
/// Contract: `stage`, `hasRoom`, `publish` and `stagedCount` from the producer only;
/// `take` and `isEmpty` from the consumer only. Each side must be one thread at a time.
/// Capacity is fixed at creation, and the producer must check `stage`'s answer (false
/// when full). Cost: no allocation after `init`; one atomic store per `publish`, one
/// atomic load per `take` that finds its cached view empty.
public final class HandOffRing<Element>: @unchecked Sendable {
    private let slots: UnsafeMutablePointer<Element>
    private let mask: Int
    /// Next slot the consumer takes; written by the consumer only.
    private let head = Atomic<Int>(0)
    /// End of what the producer has published; written by the producer only.
    private let tail = Atomic<Int>(0)
    /// Producer only: end of what is staged (from `tail` up to here is unpublished).
    @exclusivity(unchecked) private var stagedEnd = 0
    /// Producer only: the head as last seen, to tell fullness without a load per stage.
    @exclusivity(unchecked) private var knownHead = 0
    /// Consumer only: the tail as last seen, so a batch costs one load.
    @exclusivity(unchecked) private var knownTail = 0
    /// Consumer only: the head it has taken up to (stored to `head` as it moves).
    @exclusivity(unchecked) private var takenEnd = 0

    public let capacity: Int

    /// A ring holding at least `minimumCapacity` elements (rounded up to a power of two).
    public init(minimumCapacity: Int) {
        var size = 1
        while size < max(1, minimumCapacity) { size <<= 1 }
        capacity = size
        mask = size - 1
        slots = .allocate(capacity: size)
    }

    deinit {
        // Everything staged or published and not taken is still initialized.
        var index = takenEnd
        while index != stagedEnd {
            (slots + (index & mask)).deinitialize(count: 1)
            index &+= 1
        }
        slots.deallocate()
    }

    // MARK: Producer

    /// Stages `element` after those already staged; it is not visible to the consumer
    /// until `publish`. False (and nothing staged) when the ring is full.
    public func stage(_ element: Element) -> Bool {
        if stagedEnd &- knownHead >= capacity {
            knownHead = head.load(ordering: .acquiring)
            guard stagedEnd &- knownHead < capacity else { return false }
        }
        (slots + (stagedEnd & mask)).initialize(to: element)
        stagedEnd &+= 1
        return true
    }

    /// Whether `count` more elements can be staged now (the consumer may free more).
    public func hasRoom(for count: Int) -> Bool {
        if capacity - (stagedEnd &- knownHead) >= count { return true }
        knownHead = head.load(ordering: .acquiring)
        return capacity - (stagedEnd &- knownHead) >= count
    }

    /// Elements staged and not yet published.
    public var stagedCount: Int { stagedEnd &- tail.load(ordering: .relaxed) }

    /// Makes every staged element visible to the consumer. Sequentially consistent, so
    /// that a producer that publishes and then reads the consumer's "sleeping" flag, and
    /// a consumer that sets that flag and then looks for elements, cannot both miss
    /// each other. Returns whether anything was published.
    @discardableResult
    public func publish() -> Bool {
        guard stagedEnd != tail.load(ordering: .relaxed) else { return false }
        tail.store(stagedEnd, ordering: .sequentiallyConsistent)
        return true
    }

    // MARK: Consumer

    /// The oldest published element, removed; nil when none is published.
    public func take() -> Element? {
        if takenEnd == knownTail {
            knownTail = tail.load(ordering: .sequentiallyConsistent)
            guard takenEnd != knownTail else { return nil }
        }
        let element = (slots + (takenEnd & mask)).move()
        takenEnd &+= 1
        // Frees the slot for the producer.
        head.store(takenEnd, ordering: .releasing)
        return element
    }

    /// Whether nothing published is waiting (it looks at the producer's latest publish).
    public var isEmpty: Bool {
        if takenEnd != knownTail { return false }
        knownTail = tail.load(ordering: .sequentiallyConsistent)
        return takenEnd == knownTail
    }
}
