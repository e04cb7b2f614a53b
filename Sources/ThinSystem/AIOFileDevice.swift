import CLibAIO
import CThinSupport
import Dispatch
import Glibc

/// libaio with O_DIRECT, for many threads at once.
///
/// Submission: a caller queues its iocbs; whichever caller finds no submission running
/// becomes the submitter and hands everything queued to the kernel, up to 256 iocbs per
/// io_submit, until the queue is empty. Under load, requests from many connections leave
/// in few io_submit calls.
///
/// Completion: every iocb signals an eventfd. A reaper thread waits on it, collects
/// completions with io_getevents (up to 256 per call) and wakes each batch's caller when
/// its last request is done.
///
/// O_DIRECT needs 4096-byte alignment of buffer, offset and length. Aligned requests go
/// straight to the kernel; unaligned ones are bounced through an aligned buffer (a
/// read-modify-write for writes), so callers on the hot path pass aligned buffers.
public final class AIOFileDevice: BlockDevice, @unchecked Sendable {
    static let queueDepth: Int32 = 1024
    static let submitChunk = 256
    static let alignment = UInt64(AlignedBuffer.directIOAlignment)

    let fd: Int32
    private let context: io_context_t
    private let eventFD: Int32
    private let stateLock = Lock()
    private let bounceLock = Lock()
    private var closed = false
    private var inFlightBatches = 0
    private let reaperStopped = DispatchSemaphore(value: 0)

    private let queueLock = Lock()
    private var queue: [UnsafeMutablePointer<iocb>] = []
    private var submitting = false
    private var submitList: [UnsafeMutablePointer<iocb>?] = []

    /// One `perform` call's requests: the caller waits on `done`.
    final class Batch: @unchecked Sendable {
        let done = DispatchSemaphore(value: 0)
        let lock = Lock()
        var remaining: Int
        var error: SystemError?
        /// Asynchronous batches: called (by the reaper) instead of signalling `done`.
        var completion: (@Sendable (SystemError?) -> Void)?

        init(count: Int) { remaining = count }

        /// Called once for each request of the batch, by the reaper or a failed submission.
        func complete(result: Int, expected: Int) {
            let finished = lock.withLock { () -> Bool in
                error = error ?? AIOFileDevice.transferError(result: result, expected: expected)
                remaining -= 1
                return remaining == 0
            }
            guard finished else { return }
            if let completion { completion(lock.withLock { error }) } else { done.signal() }
        }
    }

    init(fd: Int32) throws {
        self.fd = fd
        let efd = thinbd_eventfd()
        guard efd >= 0 else { throw SystemError.current("eventfd") }
        eventFD = efd
        var ctx: io_context_t?
        let r = io_setup(Self.queueDepth, &ctx)
        if r < 0 {
            Syscall.close(efd)
            throw SystemError(SystemError.Code(rawValue: -r), "io_setup")
        }
        context = ctx!
        submitList.reserveCapacity(Self.submitChunk)
        try startReaper()
    }

    deinit {
        close()
    }

    public var engineName: String { "libaio+O_DIRECT" }

    public var size: UInt64 { get throws { try Syscall.fileSize(fd) } }

    /// What one finished iocb says: nil, or the error its result code (a negative errno,
    /// or fewer bytes than asked) stands for.
    static func transferError(result: Int, expected: Int) -> SystemError? {
        if result < 0 { return SystemError(SystemError.Code(rawValue: Int32(-result)), "aio") }
        if result != expected { return SystemError(.io, "short aio transfer (\(result) of \(expected) bytes)") }
        return nil
    }

    /// Serves unaligned (and drops empty) requests here, through a bounce buffer, and
    /// returns the ones left for the kernel. Cost: no allocation when all are aligned.
    private func bounceUnaligned(_ requests: [IORequest]) throws -> [IORequest] {
        if requests.allSatisfy({ $0.buffer.count > 0 && $0.isDirectIOAligned }) { return requests }
        var aligned: [IORequest] = []
        aligned.reserveCapacity(requests.count)
        for request in requests where request.buffer.count > 0 {
            if request.isDirectIOAligned { aligned.append(request) } else { try bounce(request) }
        }
        return aligned
    }

    public func perform(_ requests: [IORequest]) throws {
        NonBlockingThread.assertMayBlock("synchronous device I/O")
        let aligned = try bounceUnaligned(requests)
        guard !aligned.isEmpty else { return }
        try submitAndWait(aligned)
    }

    /// Queues the reads on the caller's loop queue when all are aligned and it has room.
    public func startReadsWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart {
        guard let queue, requests.allSatisfy({ $0.buffer.count > 0 && $0.isDirectIOAligned }) else { return .wouldBlock }
        return queue.enqueue(fd: fd, requests, completion: completion) ? .started : .wouldBlock
    }

    public func startWritesWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart {
        guard requests.allSatisfy({ $0.kind == .write }) else { return .wouldBlock }
        return startReadsWithoutBlocking(requests, on: queue, completion: completion)
    }

    private func prepare(_ requests: [IORequest], for batch: Batch) -> UnsafeMutablePointer<iocb> {
        let iocbs = UnsafeMutablePointer<iocb>.allocate(capacity: requests.count)
        let token = Unmanaged.passUnretained(batch).toOpaque()
        for (slot, request) in requests.enumerated() {
            let cb = iocbs + slot
            switch request.kind {
            case .read: io_prep_pread(cb, fd, request.buffer.baseAddress, request.buffer.count, Int64(request.offset))
            case .write: io_prep_pwrite(cb, fd, request.buffer.baseAddress, request.buffer.count, Int64(request.offset))
            }
            io_set_eventfd(cb, eventFD)
            cb.pointee.data = token
        }
        return iocbs
    }

    private func beginBatch() throws(SystemError) {
        try stateLock.withLock { () throws(SystemError) in
            guard !closed else { throw SystemError(.badFile, "pool file closed") }
            inFlightBatches += 1
        }
    }

    private func endBatch() {
        let wakeReaper = stateLock.withLock { () -> Bool in
            inFlightBatches -= 1
            return closed && inFlightBatches == 0
        }
        if wakeReaper {
            var one: UInt64 = 1
            _ = Glibc.write(eventFD, &one, 8)
        }
    }

    private func submitAndWait(_ requests: [IORequest]) throws {
        let batch = Batch(count: requests.count)
        let iocbs = prepare(requests, for: batch)
        defer { iocbs.deallocate() }
        try beginBatch()
        defer { endBatch() }
        enqueue(iocbs, requests.count)
        batch.done.wait()
        if let error = batch.lock.withLock({ batch.error }) { throw error }
    }

    /// Starts the batch and returns; the reaper thread calls `completion`. Unaligned
    /// requests are bounced first, on this thread.
    public func submit(_ requests: [IORequest], completion: @escaping @Sendable (SystemError?) -> Void) {
        let aligned: [IORequest]
        do {
            aligned = try bounceUnaligned(requests)
            guard !aligned.isEmpty else {
                completion(nil)
                return
            }
            try beginBatch()
        } catch {
            completion(error as? SystemError ?? SystemError(.io, "\(error)"))
            return
        }
        let batch = Batch(count: aligned.count)
        let iocbs = prepare(aligned, for: batch)
        // The kernel holds `iocbs` and the reaper finds the batch through them: both live
        // until the last completion.
        let retained = Unmanaged.passRetained(batch)
        let iocbAddress = UInt(bitPattern: iocbs)
        batch.completion = { [weak self] error in
            UnsafeMutablePointer<iocb>(bitPattern: iocbAddress)?.deallocate()
            self?.endBatch()
            completion(error)
            retained.release()
        }
        enqueue(iocbs, aligned.count)
    }

    /// Queues iocbs and, unless another thread is already submitting, submits the queue.
    private func enqueue(_ iocbs: UnsafeMutablePointer<iocb>, _ count: Int) {
        queueLock.lock()
        for i in 0..<count { queue.append(iocbs + i) }
        if submitting {
            queueLock.unlock()
            return
        }
        submitting = true
        while !queue.isEmpty {
            let n = min(queue.count, Self.submitChunk)
            submitList.removeAll(keepingCapacity: true)
            for i in 0..<n { submitList.append(queue[i]) }
            queue.removeFirst(n)
            queueLock.unlock()
            submitList.withUnsafeMutableBufferPointer { list in submitAll(list.baseAddress!, n) }
            queueLock.lock()
        }
        submitting = false
        queueLock.unlock()
    }

    private func submitAll(_ list: UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>, _ count: Int) {
        var submitted = 0
        while submitted < count {
            let r = io_submit(context, count - submitted, list + submitted)
            if r == -EINTR || r == -EAGAIN { continue }
            if r < 0 {
                // These never reached the kernel: fail them here; the rest complete in the reaper.
                for i in submitted..<count {
                    let cb = list[i]!
                    Unmanaged<Batch>.fromOpaque(cb.pointee.data!).takeUnretainedValue().complete(result: Int(r), expected: 0)
                }
                return
            }
            submitted += Int(r)
        }
    }

    private func startReaper() throws {
        // The reaper keeps the device alive until it stops.
        try DetachedThread.start { [self] in reap() }
    }

    /// The reaper loop: sleeps on the eventfd, drains completions, and stops once the
    /// device is closed and nothing is in flight.
    private func reap() {
        let capacity = 256
        let events = UnsafeMutablePointer<io_event>.allocate(capacity: capacity)
        defer {
            events.deallocate()
            reaperStopped.signal()
        }
        var counter: UInt64 = 0
        var noWait = timespec(tv_sec: 0, tv_nsec: 0)
        while true {
            let n = Glibc.read(eventFD, &counter, 8)
            if n < 0 && errno == EINTR { continue }
            // The counter says how many completed; collect them all.
            var remaining = Int(counter)
            while remaining > 0 {
                let got = io_getevents(context, 1, min(capacity, remaining), events, &noWait)
                if got == -EINTR { continue }
                if got <= 0 { break }
                for i in 0..<Int(got) {
                    let event = events[i]
                    let batch = Unmanaged<Batch>.fromOpaque(event.data!).takeUnretainedValue()
                    batch.complete(result: Int(bitPattern: event.res), expected: Int(event.obj.pointee.u.c.nbytes))
                }
                remaining -= Int(got)
            }
            let done = stateLock.withLock { closed && inFlightBatches == 0 }
            if done { return }
        }
    }

    /// Serves an unaligned request through an aligned bounce buffer.
    private func bounce(_ request: IORequest) throws {
        let a = Self.alignment
        let start = request.offset & ~(a - 1)
        let end = (request.offset + UInt64(request.buffer.count) + a - 1) & ~(a - 1)
        let scratch = AlignedBuffer(count: Int(end - start))
        let inner = Int(request.offset - start)
        switch request.kind {
        case .read:
            let n = try Syscall.preadFully(fd, scratch.bytes, start)
            if n < inner + request.buffer.count {
                throw SystemError(.io, "read past end of pool file at offset \(request.offset)")
            }
            request.buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: scratch.bytes[inner..<inner + request.buffer.count]))
        case .write:
            // Two unaligned writes into one page must not interleave their read-modify-writes.
            try bounceLock.withLock { () throws(SystemError) in
                if inner != 0 || (end - start) != UInt64(request.buffer.count) {
                    _ = try Syscall.preadFully(fd, UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[0..<Int(a)]), start)
                    if end - start > a {
                        let last = Int(end - start - a)
                        _ = try Syscall.preadFully(fd, UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[last..<last + Int(a)]), end - a)
                    }
                }
                UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[inner..<inner + request.buffer.count])
                    .copyMemory(from: UnsafeRawBufferPointer(request.buffer))
                try Syscall.pwriteFully(fd, UnsafeRawBufferPointer(scratch.bytes), start)
            }
        }
    }

    public func barrier() throws {
        NonBlockingThread.assertMayBlock("a device barrier")
        try Syscall.fdatasync(fd)
    }

    public func setSize(_ newSize: UInt64) throws { try Syscall.ftruncate(fd, newSize) }

    public func discard(at offset: UInt64, length: UInt64) -> Bool {
        Syscall.punchHole(fd, offset, length)
    }

    public func preallocate(at offset: UInt64, length: UInt64) throws -> Bool {
        try Syscall.allocate(fd, offset, length)
    }

    public var allocatedBytes: UInt64? { try? Syscall.allocatedBytes(fd) }
    public var fileIdentity: RawFile.Identity? { Syscall.identity(fd) }

    public func close() {
        let wasOpen = stateLock.withLock { () -> Bool in
            defer { closed = true }
            return !closed
        }
        guard wasOpen else { return }
        // Wake the reaper; it stops once nothing is in flight.
        var one: UInt64 = 1
        _ = Glibc.write(eventFD, &one, 8)
        reaperStopped.wait()
        io_destroy(context)
        Syscall.close(eventFD)
        Syscall.close(fd)
    }
}
