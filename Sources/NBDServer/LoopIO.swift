import NIOCore
import NIOPosix

/// One event loop's disk queue, and the pipe channel that watches its readiness
/// descriptor so that completions run on the loop: a read goes from socket to disk and
/// back to the socket without leaving the loop's thread.
///
/// It also gathers the WRITEs of all the loop's connections per loop round (see
/// `submitWrites`).
///
/// Used only on its loop (hence `@unchecked Sendable`: the server keeps one per loop
/// in a table that other threads read).
final class LoopIO: @unchecked Sendable {
    let eventLoop: EventLoop
    /// Where the round's writes run (off the loop) and who runs them.
    private let blocking: BlockingWork
    private let provider: NBDExportProvider
    /// WRITEs the loop's connections parsed in this round, per connection: they leave
    /// together at the end of the round, as one batch for the provider.
    @exclusivity(unchecked) private var roundWrites: [PendingWrites] = []
    @exclusivity(unchecked) private var writeDispatchScheduled = false
    /// Nil until the readiness descriptor is watched (and after `close`); reads then
    /// go through the thread pool.
    @exclusivity(unchecked) private(set) var queue: NBDLoopQueue?
    private var watcher: Channel?
    private var closed = false
    @exclusivity(unchecked) private var submissionScheduled = false
    /// Connections whose replies were written by completions and wait for one flush.
    @exclusivity(unchecked) private var needFlush: [(handler: NBDConnectionHandler, context: ChannelHandlerContext)] = []
    @exclusivity(unchecked) private var flushing: [(handler: NBDConnectionHandler, context: ChannelHandlerContext)] = []
    @exclusivity(unchecked) private var flushBudget = CompletionFlushBudget()
    /// Work handed to other threads (the thread pool) whose completions come back to
    /// the loop as tasks: while there is any, the loop does not poll (NIO does not wake
    /// a loop that is running a task, so such a completion would wait for the poll).
    @exclusivity(unchecked) private var offLoopInFlight = 0
    /// Polls the loop for a while before it sleeps (nil: it sleeps at once).
    private var idlePoller: NBDIdlePoller?
    @exclusivity(unchecked) private var idleWindow: IdlePollWindow
    /// A poll task is queued (one per loop round is enough).
    @exclusivity(unchecked) private var idlePollScheduled = false

    /// `idlePollMaximum`: the longest the loop polls before it sleeps (0: it sleeps at
    /// once); see `IdlePollWindow`.
    init(eventLoop: EventLoop, blocking: BlockingWork, provider: NBDExportProvider, idlePollMaximum: TimeAmount = .zero) {
        self.eventLoop = eventLoop
        self.blocking = blocking
        self.provider = provider
        idleWindow = IdlePollWindow(maximum: UInt64(clamping: idlePollMaximum.nanoseconds))
    }

    // MARK: Polling before the loop sleeps

    /// Runs `body` on the thread pool; the future completes on the loop. Counted as work
    /// other threads owe the loop, so the loop does not poll while it is out.
    func runOffLoop<T: Sendable>(_ body: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        awaitingOtherThreads(blocking.run(on: eventLoop, body))
    }

    /// Starts `body` on the thread pool, which completes `promise` itself (possibly from
    /// another thread), or fails `promise` when the pool has stopped; counted as
    /// `runOffLoop` is. Returns the promise's future.
    func submitOffLoop<T>(orFail promise: EventLoopPromise<T>, _ body: @escaping @Sendable () -> Void) -> EventLoopFuture<T> {
        let future = awaitingOtherThreads(promise.futureResult)
        blocking.submit(orFail: promise, body)
        return future
    }

    /// Counts `future` as off-loop work until it completes (on the loop).
    private func awaitingOtherThreads<T>(_ future: EventLoopFuture<T>) -> EventLoopFuture<T> {
        offLoopInFlight += 1
        future.assumeIsolated().whenComplete { [self] _ in offLoopInFlight -= 1 }
        return future
    }

    /// Something for the loop arrived: a request, or disk completions.
    func workArrived() {
        if idleWindow.measuring { idleWindow.workArrived(at: NIODeadline.now().uptimeNanoseconds) }
    }

    /// The loop may be about to sleep (a pass over a connection's input ended, a
    /// request finished, a round of completions ran): a task, which runs after the
    /// round's I/O, polls the loop before it does, unless other threads owe it work.
    func loopMayIdle() {
        guard idlePoller != nil, !idlePollScheduled else { return }
        idlePollScheduled = true
        eventLoop.assumeIsolatedUnsafeUnchecked().execute { [self] in
            idlePollScheduled = false
            pollBeforeSleeping()
        }
    }

    /// Polls while the loop's own descriptors are all it waits for: requests, its disk
    /// queue's completions, timers that were armed. Not while the disk queue's own
    /// thread holds jobs (page-cache writes, large cached reads): that thread signals
    /// the queue's descriptor when done, and a poll would take the CPU it needs, as on
    /// the lean loop (`LeanLoop.pollBeforeSleeping`). What another thread hands over
    /// that is not counted in `offLoopInFlight` (a management command's disconnect)
    /// waits at most one budget, as does a task scheduled during this round (a
    /// rate-limited request's start).
    private func pollBeforeSleeping() {
        guard offLoopInFlight == 0, roundWrites.isEmpty, !(queue?.isBusyOnItsThread ?? false), let idlePoller else { return }
        // What the round queued leaves now, not after the poll.
        queue?.submitQueued()
        let budget = idleWindow.budget
        if budget > 0 && idlePoller.pollUntilReady(nanoseconds: budget) { return }
        idleWindow.sleeping(at: NIODeadline.now().uptimeNanoseconds)
    }

    /// Asks the provider for a poller once the readiness descriptor is watched (off the
    /// loop: finding the loop's epoll instance reads /proc).
    private func startIdlePolling(watching descriptor: Int32, log: @escaping @Sendable (String) -> Void) {
        guard idleWindow.maximum > 0 else { return }
        let provider = self.provider
        blocking.run(on: eventLoop) { provider.makeIdlePoller(forLoopWatching: descriptor) }
            .assumeIsolated()
            .whenSuccess { [self] poller in
                guard let poller else {
                    log("an event loop cannot poll before it sleeps (--idle-poll): its epoll instance was not found; it will sleep at once")
                    return
                }
                if closed {
                    poller.close()
                } else {
                    idlePoller = poller
                }
            }
    }

    /// One connection's WRITEs of a pass, and whom to tell how they went.
    struct PendingWrites {
        var writes: [GatheredWrite]
        var export: NBDExport
        var handler: NBDConnectionHandler
        var context: ChannelHandlerContext
    }

    /// Queues a connection's WRITEs; at the end of this loop round, what was queued for
    /// one export goes off the loop in one hand-off and one provider batch (connections
    /// at queue depth 1 then share one plan, one device submission and one map step),
    /// and each connection hears its outcomes through `writesFinished` on the loop.
    func submitWrites(_ writes: [GatheredWrite], export: NBDExport, handler: NBDConnectionHandler, context: ChannelHandlerContext) {
        roundWrites.append(PendingWrites(writes: writes, export: export, handler: handler, context: context))
        guard !writeDispatchScheduled else { return }
        writeDispatchScheduled = true
        eventLoop.assumeIsolatedUnsafeUnchecked().execute { [self] in
            writeDispatchScheduled = false
            dispatchRoundWrites()
        }
    }

    /// One hand-off per export (by name) for the round: the connections of one export
    /// share a batch, while exports never wait for each other (a volume busy with a
    /// snapshot holds up only its own writes).
    private func dispatchRoundWrites() {
        guard !roundWrites.isEmpty else { return }
        let round = roundWrites
        roundWrites = []
        var groups: [String: [PendingWrites]] = [:]
        var order: [String] = []
        for pending in round {
            let name = pending.export.exportDescription.name
            if groups[name] == nil { order.append(name) }
            groups[name, default: []].append(pending)
        }
        for name in order { dispatch(groups[name]!) }
    }

    private func dispatch(_ group: [PendingWrites]) {
        // Only Sendable parts cross to the worker; handlers and contexts stay here.
        let batches = group.map { (export: $0.export, writes: $0.writes) }
        let provider = self.provider
        let future = runOffLoop { () -> [[NBDExportError?]] in
            Self.runWriteBatches(batches, provider: provider)
        }
        future.assumeIsolated().whenComplete { result in
            for (i, pending) in group.enumerated() {
                pending.handler.writesFinished(pending.writes, result.map { $0[i] }, context: pending.context)
            }
        }
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
                        startIdlePolling(watching: descriptor, log: log)
                    }
                case .failure(let error):
                    log("disk completions stay off the event loop: \(error)")
                    candidate.releaseReadinessDescriptor(descriptor)
                    candidate.close()
                }
            }
    }

    /// Submits the queue once the loop has handled this round of input: what the
    /// connections parsed in the same round and the queue has not yet handed over itself
    /// (it does so every `LoopBurst.submitEvery` requests) leaves in one system call.
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

    /// A completion wrote a read reply with `count` data bytes (see `CompletionFlushBudget`).
    func readDataQueued(_ count: Int) {
        flushBudget.readDataQueued(count)
    }

    /// The readiness descriptor fired: run completions a few at a time, submitting
    /// what they queued after each few, and flushing the replies they wrote as
    /// `CompletionFlushBudget` says.
    func runCompletions() {
        guard let queue else { return }
        workArrived()
        flushBudget.runCompletions(of: queue) { flushReplies() }
        loopMayIdle()
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
        idlePoller?.close()
        idlePoller = nil
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

extension LoopIO {
    /// Runs WRITEs through the provider as one call (off the loop: it may block), each
    /// payload's storage retained for the call so that its bytes stay put.
    static func runWriteBatches(_ batches: [(export: NBDExport, writes: [GatheredWrite])], provider: NBDExportProvider) -> [[NBDExportError?]] {
        var storages: [Unmanaged<AnyObject>] = []
        defer { for storage in storages { storage.release() } }
        let prepared = batches.map { batch in
            NBDWriteBatch(export: batch.export, writes: batch.writes.map { write in
                let bytes = write.payload.withUnsafeReadableBytesWithStorageManagement { bytes, storage in
                    storages.append(storage.retain())
                    return bytes
                }
                return NBDWrite(offset: write.offset, data: bytes, fua: write.fua)
            })
        }
        return provider.writeBatches(prepared)
    }
}

/// A WRITE as parsed: its payload already in an aligned buffer.
struct GatheredWrite: Sendable {
    var cookie: UInt64
    var offset: UInt64
    var fua: Bool
    var payload: ByteBuffer
}
