import Glibc

/// A mutex with one condition variable: the building block of the gates below.
final class ConditionLock {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    /// Waits for a broadcast; the mutex must be held.
    func wait() { pthread_cond_wait(condition, mutex) }

    /// Waits for a broadcast or until `deadline` (CLOCK_REALTIME nanoseconds); the mutex
    /// must be held. Returns false on timeout.
    func wait(untilRealtime deadline: UInt64) -> Bool {
        var time = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        return pthread_cond_timedwait(condition, mutex, &time) != ETIMEDOUT
    }
    func broadcast() { pthread_cond_broadcast(condition) }
}

/// Tracks holders (data I/O running outside the pool lock) so that a commit can wait
/// for everyone who entered before it, without ever holding up newcomers: an epoch
/// scheme with two counters. Entering and leaving never wait; `waitForEarlierHolders`
/// switches the epoch (new holders count in the other counter) and waits for the old
/// one to empty, like an RCU grace period.
///
/// The pool uses it so that blocks freed in a transaction are not handed out again while
/// reads that looked them up before the commit may still be reading them. Those reads
/// entered before the commit changed the metadata, hence before the switch; reads that
/// enter after it looked up the new metadata and need no waiting for.
public final class DrainGate: @unchecked Sendable {
    /// The epoch a holder entered in; give it back to `leave`.
    public struct Ticket: Sendable {
        fileprivate let epoch: Int
    }

    private struct Epochs {
        var current = 0
        /// Holders that entered in each epoch and have not left.
        var holders = [0, 0]
    }
    private let state = WaitableValue(Epochs())

    public init() {}

    /// Becomes a holder. Never waits; cost: one uncontended mutex.
    public func enter() -> Ticket {
        state.updateWithoutWaking { epochs in
            epochs.holders[epochs.current] += 1
            return Ticket(epoch: epochs.current)
        }
    }

    public func leave(_ ticket: Ticket) {
        // Only the last holder of an old epoch has anyone to wake (a commit waiting in
        // `waitForEarlierHolders`); the others leave without a broadcast.
        let drained = state.updateWithoutWaking { epochs in
            epochs.holders[ticket.epoch] -= 1
            return epochs.holders[ticket.epoch] == 0 && ticket.epoch != epochs.current
        }
        if drained { state.wakeWaiters() }
    }

    /// Waits until every holder that entered before this call has left; holders that
    /// enter meanwhile are neither waited for nor held up. Calls must not overlap (the
    /// pool's mutex serializes them).
    public func waitForEarlierHolders() {
        NonBlockingThread.assertMayBlock("waiting for the I/O gate")
        let old = state.updateWithoutWaking { epochs in
            let old = epochs.current
            epochs.current = 1 - old
            return old
        }
        state.wait { epochs in epochs.holders[old] == 0 ? () : nil }
    }
}

/// Reusable 4 KiB-aligned buffers, by power-of-two size class, so the data path does not
/// allocate per request in the steady state. Thread-safe; keeps at most `keepPerClass`
/// idle buffers of each size.
public final class AlignedBufferPool: @unchecked Sendable {
    /// Idle buffers by size class.
    private let idle = LockedValue([Int: [AlignedBuffer]]())
    private let keepPerClass: Int

    public init(keepPerClass: Int = 64) {
        self.keepPerClass = keepPerClass
    }

    static func sizeClass(_ count: Int) -> Int {
        var size = AlignedBuffer.directIOAlignment
        while size < count { size <<= 1 }
        return size
    }

    /// A buffer of at least `count` bytes (contents unspecified).
    public func take(_ count: Int) -> AlignedBuffer {
        let size = Self.sizeClass(count)
        if let buffer = idle.withLockedValue({ $0[size]?.popLast() }) { return buffer }
        return AlignedBuffer(count: size)
    }

    public func give(_ buffer: AlignedBuffer) {
        let keep = keepPerClass
        idle.withLockedValue { idle in
            if idle[buffer.count, default: []].count < keep {
                idle[buffer.count, default: []].append(buffer)
            }
        }
    }
}

/// Locks ranges of block numbers per owner (a volume): holders of overlapping ranges of
/// the same owner wait for each other; everything else proceeds in parallel.
///
/// Volume writes lock the blocks they touch; volume operations (snapshot, clone,
/// rollback, delete, resize) lock the whole volume, so they wait for writes in flight
/// and a snapshot is a clean point in time. Always taken before the pool lock.
public final class RangeLock: @unchecked Sendable {
    /// The held ranges, one per slot, in parallel arrays: the overlap scan runs once per
    /// write on an event loop, over as many slots as writes in flight, and three tight
    /// arrays are what it reads. A free slot holds the empty range 0..<0, which
    /// overlaps nothing, and is reused before the arrays grow. Releasing a single
    /// range (`tryHold`'s) frees its slot directly; `withRanges` holds share a ticket.
    /// (An array of (owner, range, ticket) tuples scanned for both cost about 1,000
    /// instructions per write at queue depth 32; docs/performance.md.)
    private struct Held {
        var owners: [UInt64] = []
        var lowers: [UInt64] = []
        var uppers: [UInt64] = []
        /// The hold each slot belongs to.
        var tickets: [UInt64] = []
        var freeSlots: [Int] = []
        var nextTicket: UInt64 = 0

        func overlaps(_ owner: UInt64, _ range: Range<UInt64>) -> Bool {
            let (lower, upper) = (range.lowerBound, range.upperBound)
            guard lower < upper else { return false }
            return lowers.withUnsafeBufferPointer { lowers in
                uppers.withUnsafeBufferPointer { uppers in
                    owners.withUnsafeBufferPointer { owners in
                        for slot in 0..<owners.count where lowers[slot] < upper && lower < uppers[slot] && owners[slot] == owner {
                            return true
                        }
                        return false
                    }
                }
            }
        }

        mutating func newTicket() -> UInt64 {
            defer { nextTicket &+= 1 }
            return nextTicket
        }

        /// Puts one range in a slot; nil for an empty range (it locks nothing).
        mutating func place(_ owner: UInt64, _ range: Range<UInt64>, ticket: UInt64) -> Int? {
            guard !range.isEmpty else { return nil }
            if let slot = freeSlots.popLast() {
                owners[slot] = owner
                lowers[slot] = range.lowerBound
                uppers[slot] = range.upperBound
                tickets[slot] = ticket
                return slot
            }
            owners.append(owner)
            lowers.append(range.lowerBound)
            uppers.append(range.upperBound)
            tickets.append(ticket)
            return owners.count - 1
        }

        mutating func free(_ slot: Int) {
            lowers[slot] = 0
            uppers[slot] = 0
            freeSlots.append(slot)
        }

        mutating func take(_ wanted: [(owner: UInt64, range: Range<UInt64>)]) -> UInt64 {
            let ticket = newTicket()
            for range in wanted { _ = place(range.owner, range.range, ticket: ticket) }
            return ticket
        }

        /// Frees every slot of `ticket` (a `withRanges` hold).
        mutating func give(_ ticket: UInt64) {
            for slot in 0..<tickets.count where tickets[slot] == ticket && lowers[slot] < uppers[slot] { free(slot) }
        }
    }
    private let held = WaitableValue(Held())

    public init() {}

    /// Runs `body` holding `range` of `owner`. Cost: a scan of the held ranges (as many
    /// as requests in flight).
    public func withRange<T, E: Error>(_ owner: UInt64, _ range: Range<UInt64>, _ body: () throws(E) -> T) throws(E) -> T {
        try withRanges([(owner, range)], body)
    }

    /// Runs `body` holding all of `ranges` (which must not overlap each other). They
    /// are taken together, once none is held by anyone else, so two callers locking
    /// several ranges cannot deadlock.
    public func withRanges<T, E: Error>(_ ranges: [(owner: UInt64, range: Range<UInt64>)], _ body: () throws(E) -> T) throws(E) -> T {
        NonBlockingThread.assertMayBlock("a range lock")
        let ticket = held.wait { held -> UInt64? in
            guard !ranges.contains(where: { held.overlaps($0.owner, $0.range) }) else { return nil }
            return held.take(ranges)
        }
        defer { held.update { $0.give(ticket) } }
        return try body()
    }

    /// A range taken by `tryHold`; give it back to `release`.
    public struct Hold: Sendable {
        fileprivate let ticket: UInt64
        /// Nil for an empty range, which holds nothing.
        fileprivate let slot: Int?
    }

    /// Takes `range` of `owner` if nobody holds an overlapping range, without waiting
    /// (one uncontended mutex, as `DrainGate.enter`): for event loops, which then hold it
    /// across asynchronous I/O and `release` it from the completion. Nil when taken.
    /// Cost: a scan of the held ranges (as many as writes in flight).
    public func tryHold(_ owner: UInt64, _ range: Range<UInt64>) -> Hold? {
        held.updateWithoutWaking { held in
            guard !held.overlaps(owner, range) else { return nil }
            let ticket = held.newTicket()
            return Hold(ticket: ticket, slot: held.place(owner, range, ticket: ticket))
        }
    }

    /// Gives back a range from `tryHold`, waking whoever waits for it. Never waits, and
    /// costs no scan. Giving back a hold twice does nothing the second time.
    public func release(_ hold: Hold) {
        guard let slot = hold.slot else { return }
        held.update { held in
            guard held.tickets[slot] == hold.ticket, held.lowers[slot] < held.uppers[slot] else { return }
            held.free(slot)
        }
    }
}
