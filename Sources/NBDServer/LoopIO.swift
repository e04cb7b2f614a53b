import NIOCore
import NIOPosix

/// One event loop's disk queue, and the pipe channel that watches its readiness
/// descriptor so that completions run on the loop: a read goes from socket to disk and
/// back to the socket without leaving the loop's thread.
///
/// Used only on its loop (hence `@unchecked Sendable`: the server keeps one per loop
/// in a table that other threads read).
final class LoopIO: @unchecked Sendable {
    let eventLoop: EventLoop
    /// Nil until the readiness descriptor is watched (and after `close`); reads then
    /// go through the thread pool.
    private(set) var queue: NBDLoopQueue?
    private var watcher: Channel?
    private var closed = false
    private var submissionScheduled = false
    /// Connections whose replies were written by completions and wait for one flush.
    private var needFlush: [(handler: NBDConnectionHandler, context: ChannelHandlerContext)] = []
    private var flushing: [(handler: NBDConnectionHandler, context: ChannelHandlerContext)] = []

    init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    /// Starts watching `candidate`'s readiness descriptor; the queue is used once that
    /// works. Failure leaves this loop on the thread pool and is logged.
    func start(_ candidate: NBDLoopQueue, log: @escaping @Sendable (String) -> Void) {
        eventLoop.assertInEventLoop()
        let descriptor: Int32
        do {
            descriptor = try candidate.makeReadinessDescriptor()
        } catch {
            log("disk completions stay off the event loop: \(error)")
            candidate.close()
            return
        }
        NIOPipeBootstrap(group: eventLoop)
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(CompletionWatcher(loopIO: self))
                }
            }
            .takingOwnershipOfDescriptor(input: descriptor)
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    if closed {
                        channel.close(promise: nil)
                        candidate.close()
                    } else {
                        watcher = channel
                        queue = candidate
                    }
                case .failure(let error):
                    log("disk completions stay off the event loop: \(error)")
                    candidate.releaseReadinessDescriptor(descriptor)
                    candidate.close()
                }
            }
    }

    /// Submits the queue once the loop has handled this round of input: reads that
    /// connections parsed in the same round leave in one io_submit (one doorbell).
    func scheduleSubmission() {
        guard let queue, !submissionScheduled else { return }
        submissionScheduled = true
        eventLoop.assumeIsolatedUnsafeUnchecked().execute { [self] in
            submissionScheduled = false
            queue.submitQueued()
        }
    }

    /// Asks for `handler.flushReplies` after the current round of completions.
    func flushAfterCompletions(_ handler: NBDConnectionHandler, _ context: ChannelHandlerContext) {
        needFlush.append((handler, context))
    }

    /// The readiness descriptor fired: run completions, flush the replies they wrote,
    /// and submit what they queued.
    func runCompletions() {
        guard let queue else { return }
        queue.runCompletions()
        flushReplies()
        queue.submitQueued()
    }

    private func flushReplies() {
        // Swapped out: a flush may lead to more completions asking for flushes.
        swap(&needFlush, &flushing)
        for entry in flushing { entry.handler.flushReplies(context: entry.context) }
        flushing.removeAll(keepingCapacity: true)
    }

    /// Finishes what is in flight (running its completions) and stops watching.
    func close() {
        eventLoop.assertInEventLoop()
        closed = true
        guard let queue else { return }
        self.queue = nil
        queue.close()
        flushReplies()
        watcher?.close(promise: nil)
        watcher = nil
    }
}

/// Reads the readiness descriptor (an eventfd: reading resets it) and runs completions
/// once per wake-up.
private final class CompletionWatcher: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let loopIO: LoopIO

    init(loopIO: LoopIO) { self.loopIO = loopIO }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func channelReadComplete(context: ChannelHandlerContext) {
        loopIO.runCompletions()
    }
}
