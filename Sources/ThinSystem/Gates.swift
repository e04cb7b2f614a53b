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
    func broadcast() { pthread_cond_broadcast(condition) }
}

/// Lets many holders in at once, and lets one caller wait until nobody holds it while
/// keeping newcomers out (writer preference, so a waiting drain is never starved).
///
/// The pool uses it to keep data I/O that runs outside the pool lock from touching
/// blocks a commit is about to hand out again.
public final class DrainGate: @unchecked Sendable {
    private let state = ConditionLock()
    private var holders = 0
    private var draining = 0

    public init() {}

    /// Becomes a holder (waits while a drain is pending). Cost: one uncontended mutex.
    public func enter() {
        NonBlockingThread.assertMayBlock("entering the I/O gate")
        state.lock()
        while draining > 0 { state.wait() }
        holders += 1
        state.unlock()
    }

    /// Becomes a holder unless a drain is pending; never waits.
    public func tryEnter() -> Bool {
        state.lock()
        defer { state.unlock() }
        guard draining == 0 else { return false }
        holders += 1
        return true
    }

    public func leave() {
        state.lock()
        holders -= 1
        if holders == 0 { state.broadcast() }
        state.unlock()
    }

    /// Waits until no holder is inside, then runs `body` with newcomers kept out.
    public func whileDrained<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        NonBlockingThread.assertMayBlock("draining the I/O gate")
        state.lock()
        draining += 1
        while holders > 0 { state.wait() }
        state.unlock()
        defer {
            state.lock()
            draining -= 1
            state.broadcast()
            state.unlock()
        }
        return try body()
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
}
