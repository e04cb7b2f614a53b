import CThinSupport
import Glibc

/// A non-recursive mutual-exclusion lock.
public final class Lock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

/// A value reachable only while its lock is held (the shape of swift-nio's
/// `NIOLockedValueBox`): state guarded by a lock cannot be touched without it.
public final class LockedValue<Value>: @unchecked Sendable {
    private let lock = Lock()
    private var value: Value

    public init(_ value: Value) {
        self.value = value
    }

    /// Runs `body` with the value, under the lock. Keep `body` short: it must not block.
    @inline(__always)
    public func withLockedValue<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        try lock.withLock { () throws(E) -> T in try body(&value) }
    }
}

/// The pool's lock: a mutex that orders every change to metadata, plus a read-write lock
/// that lets lookups run while a holder of the mutex does I/O that changes nothing (a
/// commit writing its blocks and waiting for fdatasync).
///
/// `withLock` takes both (exclusive). `withSharedAccess` takes only the read side, so it
/// runs concurrently with other readers and with the I/O phase of a commit.
public final class PoolLock: @unchecked Sendable {
    private let mutex = Lock()
    private let access = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)

    public init() {
        _ = thinbd_rwlock_init_writer_preferring(access)
    }

    deinit {
        pthread_rwlock_destroy(access)
        access.deallocate()
    }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        NonBlockingThread.assertMayBlock("the pool lock")
        mutex.lock()
        pthread_rwlock_wrlock(access)
        defer {
            pthread_rwlock_unlock(access)
            mutex.unlock()
        }
        return try body()
    }

    /// Read-only work on metadata: other readers, and a commit's I/O, may run meanwhile.
    @inline(__always)
    public func withSharedAccess<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        NonBlockingThread.assertMayBlock("shared access to the pool lock")
        pthread_rwlock_rdlock(access)
        defer { pthread_rwlock_unlock(access) }
        return try body()
    }

    /// Like `withSharedAccess`, but returns nil at once, without running `body`, when
    /// the lock is held or wanted exclusively: for threads that must not wait.
    @inline(__always)
    public func tryWithSharedAccess<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T? {
        guard pthread_rwlock_tryrdlock(access) == 0 else { return nil }
        defer { pthread_rwlock_unlock(access) }
        return try body()
    }

    /// Called inside `withLock`: lets readers in while `body` runs. The caller keeps
    /// the mutex, so no one changes metadata meanwhile; `body` must not change it either.
    public func admittingReaders<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_rwlock_unlock(access)
        defer { pthread_rwlock_wrlock(access) }
        return try body()
    }
}
