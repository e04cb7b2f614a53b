import CThinSupport
import Glibc

/// The system calls of a thread that serves sockets itself (the NBD server's lean
/// transmission loop): an epoll set, a wake-up counter other threads signal, and
/// non-blocking socket reads and gathered writes. Nothing here allocates per call once
/// made; nothing blocks except `SocketPoller.wait`, which is the loop's sleep.
///
/// Not thread-safe: one loop thread owns each object, except `WakeupCounter.signal`,
/// which any thread may call.
public final class SocketPoller {
    /// One descriptor's readiness, and the token it was added with.
    public struct Event {
        public var token: UInt64
        public var readable: Bool
        public var writable: Bool
        /// Error or hang-up: the descriptor is done for (a read says how).
        public var failed: Bool
    }

    private let descriptor: Int32
    private let ready: UnsafeMutablePointer<thinbd_poll_ready>
    private let capacity: Int32

    /// An epoll set that reports up to `batch` (at most 256) descriptors per `wait`.
    public init(batch: Int = 256) throws(SystemError) {
        let made = thinbd_poller_create()
        guard made >= 0 else { throw SystemError.current("epoll_create1") }
        descriptor = made
        capacity = Int32(clamping: min(256, max(1, batch)))
        ready = .allocate(capacity: Int(capacity))
    }

    deinit {
        ready.deallocate()
        Syscall.close(descriptor)
    }

    private func control(_ operation: Int32, _ fd: Int32, token: UInt64, readable: Bool, writable: Bool) throws(SystemError) {
        var interest: UInt32 = 0
        if readable { interest |= UInt32(THINBD_POLL_READABLE) }
        if writable { interest |= UInt32(THINBD_POLL_WRITABLE) }
        guard thinbd_poller_control(descriptor, operation, fd, interest, token) == 0 else {
            throw SystemError.current("epoll_ctl")
        }
    }

    /// Watches `fd` (level-triggered) for what is asked, reporting it with `token`.
    public func add(_ fd: Int32, token: UInt64, readable: Bool = true, writable: Bool = false) throws(SystemError) {
        try control(0, fd, token: token, readable: readable, writable: writable)
    }

    /// Changes what `fd` is watched for.
    public func modify(_ fd: Int32, token: UInt64, readable: Bool, writable: Bool) throws(SystemError) {
        try control(1, fd, token: token, readable: readable, writable: writable)
    }

    /// Waits up to `timeoutMilliseconds` (-1: no limit, 0: not at all) and calls `body`
    /// for each ready descriptor. Returns how many there were (0 on timeout or signal).
    @discardableResult
    public func wait(timeoutMilliseconds: Int32, _ body: (Event) -> Void) -> Int {
        let count = thinbd_poller_wait(descriptor, ready, capacity, timeoutMilliseconds)
        guard count > 0 else { return 0 }
        let readable = UInt32(THINBD_POLL_READABLE)
        let writable = UInt32(THINBD_POLL_WRITABLE)
        let failed = UInt32(THINBD_POLL_FAILED)
        for i in 0..<Int(count) {
            let entry = ready[i]
            body(Event(
                token: entry.token, readable: entry.events & readable != 0, writable: entry.events & writable != 0,
                failed: entry.events & failed != 0))
        }
        return Int(count)
    }
}

/// An eventfd other threads signal to wake a loop thread sleeping in its poller.
public final class WakeupCounter: @unchecked Sendable {
    public let descriptor: Int32

    public init() throws(SystemError) {
        let made = thinbd_eventfd()
        guard made >= 0 else { throw SystemError.current("eventfd") }
        do {
            try SocketIO.makeNonBlocking(made)
        } catch {
            Syscall.close(made)
            throw error
        }
        descriptor = made
    }

    deinit { Syscall.close(descriptor) }

    /// Wakes the loop (any thread; never blocks: a full counter is already signalled).
    public func signal() {
        var one: UInt64 = 1
        _ = Glibc.write(descriptor, &one, 8)
    }

    /// Resets it (the loop thread, before it looks at what it was woken for).
    public func reset() { SocketIO.resetCounter(descriptor) }
}

/// Non-blocking socket I/O for a loop thread.
public enum SocketIO {
    public enum ReadResult: Equatable {
        case bytes(Int)
        /// Nothing to read now.
        case wouldBlock
        /// The peer shut its sending side (or closed).
        case endOfFile
        case failed(SystemError)
    }

    /// Reads what is there into `buffer`.
    public static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) -> ReadResult {
        while true {
            let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if n > 0 { return .bytes(n) }
            if n == 0 { return buffer.isEmpty ? .bytes(0) : .endOfFile }
            switch errno {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return .wouldBlock
            default: return .failed(.current("read"))
            }
        }
    }

    /// A duplicate of `fd` (close-on-exec) that stays open when `fd` is closed, made
    /// non-blocking.
    public static func duplicateNonBlocking(_ fd: Int32) throws(SystemError) -> Int32 {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { throw SystemError.current("fcntl(F_DUPFD_CLOEXEC)") }
        do {
            try makeNonBlocking(copy)
        } catch {
            Syscall.close(copy)
            throw error
        }
        return copy
    }

    public static func close(_ fd: Int32) { Syscall.close(fd) }

    /// Makes `fd` non-blocking.
    public static func makeNonBlocking(_ fd: Int32) throws(SystemError) {
        guard fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) == 0 else { throw SystemError.current("fcntl(O_NONBLOCK)") }
    }

    /// Resets an eventfd counter that was made non-blocking (nothing happens when it is
    /// already zero).
    public static func resetCounter(_ fd: Int32) {
        var value: UInt64 = 0
        _ = Glibc.read(fd, &value, 8)
    }

    /// Names the calling thread (at most 15 bytes are kept), for ps, top and gdb.
    public static func nameCurrentThread(_ name: String) { thinbd_name_this_thread(name) }
}

/// Gathers pieces of memory for one gathered send to a non-blocking socket. Reused:
/// no allocation per write once made. The caller keeps the memory alive until `write`
/// returns.
public final class VectoredWriter {
    /// Most pieces one send takes (the kernel's IOV_MAX is 1024).
    public static let maximumPieces = 512
    private let vectors: UnsafeMutablePointer<iovec>
    // One thread uses a writer: no run-time exclusivity checks on its counters.
    @exclusivity(unchecked) public private(set) var count = 0
    @exclusivity(unchecked) public private(set) var byteCount = 0

    public init() {
        vectors = .allocate(capacity: Self.maximumPieces)
    }

    deinit { vectors.deallocate() }

    /// Adds a piece; false (nothing added) when full.
    @discardableResult
    public func append(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard count < Self.maximumPieces else { return false }
        guard !bytes.isEmpty else { return true }
        vectors[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
        count += 1
        byteCount += bytes.count
        return true
    }

    public func reset() {
        count = 0
        byteCount = 0
    }

    public enum WriteResult: Equatable {
        /// This many bytes left (possibly fewer than gathered: the socket filled).
        case wrote(Int)
        case wouldBlock
        case failed(SystemError)
    }

    /// One gathered send of the pieces (retried on EINTR). A peer that went away is an
    /// error, never SIGPIPE (MSG_NOSIGNAL). Does not reset.
    public func write(to fd: Int32) -> WriteResult {
        guard count > 0 else { return .wrote(0) }
        var message = msghdr()
        message.msg_iov = vectors
        message.msg_iovlen = count
        while true {
            let n = sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
            if n >= 0 { return .wrote(n) }
            switch errno {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return .wouldBlock
            default: return .failed(.current("sendmsg"))
            }
        }
    }
}
