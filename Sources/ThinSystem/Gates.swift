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

    private let state = ConditionLock()
    private var epoch = 0
    private var holders = [0, 0]

    public init() {}

    /// Becomes a holder. Never waits; cost: one uncontended mutex.
    public func enter() -> Ticket {
        state.lock()
        defer { state.unlock() }
        holders[epoch] += 1
        return Ticket(epoch: epoch)
    }

    public func leave(_ ticket: Ticket) {
        state.lock()
        holders[ticket.epoch] -= 1
        if holders[ticket.epoch] == 0 && ticket.epoch != epoch { state.broadcast() }
        state.unlock()
    }

    /// Waits until every holder that entered before this call has left; holders that
    /// enter meanwhile are neither waited for nor held up. Calls must not overlap (the
    /// pool's mutex serializes them).
    public func waitForEarlierHolders() {
        NonBlockingThread.assertMayBlock("waiting for the I/O gate")
        state.lock()
        let old = epoch
        epoch = 1 - old
        while holders[old] > 0 { state.wait() }
        state.unlock()
    }
}

/// Reusable 4 KiB-aligned buffers, by power-of-two size class, so the data path does not
/// allocate per request in the steady state. Thread-safe; keeps at most `keepPerClass`
/// idle buffers of each size.
public final class AlignedBufferPool: @unchecked Sendable {
    private let lock = Lock()
    private var idle: [Int: [AlignedBuffer]] = [:]
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
        if let buffer = lock.withLock({ idle[size]?.popLast() }) { return buffer }
        return AlignedBuffer(count: size)
    }

    public func give(_ buffer: AlignedBuffer) {
        lock.withLock {
            if idle[buffer.count, default: []].count < keepPerClass {
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
    private let state = ConditionLock()
    private var held: [(owner: UInt64, range: Range<UInt64>, ticket: UInt64)] = []
    private var nextTicket: UInt64 = 0

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
        state.lock()
        while ranges.contains(where: { wanted in held.contains { $0.owner == wanted.owner && $0.range.overlaps(wanted.range) } }) {
            state.wait()
        }
        let ticket = nextTicket
        nextTicket += 1
        for wanted in ranges { held.append((wanted.owner, wanted.range, ticket)) }
        state.unlock()
        defer {
            state.lock()
            held.removeAll { $0.ticket == ticket }
            state.broadcast()
            state.unlock()
        }
        return try body()
    }

    /// A range taken by `tryHold`; give it back to `release`.
    public struct Hold: Sendable {
        fileprivate let ticket: UInt64
    }

    /// Takes `range` of `owner` if nobody holds an overlapping range, without waiting
    /// (one uncontended mutex, as `DrainGate.enter`): for event loops, which then hold it
    /// across asynchronous I/O and `release` it from the completion. Nil when taken.
    public func tryHold(_ owner: UInt64, _ range: Range<UInt64>) -> Hold? {
        state.lock()
        defer { state.unlock() }
        guard !held.contains(where: { $0.owner == owner && $0.range.overlaps(range) }) else { return nil }
        let ticket = nextTicket
        nextTicket += 1
        held.append((owner, range, ticket))
        return Hold(ticket: ticket)
    }

    /// Gives back a range from `tryHold`, waking whoever waits for it. Never waits.
    public func release(_ hold: Hold) {
        state.lock()
        held.removeAll { $0.ticket == hold.ticket }
        state.broadcast()
        state.unlock()
    }
}
