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

    /// Queues `requests` (none empty; aligned for O_DIRECT when `fd` uses it) on `fd` as
    /// one operation; `completion` runs on the owning thread, from `runCompletions` (or
    /// from `submitQueued` when the kernel refuses them). Returns false, queuing nothing,
    /// when the queue has no room or is closed.
    func enqueue(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool

    /// A new descriptor (the caller closes it with `releaseReadinessDescriptor`) that
    /// becomes readable when completions are waiting. Reading it resets the signal.
    func makeReadinessDescriptor() throws(SystemError) -> Int32

    /// Hands everything queued to the kernel, in one system call.
    func submitQueued()

    /// Runs the completions of finished operations, without waiting; returns how many
    /// requests finished.
    @discardableResult func runCompletions() -> Int

    /// Submits what is queued, waits for everything in flight, runs those completions,
    /// and releases the kernel's side. Later `enqueue` calls return false.
    func close()
}

extension LoopDiskQueue {
    /// Closes a descriptor from `makeReadinessDescriptor`.
    public func releaseReadinessDescriptor(_ descriptor: Int32) { Syscall.close(descriptor) }
}

/// The loop queue to use here: io_uring where the kernel allows it (it may be disabled,
/// or filtered in containers), else libaio. Nil when neither can be set up.
public func makeLoopDiskQueue() -> LoopDiskQueue? {
    if let ring = try? URingLoopQueue() { return ring }
    return try? AIOLoopQueue()
}
