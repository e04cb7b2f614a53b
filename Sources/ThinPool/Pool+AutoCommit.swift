import Dispatch
import ThinSystem

/// Periodic commits: a pool behaves like a disk with a volatile write cache that is
/// written back at least every `interval`, as dm-thin does once a second.
public final class AutoCommitter: @unchecked Sendable {
    private let timer: DispatchSourceTimer
    private let queue = DispatchQueue(label: "thinbd.autocommit")

    /// Starts committing `pool` every `milliseconds` (default 1000). Errors are passed to
    /// `onError` and the timer keeps running.
    public init(pool: Pool, milliseconds: Int = 1000, onError: @escaping @Sendable (PoolError) -> Void = { _ in }) {
        timer = DispatchSource.makeTimerSource(queue: queue)
        timer.schedule(deadline: .now() + .milliseconds(milliseconds), repeating: .milliseconds(milliseconds))
        timer.setEventHandler { [weak pool] in
            guard let pool else { return }
            do throws(PoolError) {
                try pool.commitInBackground()
            } catch .closed {
                return
            } catch {
                onError(error)
            }
        }
        timer.resume()
    }

    /// Stops the timer; returns after any commit in progress (so the pool can close
    /// without a commit racing it onto a closed device). Blocks: not on an event loop.
    public func stop() {
        NonBlockingThread.assertMayBlock("stopping the auto-committer")
        timer.cancel()
        // The handler runs on `queue`: once this empty block has run there, no commit is
        // in progress, and a cancelled timer starts none.
        queue.sync {}
    }

    deinit { timer.cancel() }
}
