import Glibc

/// Threads that must never wait: event loops. A loop that waits for a lock, a drain or
/// a commit stalls every connection on it, and if what it waits for needs the loop
/// (reads whose completions run there) it never wakes up.
///
/// Servers mark their loop threads once; every primitive that can wait (the pool lock,
/// range locks, the I/O drain gate, synchronous device I/O) calls `assertMayBlock`, so a
/// debug build stops at the first blocking call made on a loop, with its stack, instead
/// of hanging somewhere later. Release builds skip the check.
public enum NonBlockingThread {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
        return key
    }()

    /// Marks the calling thread as one that must never wait (for the thread's lifetime).
    public static func markCurrent() {
        pthread_setspecific(key, UnsafeRawPointer(bitPattern: 1))
    }

    /// Whether the calling thread was marked. Cost: one thread-local load.
    public static var isCurrent: Bool { pthread_getspecific(key) != nil }

    /// Stops a debug build when the calling thread must not block. `what` names the
    /// call for the message.
    @inline(__always)
    public static func assertMayBlock(_ what: @autoclosure () -> String, file: StaticString = #file, line: UInt = #line) {
        assert(!isCurrent, "\(what()) may block, and this is an event loop thread", file: file, line: line)
    }
}
