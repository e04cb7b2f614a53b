import CLibAIO
import Dispatch
import Glibc

/// libaio with O_DIRECT. Any number of threads may call `perform` at once: each batch is
/// one io_submit, and a reaper thread collects completions with io_getevents (up to 256
/// per call) and wakes the batch's caller when its last request is done. So concurrent
/// requests from many connections reach the disk together instead of one at a time.
///
/// O_DIRECT needs 4096-byte alignment of buffer, offset and length. Aligned requests go
/// straight to the kernel; unaligned ones are bounced through an aligned buffer (a
/// read-modify-write for writes), so callers on the hot path pass aligned buffers.
public final class AIOFileDevice: BlockDevice, @unchecked Sendable {
    static let queueDepth: Int32 = 1024
    static let alignment = UInt64(AlignedBuffer.directIOAlignment)

    let fd: Int32
    private let context: io_context_t
    private let stateLock = Lock()
    private let bounceLock = Lock()
    private var closed = false
    private var inFlightBatches = 0
    private var reaper: pthread_t?
    private let reaperStopped = DispatchSemaphore(value: 0)

    /// One `perform` call's requests: the caller waits on `done`.
    final class Batch: @unchecked Sendable {
        let done = DispatchSemaphore(value: 0)
        let lock = Lock()
        var remaining: Int
        var error: SystemError?

        init(count: Int) { remaining = count }

        /// Called by the reaper for each completed request.
        func complete(result: Int, expected: Int) {
            let finished = lock.withLock { () -> Bool in
                if result < 0 {
                    error = error ?? SystemError(SystemError.Code(rawValue: Int32(-result)), "aio")
                } else if result != expected {
                    error = error ?? SystemError(.io, "short aio transfer (\(result) of \(expected) bytes)")
                }
                remaining -= 1
                return remaining == 0
            }
            if finished { done.signal() }
        }
    }

    init(fd: Int32) throws {
        self.fd = fd
        var ctx: io_context_t?
        let r = io_setup(Self.queueDepth, &ctx)
        if r < 0 { throw SystemError(SystemError.Code(rawValue: -r), "io_setup") }
        context = ctx!
        try startReaper()
    }

    deinit {
        close()
    }

    public var engineName: String { "libaio+O_DIRECT" }

    public var size: UInt64 { (try? Syscall.fileSize(fd)) ?? 0 }

    @inline(__always)
    static func isAligned(_ request: IORequest) -> Bool {
        let address = UInt64(UInt(bitPattern: request.buffer.baseAddress))
        return (address | request.offset | UInt64(request.buffer.count)) & (alignment - 1) == 0
    }

    public func perform(_ requests: [IORequest]) throws {
        var aligned: [IORequest] = []
        aligned.reserveCapacity(requests.count)
        for request in requests where request.buffer.count > 0 {
            if Self.isAligned(request) {
                aligned.append(request)
            } else {
                try bounce(request)
            }
        }
        guard !aligned.isEmpty else { return }
        try submitAndWait(aligned)
    }

    private func submitAndWait(_ requests: [IORequest]) throws {
        let batch = Batch(count: requests.count)
        let count = requests.count
        let iocbs = UnsafeMutablePointer<iocb>.allocate(capacity: count)
        let pointers = UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>.allocate(capacity: count)
        defer {
            iocbs.deallocate()
            pointers.deallocate()
        }
        let token = Unmanaged.passUnretained(batch).toOpaque()
        for (slot, request) in requests.enumerated() {
            let cb = iocbs + slot
            switch request.kind {
            case .read: io_prep_pread(cb, fd, request.buffer.baseAddress, request.buffer.count, Int64(request.offset))
            case .write: io_prep_pwrite(cb, fd, request.buffer.baseAddress, request.buffer.count, Int64(request.offset))
            }
            cb.pointee.data = token
            pointers[slot] = cb
        }
        try stateLock.withLock { () throws(SystemError) in
            guard !closed else { throw SystemError(.badFile, "pool file closed") }
            inFlightBatches += 1
        }
        defer { stateLock.withLock { inFlightBatches -= 1 } }
        var submitted = 0
        while submitted < count {
            let r = io_submit(context, count - submitted, pointers + submitted)
            if r == -EINTR || r == -EAGAIN { continue }
            if r < 0 {
                // Requests never submitted complete here, with the error; the rest in the reaper.
                let error = SystemError(SystemError.Code(rawValue: -r), "io_submit")
                for _ in submitted..<count { batch.complete(result: -Int(error.code.rawValue), expected: 0) }
                break
            }
            submitted += Int(r)
        }
        batch.done.wait()
        if let error = batch.lock.withLock({ batch.error }) { throw error }
    }

    private func startReaper() throws {
        let box = Unmanaged.passRetained(self)
        var thread = pthread_t()
        let r = pthread_create(&thread, nil, { argument in
            let device = Unmanaged<AIOFileDevice>.fromOpaque(argument!).takeRetainedValue()
            device.reap()
            return nil
        }, box.toOpaque())
        guard r == 0 else {
            box.release()
            throw SystemError(SystemError.Code(rawValue: r), "pthread_create")
        }
        reaper = thread
        pthread_detach(thread)
    }

    /// The reaper loop: collects completions until the device closes and nothing is in flight.
    private func reap() {
        let capacity = 256
        let events = UnsafeMutablePointer<io_event>.allocate(capacity: capacity)
        defer {
            events.deallocate()
            reaperStopped.signal()
        }
        var timeout = timespec(tv_sec: 0, tv_nsec: 50_000_000)
        while true {
            let n = io_getevents(context, 1, capacity, events, &timeout)
            if n > 0 {
                for i in 0..<Int(n) {
                    let event = events[i]
                    let batch = Unmanaged<Batch>.fromOpaque(event.data!).takeUnretainedValue()
                    let expected = Int(event.obj.pointee.u.c.nbytes)
                    batch.complete(result: Int(bitPattern: event.res), expected: expected)
                }
                continue
            }
            if n < 0 && n != -EINTR {
                // The context is gone: nothing more can complete.
                return
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
                _ = try Syscall.preadFully(fd, UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[0..<Int(a)]), start)
                if end - start > a {
                    let last = Int(end - start - a)
                    _ = try Syscall.preadFully(fd, UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[last..<last + Int(a)]), end - a)
                }
                UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[inner..<inner + request.buffer.count])
                    .copyMemory(from: UnsafeRawBufferPointer(request.buffer))
                try Syscall.pwriteFully(fd, UnsafeRawBufferPointer(scratch.bytes), start)
            }
        }
    }

    public func barrier() throws { try Syscall.fdatasync(fd) }

    public func setSize(_ newSize: UInt64) throws { try Syscall.ftruncate(fd, newSize) }

    public func discard(at offset: UInt64, length: UInt64) -> Bool {
        Syscall.punchHole(fd, offset, length)
    }

    public var allocatedBytes: UInt64? { try? Syscall.allocatedBytes(fd) }

    public func close() {
        let wasOpen = stateLock.withLock { () -> Bool in
            defer { closed = true }
            return !closed
        }
        guard wasOpen else { return }
        // The reaper stops once nothing is in flight; then the context can go.
        reaperStopped.wait()
        io_destroy(context)
        Syscall.close(fd)
    }
}
