import NIOCore
import NIOPosix

/// Where a connection runs what may block (export operations, catalog lookups and
/// opens, closing exports): never on its event loop.
///
/// The server uses its thread pool. Handler tests on an `EmbeddedChannel` (which is
/// single-threaded) run the work inline instead, so every step is deterministic.
struct BlockingWork: Sendable {
    private enum Kind: Sendable {
        case threadPool(NIOThreadPool)
        case inline
    }

    private let kind: Kind

    static func threadPool(_ pool: NIOThreadPool) -> BlockingWork { BlockingWork(kind: .threadPool(pool)) }
    /// For tests: work runs at once on the calling thread.
    static let inline = BlockingWork(kind: .inline)

    /// Runs `body` off the loop; the future completes on `loop`, and fails when the
    /// workers have stopped (the server is shutting down).
    func run<T: Sendable>(on loop: EventLoop, _ body: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        switch kind {
        case .threadPool(let pool): pool.runIfActive(eventLoop: loop, body)
        case .inline: loop.makeCompletedFuture { try body() }
        }
    }

    /// Starts `body` off the loop, or fails `promise` when the workers have stopped.
    /// `body` completes the promise itself (possibly later, from another thread).
    func submit<T>(orFail promise: EventLoopPromise<T>, _ body: @escaping @Sendable () -> Void) {
        switch kind {
        case .threadPool(let pool):
            pool.submit { state in
                guard case .active = state else {
                    promise.fail(NIOThreadPoolError.ThreadPoolInactive())
                    return
                }
                body()
            }
        case .inline:
            body()
        }
    }

    /// Runs `body` off the loop, whether or not the workers still run (cleanup).
    func submit(_ body: @escaping @Sendable () -> Void) {
        switch kind {
        case .threadPool(let pool): pool.submit { _ in body() }
        case .inline: body()
        }
    }
}
