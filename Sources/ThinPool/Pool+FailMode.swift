import ThinFormat
import ThinMetadata
import ThinSystem
import Synchronization

/// Why a pool stopped writing: the first damage found, or the first commit that failed,
/// while it was open.
public struct PoolFailure: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// Metadata failed its checks: the pool is flagged for a check.
        case damage
        /// A commit or a barrier failed (I/O error, ENOSPC): what it was to make durable
        /// may be lost, so nothing after it is committed either. The last commit on disk
        /// is intact; reopening the pool serves it again (no check needed).
        case commitFailed
    }

    public var kind: Kind
    /// What was found (`corrupt block N (type): reason`) or what failed.
    public var reason: String
    /// When, in seconds since 1970.
    public var since: UInt64
}

/// What fail mode keeps: the failure, whether the needs-check flag is on disk yet, and
/// who wants to hear of it. Guarded by its own small lock (`Pool.failureState`), never
/// by the pool lock, so that a reader on an event loop can record damage without waiting.
struct FailureState {
    var failure: PoolFailure?
    var flagWritten = false
    var handler: (@Sendable (PoolFailure) -> Void)?
}

// Fail mode, as dm-thin's: when a request meets damage (a block that fails its checks,
// a pointer out of range, a reference count that cannot be right), or a commit or
// barrier fails, that request fails and the pool stops changing. Nothing more is committed, so the damage is never spread
// into new metadata; reads of everything undamaged go on. The superblock is flagged so
// that the next read-write open insists on `check --repair` first.
extension Pool {
    /// The damage that put the pool in fail mode, or nil while it is healthy.
    /// Cost: one small lock; never waits for the pool lock.
    public var failure: PoolFailure? { failureState.withLockedValue { $0.failure } }

    /// Calls `handler` once when the pool enters fail mode (at once if it is in it), on the
    /// thread that found the damage, which may be an event loop: it must not block.
    public func onFailure(_ handler: @escaping @Sendable (PoolFailure) -> Void) {
        let current = failureState.withLockedValue { state -> PoolFailure? in
            state.handler = handler
            return state.failure
        }
        if let current { handler(current) }
    }

    /// Puts the pool in fail mode for `reason` (the first reason is kept). Thread-safe and
    /// non-blocking: the needs-check flag is written by the next commit attempt, which
    /// runs where blocking is allowed.
    func enterFailMode(_ reason: String, kind: PoolFailure.Kind = .damage) {
        let entered = failureState.withLockedValue { state -> (PoolFailure, (@Sendable (PoolFailure) -> Void)?)? in
            guard state.failure == nil else { return nil }
            let failure = PoolFailure(kind: kind, reason: reason, since: SystemInfo.wallClockSeconds())
            state.failure = failure
            hasFailed.store(true, ordering: .releasing)
            return (failure, state.handler)
        }
        if let (failure, handler) = entered { handler?(failure) }
    }

    /// Damage in `error` puts the pool in fail mode; the error is returned as it was.
    func noticing(_ error: PoolError) -> PoolError {
        if case .corrupt(let why) = error { enterFailMode(why) }
        return error
    }

    /// `mapErrors` for pool code (it hides the global one inside `Pool`): the same
    /// conversion, and damage found on the way puts the pool in fail mode.
    func mapErrors<T>(_ body: () throws -> T) throws(PoolError) -> T {
        do {
            return try ThinPool.mapErrors(body)
        } catch {
            throw noticing(error)
        }
    }

    /// Runs a commit's I/O; if it fails, whatever it was to make durable may be lost (a
    /// failed fdatasync may have dropped dirty pages), so the pool commits nothing more:
    /// a command that reported failure can never become durable later, and no later
    /// FLUSH can report success over lost data.
    func failingOnCommitError<T>(_ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        do {
            return try body()
        } catch {
            enterFailMode("commit failed: \(error)", kind: .commitFailed)
            throw error
        }
    }

    /// Throws `.failed` in fail mode: every change to the pool asks this first.
    /// Cost: one atomic load while the pool is healthy.
    func refuseChangesIfFailed() throws(PoolError) {
        guard hasFailed.load(ordering: .acquiring), let failure else { return }
        throw .failed(failure)
    }

    /// In fail mode a commit only flags the superblock for a check, once. No tree
    /// changes, so nothing damaged is spread. Blocking I/O.
    func flagNeedsCheck(_ state: inout PoolState) {
        guard !isReadOnly, !state.isClosed, needsCheckFlagPending else { return }
        // Best effort: if it cannot be written, the damage is found again when next read.
        guard (try? writeNeedsCheck(&state, true)) != nil else { return }
        failureState.withLockedValue { $0.flagWritten = true }
    }

    /// Damage put the pool in fail mode and the needs-check flag is not on disk yet.
    var needsCheckFlagPending: Bool {
        failureState.withLockedValue { !$0.flagWritten && $0.failure?.kind == .damage }
    }

    /// Writes the last commit's superblock with the needs-check flag set or cleared, as
    /// the next generation into the other slot: a torn write leaves the last commit as it
    /// was. One 4 KiB write and a barrier.
    func writeNeedsCheck(_ state: inout PoolState, _ value: Bool) throws(PoolError) {
        var next = state.superblock
        next.needsCheck = value
        next.generation += 1
        let buffer = AlignedBuffer(count: MetadataLayout.blockSize)
        next.encode(into: buffer.bytes)
        try ThinPool.mapErrors {
            try device.write(UnsafeRawBufferPointer(buffer.bytes), at: next.slot * UInt64(MetadataLayout.blockSize))
            try device.barrier()
        }
        state.superblock = next
    }

    /// Whether the pool was flagged for a check (by a server that found damage).
    public var needsCheck: Bool { lock.withSharedAccess { $0.superblock.needsCheck } }
}
