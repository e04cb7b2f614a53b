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
///
/// The value lives in memory of its own, reached through a constant: the lock already
/// keeps accesses apart, and a stored `var` would add a run-time exclusivity check to
/// every call (these locks are taken on every request).
public final class LockedValue<Value>: @unchecked Sendable {
    private let lock = Lock()
    private let value = UnsafeMutablePointer<Value>.allocate(capacity: 1)

    public init(_ value: Value) {
        self.value.initialize(to: value)
    }

    deinit {
        value.deinitialize(count: 1)
        value.deallocate()
    }

    /// Runs `body` with the value, under the lock. Keep `body` short: it must not block.
    @inline(__always)
    public func withLockedValue<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        try lock.withLock { () throws(E) -> T in try body(&value.pointee) }
    }
}

/// The pool's lock and the state it guards. A mutex orders every change; a read-write
/// lock lets lookups run while the holder of the mutex does I/O that changes nothing
/// (a commit writing its blocks and waiting for fdatasync).
///
/// The state is reachable only through the closures below, as with `LockedValue`:
/// - `withLock` takes both (exclusive) and lends the state `inout`;
/// - `withSharedAccess` takes only the read side and lends it `borrowing`, so it runs
///   beside other readers and beside the I/O phase of a commit, and cannot change it;
/// - `admittingReaders`, inside `withLock`, lets readers back in while its body runs.
///   The caller keeps the mutex, so nobody else changes the state meanwhile, and the
///   body gets the state `borrowing` only: the exclusive holder must not change it
///   through its own `inout` during the body either (the one rule the types cannot say).
public final class PoolLock<State>: @unchecked Sendable {
    private let mutex = Lock()
    private let access = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)
    /// Stable storage: the closures get its address, never a copy of the state. (The
    /// methods are inlinable so that callers specialize them: a generic call would copy
    /// the state through its value witness on every lookup.)
    @usableFromInline let state = UnsafeMutablePointer<State>.allocate(capacity: 1)

    public init(_ initial: State) {
        _ = thinbd_rwlock_init_writer_preferring(access)
        state.initialize(to: initial)
    }

    deinit {
        state.deinitialize(count: 1)
        state.deallocate()
        pthread_rwlock_destroy(access)
        access.deallocate()
    }

    @usableFromInline func lockExclusive() {
        mutex.lock()
        pthread_rwlock_wrlock(access)
    }

    @usableFromInline func unlockExclusive() {
        pthread_rwlock_unlock(access)
        mutex.unlock()
    }

    @usableFromInline func lockShared() { pthread_rwlock_rdlock(access) }
    @usableFromInline func tryLockShared() -> Bool { pthread_rwlock_tryrdlock(access) == 0 }
    /// Releases the read side (shared access), or the write side while admitting readers.
    @usableFromInline func unlockAccess() { pthread_rwlock_unlock(access) }
    @usableFromInline func relockAccessExclusive() { pthread_rwlock_wrlock(access) }
    @usableFromInline func lockMutexOnly() { mutex.lock() }
    @usableFromInline func unlockMutexOnly() { mutex.unlock() }

    /// Exclusive access: waits for readers and for any other holder. Blocks.
    @inlinable
    public func withLock<T, E: Error>(_ body: (inout State) throws(E) -> T) throws(E) -> T {
        NonBlockingThread.assertMayBlock("the pool lock")
        lockExclusive()
        defer { unlockExclusive() }
        return try body(&state.pointee)
    }

    /// Exclusive access from the owner's `deinit`: nobody else can reach the lock any
    /// more, so this never waits, and it may run on any thread (an event loop too).
    @inlinable
    public func withLockInDeinit<T>(_ body: (inout State) -> T) -> T {
        lockMutexOnly()
        defer { unlockMutexOnly() }
        return body(&state.pointee)
    }

    /// Read-only access: other readers, and a commit's I/O, may run meanwhile.
    @inlinable
    public func withSharedAccess<T, E: Error>(_ body: (borrowing State) throws(E) -> T) throws(E) -> T {
        try withSharedAddress { (state) throws(E) in try body(state.pointee) }
    }

    /// Like `withSharedAccess`, but returns nil at once, without running `body`, when
    /// the lock is held or wanted exclusively: for threads that must not wait.
    @inlinable
    public func tryWithSharedAccess<T, E: Error>(_ body: (borrowing State) throws(E) -> T) throws(E) -> T? {
        try tryWithSharedAddress { (state) throws(E) in try body(state.pointee) }
    }

    /// `withSharedAccess`, lending the state's address instead of the state: for hot
    /// paths whose body hands the state to several functions. A struct borrowed from
    /// this memory is copied (a retain and a release of each reference it holds)
    /// whenever the body passes it to a function the optimizer cannot see through,
    /// since that function could, for all it knows, change the memory; an address is
    /// passed as it is. The pointer is valid, and the state unchanged, only while
    /// `body` runs: it must not escape, and nothing may be written through it.
    @inlinable
    public func withSharedAddress<T, E: Error>(_ body: (UnsafePointer<State>) throws(E) -> T) throws(E) -> T {
        NonBlockingThread.assertMayBlock("shared access to the pool lock")
        lockShared()
        defer { unlockAccess() }
        return try body(UnsafePointer(state))
    }

    /// `tryWithSharedAccess`, lending the state's address (see `withSharedAddress`).
    @inlinable
    public func tryWithSharedAddress<T, E: Error>(_ body: (UnsafePointer<State>) throws(E) -> T) throws(E) -> T? {
        guard tryLockShared() else { return nil }
        defer { unlockAccess() }
        return try body(UnsafePointer(state))
    }

    /// Called inside `withLock`: lets readers in while `body` runs, and lends `body` the
    /// state read-only. The caller keeps the mutex, so no one changes the state meanwhile.
    @inlinable
    public func admittingReaders<T, E: Error>(_ body: (borrowing State) throws(E) -> T) throws(E) -> T {
        unlockAccess()
        defer { relockAccessExclusive() }
        return try body(state.pointee)
    }
}

/// A value behind a lock that threads can wait on: `update` changes it and wakes the
/// waiters; `wait(until:)` blocks until the value gives an answer. The value is
/// reachable only through these (as with `LockedValue`). Waiting blocks: not for event
/// loops, whose producers only `update`.
public final class WaitableValue<Value>: @unchecked Sendable {
    private let condition = ConditionLock()
    /// Own memory reached through a constant, as in `LockedValue`: no run-time
    /// exclusivity check per call (range locks and gates are taken on every request).
    private let storage = UnsafeMutablePointer<Value>.allocate(capacity: 1)

    public init(_ value: Value) {
        storage.initialize(to: value)
    }

    deinit {
        storage.deinitialize(count: 1)
        storage.deallocate()
    }

    /// Changes the value under the lock and wakes every waiter. Never waits for long.
    @discardableResult
    public func update<T>(_ body: (inout Value) -> T) -> T {
        condition.lock()
        defer {
            condition.broadcast()
            condition.unlock()
        }
        return body(&storage.pointee)
    }

    /// Changes the value under the lock without waking anyone: for changes that no
    /// waiter waits for (taking something, where only giving back lets a waiter on).
    @discardableResult
    public func updateWithoutWaking<T>(_ body: (inout Value) -> T) -> T {
        condition.lock()
        defer { condition.unlock() }
        return body(&storage.pointee)
    }

    /// Wakes every waiter to look at the value again, after `updateWithoutWaking`
    /// made a change that only some callers know one of them waits for.
    public func wakeWaiters() {
        condition.lock()
        condition.broadcast()
        condition.unlock()
    }

    /// Blocks until `ready` returns non-nil for the value (it may change it, under the
    /// lock), and returns that.
    public func wait<T>(until ready: (inout Value) -> T?) -> T {
        NonBlockingThread.assertMayBlock("waiting on a WaitableValue")
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let answer = ready(&storage.pointee) { return answer }
            condition.wait()
        }
    }

    /// `wait(until:)` for at most `milliseconds`; nil when the time ran out first.
    public func wait<T>(until ready: (inout Value) -> T?, milliseconds: Int) -> T? {
        NonBlockingThread.assertMayBlock("waiting on a WaitableValue")
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let deadline = UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec) + UInt64(max(0, milliseconds)) * 1_000_000
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let answer = ready(&storage.pointee) { return answer }
            if !condition.wait(untilRealtime: deadline) { return ready(&storage.pointee) }
        }
    }
}
