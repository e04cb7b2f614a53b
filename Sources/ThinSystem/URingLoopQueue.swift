import CThinSupport
import Glibc

/// io_uring owned by one thread (an event loop): the `LoopDiskQueue` of choice.
///
/// - `enqueue` fills submission entries, and hands them over once
///   `LoopBurst.submitEvery` wait, so that the disk starts on a burst's first requests.
/// - `submitQueued` hands the rest over in one io_uring_enter: the owner calls it once
///   per pass over its sockets.
/// - Completions signal a registered eventfd; the owner watches a duplicate of it and
///   calls `runCompletions`, which runs each operation's completion on its thread.
/// - Set up with cooperative task running where the kernel has it: a completion made
///   on another thread waits for the owner's next system call (an event loop makes
///   several per round) instead of interrupting it. In a virtual machine each such
///   interrupt is an exit to the host; with `--cache writeback` random writes, whose
///   completions all come from io-wq workers, this cut the server's CPU per write by a
///   third (docs/performance.md).
///
/// Unlike libaio, io_uring reads files opened without O_DIRECT without blocking the
/// submitter: data in the page cache completes at once, the rest when the kernel's
/// read-ahead has brought it in. That is what `--cache writeback` needs for cold reads.
///
/// Not thread-safe: every call comes from the owning thread. Cost: no allocation per
/// operation once the operation table has grown to the peak in flight; one system call
/// per `submitQueued` or per `LoopBurst.submitEvery` requests; none to collect
/// completions.
public final class URingLoopQueue: LoopDiskQueue, @unchecked Sendable {
    /// Requests in flight at once; `enqueue` refuses work beyond it.
    public static let capacity = 256
    public var capacity: Int { Self.capacity }

    private let ring: OpaquePointer
    private let eventFD: Int32
    /// Where `runCompletions` copies finished requests (their data and result).
    private let finishedData: UnsafeMutablePointer<UInt64>
    private let finishedResults: UnsafeMutablePointer<Int32>
    private let operations = InFlightOperations(capacity: URingLoopQueue.capacity)
    /// Entries filled since the last submission.
    @exclusivity(unchecked) private var queued = 0
    @exclusivity(unchecked) private var closed = false

    /// Page-cache writes and large cached reads go to a thread of their own (see
    /// `PageCacheThread`), made on the first; nil before that, or when it could not be
    /// made (then writes go through the ring, and reads stay with the caller).
    @exclusivity(unchecked) private var pageCacheThread: PageCacheThread?
    @exclusivity(unchecked) private var pageCacheThreadUnavailable = false
    /// Jobs staged for the thread or handed to it, and not yet collected back.
    @exclusivity(unchecked) private var threadInFlight = 0
    /// Reads the page-cache thread handed back uncached, read through the ring since
    /// the queue was made (for tests).
    @exclusivity(unchecked) private(set) var readsPassedToRing = 0

    /// Requests handed out and not yet completed (queued or in the kernel).
    @exclusivity(unchecked) public private(set) var inFlight = 0

    public var handlesPageCacheAsynchronously: Bool { true }

    /// Whether completions made on other threads (io-wq workers finishing buffered
    /// writes, interrupts) reach this ring without interrupting its owner: they are
    /// posted when the owner next enters the kernel, and a sleeping owner is woken as
    /// before. False on kernels before 5.19, which refuse the setting.
    public var completesCooperatively: Bool { thinbd_ring_is_cooperative(ring) != 0 }

    public init() throws(SystemError) {
        let efd = thinbd_eventfd()
        guard efd >= 0 else { throw SystemError.current("eventfd") }
        var error: Int32 = 0
        guard let ring = thinbd_ring_create(UInt32(Self.capacity), efd, &error) else {
            Syscall.close(efd)
            throw SystemError(SystemError.Code(rawValue: error), "io_uring_queue_init")
        }
        self.ring = ring
        eventFD = efd
        finishedData = .allocate(capacity: Self.capacity)
        finishedResults = .allocate(capacity: Self.capacity)
    }

    deinit {
        close()
        finishedData.deallocate()
        finishedResults.deallocate()
    }

    public func makeReadinessDescriptor() throws(SystemError) -> Int32 {
        let copy = Glibc.dup(eventFD)
        guard copy >= 0 else { throw SystemError.current("dup") }
        return copy
    }

    public func enqueue(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool {
        guard !closed, !requests.isEmpty, inFlight + requests.count <= Self.capacity,
            thinbd_ring_space(ring) >= requests.count,
            requests.allSatisfy({ $0.buffer.count > 0 && $0.buffer.count <= Int(UInt32.max) })
        else { return false }
        // Each request takes a ring entry and counts in `inFlight`, so a slot is free.
        guard let index = operations.start(parts: requests.count, completion: completion) else { return false }
        for request in requests {
            let prepared = prepare(fd: fd, request, slot: index)
            assert(prepared, "room was checked above: the ring has an entry for each")
        }
        inFlight += requests.count
        if queued >= LoopBurst.submitEvery { submitQueued() }
        return true
    }

    /// Fills a ring entry for one part of operation `slot`, which the caller counts in
    /// `inFlight`; false when the ring has no free entry.
    private func prepare(fd: Int32, _ request: IORequest, slot: Int) -> Bool {
        let length = UInt32(request.buffer.count)
        // The operation's index and the length expected back, to tell a short transfer.
        guard thinbd_ring_prepare(
            ring, request.kind == .write ? 1 : 0, fd, request.buffer.baseAddress, length, request.offset,
            UInt64(slot) << 32 | UInt64(length)) == 0
        else { return false }
        queued += 1
        return true
    }

    /// Writes of a file opened without O_DIRECT: made by plain pwrite on the queue's
    /// page-cache thread instead of io_uring (whose io-wq hand-off costs the kernel more;
    /// see `PageCacheThread`). Handed over at `submitQueued` only, not every
    /// `LoopBurst.submitEvery` as the ring's are: a disk left idle loses time, but the
    /// thread's work is a copy into the page cache, and handing it over mid-pass woke
    /// it more often for the same work (4 KiB random writes at QD32: median 110.7k IOPS
    /// handing over every 4, 121.6k at the end of the pass; docs/performance.md).
    /// Completed by `runCompletions` like the ring's. Falls back to the ring when the
    /// thread cannot be made.
    public func enqueuePageCacheWrites(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool {
        guard requests.allSatisfy({ $0.kind == .write }) else { return false }
        guard let thread = startedPageCacheThread() else { return enqueue(fd: fd, requests, completion: completion) }
        return hand(requests, fd: fd, to: thread, completion: completion)
    }

    /// Reads of a file opened without O_DIRECT, copied out of the page cache by the
    /// queue's page-cache thread, so that the copy is not the owner's: what the cache
    /// cannot serve without waiting comes back and is read through the ring, for the
    /// same operation. Handed over at `submitQueued`, like writes. False, taking
    /// nothing, when the thread cannot be made or the queue is full: the caller then
    /// reads them itself.
    public func enqueueCachedReads(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool {
        guard requests.allSatisfy({ $0.kind == .read }), let thread = startedPageCacheThread() else { return false }
        return hand(requests, fd: fd, to: thread, completion: completion)
    }

    private func hand(_ requests: [IORequest], fd: Int32, to thread: PageCacheThread, completion: @escaping (SystemError?) -> Void) -> Bool {
        guard !closed, !requests.isEmpty, inFlight + requests.count <= Self.capacity,
            requests.allSatisfy({ $0.buffer.count > 0 && $0.buffer.count <= Int(UInt32.max) })
        else { return false }
        // `inFlight` bounds the jobs out, and the thread's rings hold `capacity`, so this
        // holds; checked anyway, since a job staged in part could not be taken back.
        guard thread.hasRoom(for: requests.count),
            let index = operations.start(parts: requests.count, completion: completion)
        else { return false }
        for request in requests {
            let staged = thread.stage(PageCacheThread.Job(fd: fd, request: request, slot: index))
            assert(staged, "hasRoom said the ring holds them all")
        }
        inFlight += requests.count
        threadInFlight += requests.count
        return true
    }

    public var isBusyOnItsThread: Bool { threadInFlight > 0 }

    /// Whether the page-cache thread runs (it starts with the first job for it).
    public var hasPageCacheThread: Bool { pageCacheThread != nil }

    private func startedPageCacheThread() -> PageCacheThread? {
        if let pageCacheThread { return pageCacheThread }
        guard !pageCacheThreadUnavailable else { return nil }
        pageCacheThread = try? PageCacheThread(readiness: eventFD, capacity: Self.capacity)
        pageCacheThreadUnavailable = pageCacheThread == nil
        return pageCacheThread
    }

    public func submitQueued() {
        pageCacheThread?.submit()
        guard queued > 0 else { return }
        while true {
            let r = thinbd_ring_submit(ring)
            if r >= 0 {
                queued = max(0, queued - Int(r))
                if queued == 0 { return }
                continue
            }
            if r == -EINTR { continue }
            // The kernel is short of resources (EAGAIN, EBUSY, ENOMEM): the entries stay
            // in the ring, and the readiness descriptor is made to fire so that the owner
            // comes back and submits them. They cannot be taken back: failing them now
            // would hand their buffers back while the kernel may still fill them.
            var one: UInt64 = 1
            _ = Glibc.write(eventFD, &one, 8)
            return
        }
    }

    @discardableResult
    public func runCompletions(atMost limit: Int) -> Int {
        var count = 0
        let limit = min(max(limit, 1), Self.capacity)
        if inFlight > threadInFlight {
            // Copied out and released first: completions may queue more work.
            count = Int(thinbd_ring_reap(ring, finishedData, finishedResults, UInt32(limit)))
            for i in 0..<count { finish(finishedData[i], finishedResults[i]) }
        }
        count += runPageCacheThreadCompletions(atMost: limit - count)
        // What an earlier submission could not hand over goes now.
        submitQueued()
        return count
    }

    private func runPageCacheThreadCompletions(atMost limit: Int) -> Int {
        // Asked even with nothing in flight: collecting is what re-arms the thread's
        // signal, and the signal may outlive the outcome it announced (collected before
        // the thread got to signal).
        guard let pageCacheThread, limit > 0 else { return 0 }
        return pageCacheThread.collect(atMost: limit) { finished in
            threadInFlight -= 1
            var error = finished.error
            if let read = finished.uncachedRead {
                // Still in flight, now in the ring. The ring has room: its waiting entries
                // count in `inFlight` too, which never passes its size. Should that break,
                // the read fails rather than never completing.
                readsPassedToRing += 1
                if prepare(fd: read.fd, read.request, slot: read.slot) { return }
                submitQueued()
                if prepare(fd: read.fd, read.request, slot: read.slot) { return }
                error = SystemError(.io, "io_uring had no entry for a read the page cache could not serve")
            }
            inFlight -= 1
            guard let done = operations.finishPart(of: finished.slot, error: error) else { return }
            done.completion(done.error)
        }
    }

    private func finish(_ data: UInt64, _ result: Int32) {
        let expected = Int(data & 0xFFFF_FFFF)
        let slot = Int(data >> 32)
        guard operations.isStarted(slot) else { return }
        inFlight -= 1
        guard let done = operations.finishPart(of: slot, error: AIOFileDevice.transferError(result: Int(result), expected: expected))
        else { return }
        done.completion(done.error)
    }

    /// Performs `requests` on `fd` together and waits for all of them: for a thread that
    /// may block and has several reads to make (the page cache's misses are then read
    /// side by side, not one after another). The caller owns this queue meanwhile.
    ///
    /// Returns only once every request handed to the kernel has completed, whatever
    /// happens: until then the kernel may still fill or read the caller's buffers. When
    /// the kernel refuses a submission for want of resources it is offered again; when
    /// waiting itself fails, completions are collected by polling instead, and the ring
    /// is marked `isBroken` (not to be lent again).
    public func performAndWait(fd: Int32, _ requests: [IORequest]) throws(SystemError) {
        NonBlockingThread.assertMayBlock("waiting for a ring's completions")
        var start = 0
        while start < requests.count {
            let part = Array(requests[start..<min(requests.count, start + Self.capacity)])
            var outcome: SystemError?? = .none
            guard enqueue(fd: fd, part, completion: { outcome = .some($0) }) else {
                throw SystemError(.io, "io_uring queue refused \(part.count) requests")
            }
            submitQueued()
            collectCompletions(until: { outcome != nil })
            if case .some(.some(let error)) = outcome { throw error }
            start += part.count
        }
    }

    /// Set when waiting on the ring failed in a way that retrying may not cure: the
    /// borrower that owns it closes it instead of lending it again.
    @exclusivity(unchecked) public private(set) var isBroken = false

    /// A failure the next `waitForCompletion` reports instead of waiting (a negative
    /// errno), for tests of the path no kernel takes on demand.
    @exclusivity(unchecked) var injectedWaitFailure: Int32 = 0

    /// Runs completions, blocking between them, until `done`. Never gives up while
    /// requests are the kernel's: entries it refused for want of resources are offered
    /// again, and when waiting fails the completion descriptor is polled instead.
    private func collectCompletions(until done: () -> Bool) {
        while !done() {
            if runCompletions() > 0 { continue }
            if queued > 0 {
                SystemInfo.sleep(milliseconds: 1)
                submitQueued()
                continue
            }
            if isBroken {
                waitForCompletionSignal(milliseconds: 10)
                continue
            }
            let r = waitForCompletion()
            if r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY { isBroken = true }
        }
    }

    private func waitForCompletion() -> Int32 {
        if injectedWaitFailure != 0 {
            defer { injectedWaitFailure = 0 }
            return injectedWaitFailure
        }
        return thinbd_ring_wait(ring)
    }

    /// Sleeps until the completion descriptor fires or `milliseconds` pass; the system
    /// call also lets the kernel post completions it holds for this thread.
    private func waitForCompletionSignal(milliseconds: Int32) {
        var entry = pollfd(fd: eventFD, events: Int16(POLLIN), revents: 0)
        if Glibc.poll(&entry, 1, milliseconds) > 0 {
            var count: UInt64 = 0
            _ = Glibc.read(eventFD, &count, 8)
        }
    }

    public func close() {
        guard !closed else { return }
        closed = true
        submitQueued()
        if let pageCacheThread {
            // The thread's jobs point into buffers their owners free on completion, so
            // they are waited for, like the ring's below (this runs when the loop shuts
            // its queue down). The thread signals the eventfd whenever its finished list
            // goes from empty to non-empty, so each poll either finds news or sleeps.
            // Reads it hands back go to the ring and are waited for below.
            while threadInFlight > 0 {
                if runPageCacheThreadCompletions(atMost: Self.capacity) > 0 { continue }
                waitForCompletionSignal(milliseconds: 100)
            }
            pageCacheThread.stop()
            submitQueued()
        }
        collectCompletions(until: { inFlight == 0 })
        thinbd_ring_destroy(ring)
        Syscall.close(eventFD)
    }
}
