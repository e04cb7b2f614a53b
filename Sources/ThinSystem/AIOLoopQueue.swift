import CLibAIO
import CThinSupport
import Glibc

/// libaio owned by one thread (an event loop), so that a request can go from socket to
/// disk and back without changing threads.
///
/// - `enqueue` prepares iocbs in preallocated slots, and hands them to the kernel once
///   `LoopBurst.submitEvery` wait, so that the disk starts on a burst's first requests.
/// - `submitQueued` hands the rest to the kernel in one io_submit: the owner calls it
///   once per pass over its sockets.
/// - Completions signal an eventfd; the owner watches a duplicate of it
///   (`makeReadinessDescriptor`) and calls `runCompletions`, which runs each operation's
///   completion on the owner's thread.
///
/// Not thread-safe: every call comes from the owning thread. Cost: no allocation per
/// operation (the operation table is allocated once); one io_submit per
/// `submitQueued` or per `LoopBurst.submitEvery` requests, one io_getevents per
/// `runCompletions(atMost:)`.
public final class AIOLoopQueue: LoopDiskQueue, @unchecked Sendable {
    /// iocbs in flight at once; `enqueue` refuses work beyond it.
    public static let capacity = 256
    public var capacity: Int { Self.capacity }

    private let context: io_context_t
    private let eventFD: Int32
    private let iocbs: UnsafeMutablePointer<iocb>
    private let events: UnsafeMutablePointer<io_event>
    private var freeIOCBs: [Int32]
    private var queued: [UnsafeMutablePointer<iocb>?] = []
    private var submitting: [UnsafeMutablePointer<iocb>?] = []
    private let operations = InFlightOperations(capacity: AIOLoopQueue.capacity)
    private var closed = false

    /// iocbs handed out and not yet completed (queued or in the kernel).
    public private(set) var inFlight = 0

    /// libaio reads and writes a file opened without O_DIRECT inside io_submit: it would block.
    public var handlesPageCacheAsynchronously: Bool { false }

    public init() throws(SystemError) {
        let efd = thinbd_eventfd()
        guard efd >= 0 else { throw SystemError.current("eventfd") }
        var ctx: io_context_t?
        let r = io_setup(Int32(Self.capacity), &ctx)
        if r < 0 {
            Syscall.close(efd)
            throw SystemError(SystemError.Code(rawValue: -r), "io_setup")
        }
        context = ctx!
        eventFD = efd
        iocbs = .allocate(capacity: Self.capacity)
        events = .allocate(capacity: Self.capacity)
        freeIOCBs = (0..<Int32(Self.capacity)).reversed()
        queued.reserveCapacity(Self.capacity)
        submitting.reserveCapacity(Self.capacity)
    }

    deinit {
        close()
        iocbs.deallocate()
        events.deallocate()
    }

    /// A new descriptor (the caller closes it) that becomes readable when completions
    /// are waiting. Reading it resets the signal; `runCompletions` does not read it.
    public func makeReadinessDescriptor() throws(SystemError) -> Int32 {
        let copy = Glibc.dup(eventFD)
        guard copy >= 0 else { throw SystemError.current("dup") }
        return copy
    }

    /// Closes a descriptor from `makeReadinessDescriptor`.
    public static func releaseReadinessDescriptor(_ descriptor: Int32) {
        Syscall.close(descriptor)
    }

    /// Queues `requests` (aligned for O_DIRECT, none empty) on `fd` as one operation;
    /// `completion` runs on the owning thread, from `runCompletions` (or from
    /// `submitQueued` when the kernel refuses them). Returns false, queuing nothing,
    /// when the queue has no room or is closed.
    public func enqueue(fd: Int32, _ requests: [IORequest], completion: @escaping (SystemError?) -> Void) -> Bool {
        guard !closed, !requests.isEmpty, requests.count <= freeIOCBs.count,
            // Each request takes an iocb, so a slot is free when iocbs are.
            let index = operations.start(parts: requests.count, completion: completion)
        else { return false }
        let token = UnsafeMutableRawPointer(bitPattern: index + 1)
        for request in requests {
            let cb = iocbs + Int(freeIOCBs.removeLast())
            switch request.kind {
            case .read: io_prep_pread(cb, fd, request.buffer.baseAddress, request.buffer.count, Int64(request.offset))
            case .write: io_prep_pwrite(cb, fd, request.buffer.baseAddress, request.buffer.count, Int64(request.offset))
            }
            io_set_eventfd(cb, eventFD)
            cb.pointee.data = token
            queued.append(cb)
        }
        inFlight += requests.count
        // A refusal leaves them queued: `submitQueued` fails them, so that no completion
        // runs from inside `enqueue`.
        if queued.count >= LoopBurst.submitEvery { _ = handOverQueued() }
        return true
    }

    /// Hands everything queued to the kernel. Completions may run from here (only for
    /// iocbs the kernel refused), and they may queue and submit more.
    public func submitQueued() {
        guard let failure = handOverQueued() else { return }
        // Swapped out first: a completion run below may queue again.
        swap(&queued, &submitting)
        let refused = submitting.map { $0! }
        submitting.removeAll(keepingCapacity: true)
        for cb in refused { finish(cb, result: -Int(failure.code.rawValue), expected: 0) }
    }

    /// Hands queued iocbs to the kernel; when it refuses one, that one and those after
    /// it stay queued and the refusal is returned.
    private func handOverQueued() -> SystemError? {
        guard !queued.isEmpty else { return nil }
        var submitted = 0
        var failure: SystemError?
        queued.withUnsafeMutableBufferPointer { list in
            while submitted < list.count {
                let r = io_submit(context, list.count - submitted, list.baseAddress! + submitted)
                if r == -EINTR || r == -EAGAIN { continue }
                if r < 0 {
                    failure = SystemError(SystemError.Code(rawValue: -r), "io_submit")
                    return
                }
                submitted += Int(r)
            }
        }
        queued.removeFirst(submitted)
        return failure
    }

    /// Collects finished iocbs without waiting and runs the completions of operations
    /// whose last iocb finished. Returns how many iocbs finished.
    @discardableResult
    public func runCompletions(atMost limit: Int) -> Int {
        var noWait = timespec(tv_sec: 0, tv_nsec: 0)
        while inFlight > 0 {
            let got = io_getevents(context, 0, min(max(limit, 1), Self.capacity), events, &noWait)
            if got == -EINTR { continue }
            if got <= 0 { break }
            finishEvents(Int(got))
            return Int(got)
        }
        return 0
    }

    private func finishEvents(_ count: Int) {
        for i in 0..<count {
            let event = events[i]
            finish(event.obj, result: Int(bitPattern: event.res), expected: Int(event.obj.pointee.u.c.nbytes))
        }
    }

    private func finish(_ cb: UnsafeMutablePointer<iocb>, result: Int, expected: Int) {
        let index = Int(bitPattern: cb.pointee.data) - 1
        freeIOCBs.append(Int32(cb - iocbs))
        inFlight -= 1
        guard let done = operations.finishPart(of: index, error: AIOFileDevice.transferError(result: result, expected: expected))
        else { return }
        done.completion(done.error)
    }

    /// Submits what is queued, waits for everything in flight, runs those completions,
    /// and releases the kernel context. Later `enqueue` calls return false.
    public func close() {
        guard !closed else { return }
        submitQueued()
        closed = true
        while inFlight > 0 {
            let got = io_getevents(context, 1, Self.capacity, events, nil)
            if got == -EINTR { continue }
            if got <= 0 { break }
            finishEvents(Int(got))
        }
        io_destroy(context)
        Syscall.close(eventFD)
    }
}
