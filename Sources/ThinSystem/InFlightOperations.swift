/// The operations a loop queue has in flight, one slot each: the slot's number travels
/// with each of an operation's requests through the kernel (as its user data) and comes
/// back with the request's completion.
///
/// The table is raw memory of fixed size, allocated once and reached only through
/// constants, so that taking and releasing a slot costs no allocation and none of the
/// run-time exclusivity checks that a class's array property pays on every access
/// (six per finished request in the queues' first form, the biggest single source of
/// them on the write path: docs/performance.md).
///
/// Not thread-safe: only the owning queue's thread calls it.
final class InFlightOperations {
    private struct Slot {
        var remainingParts: Int
        var error: SystemError?
        var completion: (SystemError?) -> Void
    }

    let capacity: Int
    private let slots: UnsafeMutablePointer<Slot?>
    /// A stack of free slot numbers; `freeCount.pointee` of them are valid.
    private let freeSlots: UnsafeMutablePointer<Int>
    private let freeCount: UnsafeMutablePointer<Int>

    init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: nil, count: capacity)
        freeSlots = .allocate(capacity: capacity)
        // Slot 0 is handed out first.
        for i in 0..<capacity { (freeSlots + i).initialize(to: capacity - 1 - i) }
        freeCount = .allocate(capacity: 1)
        freeCount.initialize(to: capacity)
    }

    deinit {
        slots.deinitialize(count: capacity)
        slots.deallocate()
        freeSlots.deallocate()
        freeCount.deallocate()
    }

    /// Operations started and not yet finished.
    var count: Int { capacity - freeCount.pointee }

    /// Whether `slot` is a slot number in range whose operation has not finished.
    func isStarted(_ slot: Int) -> Bool { slot >= 0 && slot < capacity && slots[slot] != nil }

    /// Takes a slot for an operation of `parts` requests (at least one); nil when every
    /// slot is taken.
    func start(parts: Int, completion: @escaping (SystemError?) -> Void) -> Int? {
        precondition(parts > 0)
        guard freeCount.pointee > 0 else { return nil }
        freeCount.pointee -= 1
        let slot = freeSlots[freeCount.pointee]
        slots[slot] = Slot(remainingParts: parts, error: nil, completion: completion)
        return slot
    }

    /// Records one request's outcome (its error, if any: the operation keeps the first).
    /// After its operation's last request, frees the slot and returns what to call: the
    /// caller runs the completion itself, once its own bookkeeping is done, since a
    /// completion may start new operations. Nil before the last part, and for a slot
    /// that is not `isStarted` (a completion the kernel should never deliver).
    func finishPart(of slot: Int, error: @autoclosure () -> SystemError?) -> (completion: (SystemError?) -> Void, error: SystemError?)? {
        guard isStarted(slot) else { return nil }
        if slots[slot]!.error == nil { slots[slot]!.error = error() }
        slots[slot]!.remainingParts -= 1
        guard slots[slot]!.remainingParts == 0 else { return nil }
        let done = slots[slot]!
        slots[slot] = nil
        freeSlots[freeCount.pointee] = slot
        freeCount.pointee += 1
        return (done.completion, done.error)
    }
}
