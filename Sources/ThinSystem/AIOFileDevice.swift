import CLibAIO
import Glibc

/// libaio with O_DIRECT: a batch becomes one io_submit and is reaped with io_getevents.
///
/// O_DIRECT needs 4096-byte alignment of buffer, offset and length. Aligned requests go
/// straight to the kernel; unaligned ones are bounced through an aligned buffer (a
/// read-modify-write for writes), so callers on the hot path pass aligned buffers.
public final class AIOFileDevice: BlockDevice, @unchecked Sendable {
    static let maxBatch = 256
    static let alignment = UInt64(AlignedBuffer.directIOAlignment)

    let fd: Int32
    private var context: io_context_t?
    private let lock = Lock()
    private var closed = false
    private let iocbs: UnsafeMutablePointer<iocb>
    private let iocbPointers: UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>
    private let events: UnsafeMutablePointer<io_event>

    init(fd: Int32) throws {
        self.fd = fd
        var ctx: io_context_t?
        let r = io_setup(Int32(Self.maxBatch), &ctx)
        if r < 0 { throw SystemError(SystemError.Code(rawValue: -r), "io_setup") }
        context = ctx
        iocbs = .allocate(capacity: Self.maxBatch)
        iocbPointers = .allocate(capacity: Self.maxBatch)
        events = .allocate(capacity: Self.maxBatch)
    }

    deinit {
        close()
        iocbs.deallocate()
        iocbPointers.deallocate()
        events.deallocate()
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
        var start = 0
        while start < aligned.count {
            let end = min(start + Self.maxBatch, aligned.count)
            try lock.withLock { () throws(SystemError) in try submitAndWait(aligned[start..<end]) }
            start = end
        }
    }

    private func submitAndWait(_ batch: ArraySlice<IORequest>) throws(SystemError) {
        guard let context, !closed else { throw SystemError(.badFile, "pool file closed") }
        for (slot, request) in batch.enumerated() {
            let cb = iocbs + slot
            switch request.kind {
            case .read:
                io_prep_pread(cb, fd, request.buffer.baseAddress, request.buffer.count, Int64(request.offset))
            case .write:
                io_prep_pwrite(cb, fd, request.buffer.baseAddress, request.buffer.count, Int64(request.offset))
            }
            cb.pointee.data = UnsafeMutableRawPointer(bitPattern: slot + 1)
            iocbPointers[slot] = cb
        }
        var submitted = 0
        while submitted < batch.count {
            let r = io_submit(context, batch.count - submitted, iocbPointers + submitted)
            if r == -EINTR || r == -EAGAIN { continue }
            if r < 0 {
                // Reap what was already submitted before reporting, so no iocb stays in flight.
                if submitted > 0 { try reap(count: submitted, batch: batch) }
                throw SystemError(SystemError.Code(rawValue: -r), "io_submit")
            }
            submitted += Int(r)
        }
        try reap(count: submitted, batch: batch)
    }

    private func reap(count: Int, batch: ArraySlice<IORequest>) throws(SystemError) {
        var reaped = 0
        var firstError: SystemError?
        while reaped < count {
            let r = io_getevents(context, count - reaped, count - reaped, events, nil)
            if r == -EINTR { continue }
            if r < 0 { throw SystemError(SystemError.Code(rawValue: -r), "io_getevents") }
            for i in 0..<Int(r) {
                let event = events[i]
                let slot = Int(bitPattern: event.data) - 1
                let expected = batch[batch.startIndex + slot].buffer.count
                let result = Int(bitPattern: event.res)
                if result < 0 {
                    firstError = firstError ?? SystemError(SystemError.Code(rawValue: Int32(-result)), "aio")
                } else if result != expected {
                    firstError = firstError ?? SystemError(.io, "short aio transfer (\(result) of \(expected) bytes)")
                }
            }
            reaped += Int(r)
        }
        if let firstError { throw firstError }
    }

    /// Serves an unaligned request through an aligned bounce buffer.
    private func bounce(_ request: IORequest) throws {
        let a = Self.alignment
        let start = request.offset & ~(a - 1)
        let end = (request.offset + UInt64(request.buffer.count) + a - 1) & ~(a - 1)
        let scratch = AlignedBuffer(count: Int(end - start))
        let inner = Int(request.offset - start)
        try lock.withLock { () throws(SystemError) in
            switch request.kind {
            case .read:
                let n = try Syscall.preadFully(fd, scratch.bytes, start)
                if n < inner + request.buffer.count {
                    throw SystemError(.io, "read past end of pool file at offset \(request.offset)")
                }
                request.buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: scratch.bytes[inner..<inner + request.buffer.count]))
            case .write:
                // Only the first and last pages can hold bytes outside the request.
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
        lock.withLock {
            if !closed {
                closed = true
                if let context { io_destroy(context) }
                context = nil
                Syscall.close(fd)
            }
        }
    }
}
