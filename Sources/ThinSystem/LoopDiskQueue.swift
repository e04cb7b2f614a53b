/// A disk queue owned by one thread (an event loop), so that a request can go from socket
/// to disk and back without changing threads: `enqueue` prepares, `submitQueued` hands
/// what was prepared to the kernel in one call, and the owner runs `runCompletions` when
/// the readiness descriptor fires. Every call comes from the owning thread.
///
/// Two kinds: `URingLoopQueue` (io_uring; also reads files opened without O_DIRECT
/// without blocking, completing them when the page cache has the data) and
/// `AIOLoopQueue` (libaio; O_DIRECT only, since libaio reads other files inside
/// io_submit).
public protocol LoopDiskQueue: AnyObject {
    /// Whether reads and writes of files opened without O_DIRECT start without blocking
    /// too (io_uring completes them when the page cache has done its part).
    var handlesPageCacheAsynchronously: Bool { get }

    /// Requests it holds at once (queued or in the kernel); `enqueue` refuses beyond.
    var capacity: Int { get }

    /// Requests handed out and not yet completed.
    var inFlight: Int { get }

    /// Whether a thread of the queue's own (not the kernel) is at work on requests
    /// handed out: an owner that polls instead of sleeping would take the CPU that
    /// work needs.
    var isBusyOnItsThread: Bool { get }

    /// Queues `requests` (none empty; aligned for O_DIRECT when `fd` uses it) on `fd` as
    /// one operation; `completion` runs on the owning thread, from `runCompletions` (or
    /// from `submitQueued` when the kernel refuses them). Returns false, queuing nothing,
    /// when the queue has no room or is closed. Once `LoopBurst.submitEvery` requests
    /// wait, it submits them itself (see `LoopBurst`).
    func enqueue(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool

    /// `enqueue` for writes of a file opened without O_DIRECT, which a queue may make
    /// another way (`URingLoopQueue` makes them on a thread of its own). Same contract,
    /// and it refuses (returns false) anything but non-empty writes.
    func enqueuePageCacheWrites(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool

    /// Reads of a file opened without O_DIRECT that are likely in the page cache, which
    /// a queue may copy out on another thread (`URingLoopQueue` does) and complete like
    /// `enqueue`'s. False, taking nothing, when it does not: the caller reads them itself.
    func enqueueCachedReads(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool

    /// A new descriptor (the caller closes it with `releaseReadinessDescriptor`) that
    /// becomes readable when completions are waiting. Reading it resets the signal.
    func makeReadinessDescriptor() throws(SystemError) -> Int32

    /// Hands everything queued to the kernel, in one system call.
    func submitQueued()

    /// Runs the completions of finished operations, without waiting, taking at most
    /// `limit` finished requests from the kernel; returns how many it took (0: none
    /// were waiting).
    @discardableResult func runCompletions(atMost limit: Int) -> Int

    /// Submits what is queued, waits for everything in flight, runs those completions,
    /// and releases the kernel's side. Later `enqueue` calls return false.
    func close()
}

extension LoopDiskQueue {
    public var isBusyOnItsThread: Bool { false }

    public func enqueueCachedReads(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool {
        false
    }

    public func enqueuePageCacheWrites(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool {
        guard requests.allSatisfy({ $0.kind == .write && $0.buffer.count > 0 }) else { return false }
        return enqueue(fd: fd, requests, completion: completion)
    }

    /// Runs every finished operation's completion, without waiting; returns how many
    /// requests finished.
    @discardableResult public func runCompletions() -> Int {
        var total = 0
        while true {
            let ran = runCompletions(atMost: capacity)
            total += ran
            if ran < capacity { return total }
        }
    }

    /// Closes a descriptor from `makeReadinessDescriptor`.
    public func releaseReadinessDescriptor(_ descriptor: Int32) { Syscall.close(descriptor) }
}

/// How a loop queue keeps a burst of requests moving. A client at queue depth 32 sends
/// its requests in one burst, and this VM's disk finishes a burst together, so a loop
/// that submitted the whole burst at the end of its pass, and answered it in one flush
/// once every completion had run, kept the disk idle for the whole turnaround: the
/// device had 0 reads in flight 37-52 % of the time (sampled from
/// /sys/block/vda/inflight) where fio on the raw file kept it at 32 for 84-92 %.
/// Submitting every few requests lets the disk start on the first ones while the loop
/// parses the rest (docs/performance.md). The reply side flushes by a budget of
/// completions and bytes (the NBD server's `CompletionFlushBudget`).
public enum LoopBurst {
    /// Requests queued before `enqueue` submits them without waiting for the end of the
    /// loop's pass: one system call per this many requests at most.
    public static let submitEvery = 4
}

/// The loop queue to use here: io_uring where the kernel allows it (it may be disabled,
/// or filtered in containers), else libaio. Nil when neither can be set up.
public func makeLoopDiskQueue() -> LoopDiskQueue? {
    if let ring = try? URingLoopQueue() { return ring }
    return try? AIOLoopQueue()
}
