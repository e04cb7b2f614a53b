import NBDProtocol
import NBDTLS
import NIOCore
import NIOSSL
import NIOTLS
import ThinSystem

/// Serves one NBD connection over a swift-nio channel: the handshake (and TLS), then
/// requests executed concurrently and answered as they complete (possibly out of
/// order). Reads start on the event loop when the export can do that without blocking
/// (their disk I/O then completes on the loop too); everything else runs off the loop
/// (`NBDServer.blocking`).
///
/// The handler holds no request logic and no state flags: the handshake is
/// `NBDHandshake`, and the byte stream, requests, back-pressure and replies are
/// `NBDConnectionCore` (which holds `NBDConnectionState`), values that return actions
/// which the handler carries out with the channel, timers and threads. The loop never
/// waits: export lookups and opens are asked off the loop and answered back to it.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let server: NBDServer
    private var handshake: NBDHandshake
    /// The byte stream, requests and replies; this handler only moves bytes and runs
    /// what the core asks for.
    @exclusivity(unchecked) private var core: NBDConnectionCore
    @exclusivity(unchecked) private var export: NBDExport?
    private let loopIO: LoopIO
    /// A flush of replies written by loop completions is queued with the loop's I/O.
    @exclusivity(unchecked) private var flushScheduled = false
    /// The export a catalog answer opened, until the handshake enters transmission.
    private var openedExport: NBDExport?
    /// Closes the connection when the handshake takes too long (slowloris).
    private var handshakeTimer: Scheduled<Void>?
    /// The client sent NBD_OPT_ABORT: its close is not worth a log line.
    private var abortRequested = false
    /// The TLS handler STARTTLS put at the front of the pipeline.
    private var tlsHandler: NIOSSLServerHandler?
    /// The handshake ended and the connection is going to a lean loop once its last
    /// reply is out (`completeHandOff`); meanwhile nothing is parsed.
    private var handingOff: (session: NBDSession, loop: LeanLoop)?
    /// The connection now belongs to a lean loop: closing the channel closes nothing
    /// of the connection's (its socket was duplicated, its export moved).
    private var handedOff = false

    init(server: NBDServer, loopIO: LoopIO) {
        self.server = server
        self.loopIO = loopIO
        handshake = NBDHandshake(tlsMode: server.configuration.tls?.mode ?? .off)
        core = NBDConnectionCore(
            maxInFlight: server.configuration.maxInFlightPerConnection,
            maxInFlightBytes: server.configuration.maxInFlightBytesPerConnection,
            allocator: .recycling)
    }

    // MARK: Lifecycle

    func channelActive(context: ChannelHandlerContext) {
        guard server.connectionOpened(context.channel) else {
            // Past --max-connections: refused before it costs anything but the accept.
            close(context: context, flush: false)
            return
        }
        let limit = server.configuration.handshakeTimeout
        handshakeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: limit) { [self] in
            guard core.isOpen, !core.isInTransmission else { return }
            server.log("closing connection: no handshake within \(limit.nanoseconds / 1_000_000) ms")
            close(context: context, flush: false)
        }
        context.writeAndFlush(wrapOutboundOut(NBDHandshake.greeting()), promise: nil)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        core.closed()
        if handedOff {
            context.fireChannelInactive()
            return
        }
        handshakeTimer?.cancel()
        handshakeTimer = nil
        if let export {
            self.export = nil
            server.release(export)
        }
        server.connectionClosed(context.channel)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A TLS client that just closes its socket (qemu does) is not worth a log line.
        if let error = error as? NIOSSLError, case .uncleanShutdown = error {
            close(context: context, flush: false)
            return
        }
        server.log(tlsHandler != nil ? "TLS connection error: \(error)" : "connection error: \(error)")
        close(context: context, flush: false)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? TLSUserEvent, case .handshakeCompleted = event {
            // The chain was checked against the CA during the handshake; the CRL is ours
            // to check, before a byte of NBD is read over TLS.
            if let tlsHandler, let refusal = server.configuration.tls?.credentials.refusal(of: tlsHandler) {
                server.log("closing connection: \(refusal)")
                close(context: context, flush: false)
            }
            return
        }
        if let event = event as? ChannelEvent, event == .inputClosed {
            // The client will send nothing more (half-closure is allowed so that what it
            // sent before, NBD_CMD_DISC included, is still answered).
            run(core.inputEnded(), context: context)
            return
        }
        if event is NBDServer.ShutdownEvent {
            handshake.isShuttingDown = true
            // Parses what arrived (answered with errors), then closes when idle.
            let actions = core.shutdownRequested()
            if actions.contains(.parse) { processPending(context: context) }
            run(actions.subtracting(.parse), context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        run(core.writabilityChanged(context.channel.isWritable), context: context)
        context.fireChannelWritabilityChanged()
    }

    /// Carries out what the connection state asked for.
    private func run(_ actions: NBDConnectionState.Actions, context: ChannelHandlerContext) {
        guard !actions.isEmpty else { return }
        if actions.contains(.parse), core.passIsUseful { processPending(context: context) }
        if actions.contains(.read) { context.read() }
        if actions.contains(.close) { close(context: context, flush: true) }
    }

    /// Closes the connection (the state machine's `.close`, or the handler's own reasons:
    /// errors, timeouts); with `flush`, replies already written go out first. Closing
    /// twice is harmless: the second close fails its (absent) promise.
    private func close(context: ChannelHandlerContext, flush: Bool) {
        core.closed()
        if flush { self.sendReplies(context: context) }
        context.close(promise: nil)
    }

    // MARK: Input

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        guard core.receive(&bytes) else { return }
        // Requests arrived: the loop's idle poll adapts to when.
        loopIO.workArrived()
        processPending(context: context)
    }

    func read(context: ChannelHandlerContext) {
        run(core.readRequested(), context: context)
    }

    /// One parsing pass: runs every step the core asks for, sends the pass's WRITEs and
    /// replies, submits the loop's disk queue.
    private func processPending(context: ChannelHandlerContext) {
        while let step = core.nextStep(handshakeAcceptsMessages: handshake.acceptsMessages && handingOff == nil) {
            switch step {
            case .handshake(let message):
                handleHandshake(message, context: context)
            case .read(let request, let delay):
                if let delay {
                    later(delay, context: context) { self.startRead(request, context: context) }
                } else {
                    startRead(request, context: context)
                }
            case .blocking(let operation, let cookie, let delay):
                if let delay {
                    later(delay, context: context) { self.startBlocking(operation, cookie: cookie, context: context) }
                } else {
                    startBlocking(operation, cookie: cookie, context: context)
                }
            case .protocolError(let reason):
                server.log("closing connection: \(reason)")
                close(context: context, flush: false)
                return
            }
        }
        dispatchGatheredWrites(context: context)
        sendReplies(context: context)
        loopIO.scheduleSubmission()
        loopIO.loopMayIdle()
        run(core.endPass(), context: context)
    }

    /// Starts a rate-limited request after `wait`, on this loop.
    private func later(_ wait: TimeAmount, context: ChannelHandlerContext, _ start: @escaping () -> Void) {
        context.eventLoop.assumeIsolated().scheduleTask(in: wait) {
            start()
            // What `processPending` does after a pass: send what is ready, submit reads.
            self.sendReplies(context: context)
            self.loopIO.scheduleSubmission()
        }
    }

    // MARK: Writes

    /// Sends the WRITEs gathered in this pass off the loop as one batch: one hand-off
    /// and one wake-up of the loop for all of them, and the export may plan and submit
    /// them together.
    private func dispatchGatheredWrites(context: ChannelHandlerContext) {
        guard let (writes, delay) = core.takeGatheredWrites(), let export else { return }
        if let delay {
            // The batch waits for its slowest member's turn.
            context.eventLoop.assumeIsolated().scheduleTask(in: delay) {
                self.runWrites(writes, export: export, context: context)
                self.loopIO.scheduleSubmission()
            }
            return
        }
        runWrites(writes, export: export, context: context)
    }

    private func runWrites(_ writes: [GatheredWrite], export: NBDExport, context: ChannelHandlerContext) {
        // Writes that only overwrite owned blocks go to the loop's disk queue; the rest,
        // with every other connection's writes of this loop round, go off the loop as one
        // batch.
        var offLoop: [GatheredWrite] = []
        for write in writes {
            if write.fua || !startOnLoop(write, export: export, context: context) { offLoop.append(write) }
        }
        guard !offLoop.isEmpty else { return }
        loopIO.submitWrites(offLoop, export: export, handler: self, context: context)
    }

    /// Starts `write` on the loop's disk queue; false when the export says it would block.
    private func startOnLoop(_ write: GatheredWrite, export: NBDExport, context: ChannelHandlerContext) -> Bool {
        guard let queue = loopIO.queue else { return false }
        // The payload's storage lives as long as the completion, which holds `write`.
        let start = write.payload.withUnsafeReadableBytes { data in
            export.writeWithoutBlocking(at: write.offset, from: data, queue: queue) { error in
                // On the loop, from its completion round.
                self.finished(self.core.finishWrite(write, error), flush: .afterCompletions, context: context)
            }
        }
        if case .started = start { return true }
        return false
    }

    /// The outcomes of writes handed to `LoopIO.submitWrites`, on the loop.
    func writesFinished(_ writes: [GatheredWrite], _ result: Result<[NBDExportError?], Error>, context: ChannelHandlerContext) {
        loopIO.loopMayIdle()
        let actions = core.finishWrites(writes, result)
        if core.isOpen { sendReplies(context: context) }
        run(actions, context: context)
    }

    // MARK: Reads and other requests

    private func startRead(_ request: NBDConnectionCore.ReadRequest, context: ChannelHandlerContext) {
        guard let export else { return }
        let read = NBDConnectionCore.PendingRead(request, allocator: core.allocator)
        // One closure, with everything the reply needs in it: on the loop's path, a
        // read's only allocation here besides its buffer (the export makes its own).
        let start = export.readWithoutBlocking(at: request.offset, into: read.target, queue: loopIO.queue) { result in
            // On the loop, from its completion round.
            self.loopIO.readDataQueued(Int(request.length))
            self.finished(self.core.finishRead(read, result), flush: .afterCompletions, context: context)
        }
        switch start {
        case .completed(let result):
            finished(core.finishRead(read, result), flush: .withThisPass, context: context)
        case .started:
            break
        case .wouldBlock:
            // Off the loop; the worker is freed as soon as the disk read is submitted,
            // and the device's completion thread fulfils the promise.
            let promise = context.eventLoop.makePromise(of: Result<[NBDExtent], NBDExportError>.self)
            // The reply's data buffer owns this memory and outlives the read (the
            // completion below holds it).
            nonisolated(unsafe) let memory = read.target
            let offset = request.offset
            let outcome = loopIO.submitOffLoop(orFail: promise) {
                export.readAsync(at: offset, into: memory) { promise.succeed($0) }
            }
            outcome.assumeIsolated().whenComplete { outcome in
                let actions =
                    switch outcome {
                    case .success(let result): self.core.finishRead(read, result)
                    case .failure(let error): self.core.finishRead(read, refusedWith: error)
                    }
                self.finished(actions, flush: .now, context: context)
            }
        }
    }

    private func startBlocking(_ operation: NBDBlockingOperation, cookie: UInt64, context: ChannelHandlerContext) {
        guard let export, let session = core.session else { return }
        let allocator = context.channel.allocator
        let future = loopIO.runOffLoop { () -> ByteBuffer in
            NBDConnectionCore.perform(operation, cookie: cookie, export: export, session: session, allocator: allocator)
        }
        future.assumeIsolated().whenComplete { result in
            self.finished(self.core.finishBlocking(cookie: cookie, result), flush: .now, context: context)
        }
    }

    /// When a finished request's reply leaves.
    private enum ReplyFlush {
        /// `processPending` flushes at the end of the pass that is running.
        case withThisPass
        /// Loop completions: one flush per connection after the round (`LoopIO`).
        case afterCompletions
        /// Off-loop work answered on the loop, one request at a time.
        case now
    }

    /// A request finished and the core wrote its reply (`actions` is what the core
    /// returned): arranges the flush, and lets the next requests in.
    private func finished(_ actions: NBDConnectionState.Actions, flush: ReplyFlush, context: ChannelHandlerContext) {
        // The loop may be about to sleep: it polls first (`LoopIO.loopMayIdle`).
        loopIO.loopMayIdle()
        if core.isOpen {
            switch flush {
            case .withThisPass:
                break
            case .afterCompletions:
                if !flushScheduled {
                    flushScheduled = true
                    loopIO.flushAfterCompletions(self, context)
                }
            case .now:
                self.sendReplies(context: context)
            }
        }
        run(actions, context: context)
    }

    // MARK: Output

    /// Hands the core's replies to the channel and flushes. Every flush of this handler
    /// goes through here, so a reply never waits past one.
    private func sendReplies(context: ChannelHandlerContext) {
        core.takeReplies { context.write(wrapOutboundOut($0), promise: nil) }
        context.flush()
        core.repliesFlushed()
    }

    /// Called by the loop's I/O after a round of completions wrote replies.
    func flushReplies(context: ChannelHandlerContext) {
        flushScheduled = false
        if core.isOpen { sendReplies(context: context) }
    }

    // MARK: Handshake

    private func handleHandshake(_ message: NBDServerParser.Message, context: ChannelHandlerContext) {
        if case .option(let request) = message, request.option == .abort {
            // A soft disconnect (nbdinfo --list ends this way): nothing to report.
            abortRequested = true
        }
        run(handshake.receive(message), context: context)
    }

    /// Carries out what the handshake state machine asked for.
    private func run(_ actions: [NBDHandshake.Action], context: ChannelHandlerContext) {
        for action in actions {
            switch action {
            case .send(let reply):
                var out = context.channel.allocator.buffer(capacity: 20 + reply.payload.readableBytes)
                out.writeNBDOptionReply(reply)
                context.write(wrapOutboundOut(out), promise: nil)
            case .sendExportName(let reply):
                var out = context.channel.allocator.buffer(capacity: 134)
                out.writeNBDExportNameReply(reply)
                context.write(wrapOutboundOut(out), promise: nil)
            case .ask(let query):
                ask(query, context: context)
            case .enterTransmission(let newSession):
                // The answer that led here carried the opened export.
                guard let opened = openedExport.take() else {
                    server.log("closing connection: the handshake ended with no export open")
                    close(context: context, flush: false)
                    return
                }
                export = opened
                handshakeTimer?.cancel()
                handshakeTimer = nil
                if tlsHandler == nil, let loop = server.leanLoop(), context.channel is SocketOptionProvider {
                    beginHandOff(session: newSession, to: loop, context: context)
                } else {
                    core.enterTransmission(session: newSession, rateLimit: opened.rateLimit)
                }
            case .startTLS:
                guard startTLS(context: context) else { return }
            case .close(let reason):
                if !abortRequested { server.log("closing connection during handshake: \(reason)") }
                close(context: context, flush: true)
                return
            }
        }
        // An export opened for an answer that did not end in transmission goes back.
        if let unused = openedExport.take() { server.release(unused) }
    }

    // MARK: Hand-off to a lean loop

    /// Sends the handshake's last reply, then (`completeHandOff`) gives the socket to
    /// `loop`. Bytes that arrive meanwhile wait unparsed and go along.
    private func beginHandOff(session: NBDSession, to loop: LeanLoop, context: ChannelHandlerContext) {
        handingOff = (session, loop)
        let written = context.eventLoop.makePromise(of: Void.self)
        // Writes complete in order: once this empty one has, the reply before it is in
        // the socket.
        context.writeAndFlush(wrapOutboundOut(ByteBuffer()), promise: written)
        written.futureResult.assumeIsolated().whenComplete { result in
            switch result {
            case .success: self.completeHandOff(context: context)
            case .failure: self.close(context: context, flush: false)
            }
        }
    }

    /// Duplicates the socket, moves the connection (export, session, unparsed bytes) to
    /// the lean loop, and closes the channel: swift-nio's close unregisters the socket
    /// and closes its own descriptor only (no shutdown), so the duplicate goes on.
    /// When the socket cannot be taken, the connection stays here.
    private func completeHandOff(context: ChannelHandlerContext) {
        // Over on every path: handed off, kept here, or closed meanwhile.
        defer { handingOff = nil }
        guard let (session, loop) = handingOff, core.isOpen, let export else { return }
        let descriptor: Int32?
        do {
            descriptor = try context.pipeline.syncOperations.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) {
                try SocketIO.duplicateNonBlocking($0)
            }
        } catch {
            server.log("serving a connection on swift-nio: its socket could not be taken (\(error))")
            descriptor = nil
        }
        guard let descriptor else {
            stayOnChannel(session: session, export: export, context: context)
            return
        }
        let leftover = core.takeUnparsedInput()
        guard server.handOff(context.channel, to: loop, descriptor: descriptor, session: session, export: export, leftover: leftover) else {
            SocketIO.close(descriptor)
            var bytes = leftover
            _ = core.receive(&bytes)
            stayOnChannel(session: session, export: export, context: context)
            return
        }
        handedOff = true
        self.export = nil
        core.closed()
        context.close(promise: nil)
    }

    /// The hand-off did not happen: transmission goes on over the channel.
    private func stayOnChannel(session: NBDSession, export: NBDExport, context: ChannelHandlerContext) {
        core.enterTransmission(session: session, rateLimit: export.rateLimit)
        processPending(context: context)
    }

    /// Puts TLS in front of this connection once the STARTTLS acknowledgement is written:
    /// the acknowledgement leaves in plain text, and every byte after it, both ways, goes
    /// through TLS. Returns false when the connection was closed instead.
    private func startTLS(context: ChannelHandlerContext) -> Bool {
        guard let tls = server.configuration.tls else {
            close(context: context, flush: false)
            return false
        }
        // The client must wait for the acknowledgement before its TLS handshake: bytes
        // that came with STARTTLS were sent in plain text and are never read as TLS.
        guard !core.hasUnparsedInput else {
            server.log("closing connection: the client sent data after NBD_OPT_STARTTLS without waiting for the reply")
            close(context: context, flush: false)
            return false
        }
        sendReplies(context: context)
        let handler = tls.credentials.makeHandler()
        do {
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
        } catch {
            server.log("closing connection: could not start TLS: \(error)")
            close(context: context, flush: false)
            return false
        }
        tlsHandler = handler
        return true
    }

    /// Asks the export provider off the loop (a lookup may wait for the pool lock, an
    /// open may create an ephemeral clone under the pool lock) and feeds the answer back on the
    /// loop; meanwhile the loop serves its other connections.
    private func ask(_ query: NBDHandshake.CatalogQuery, context: ChannelHandlerContext) {
        let server = self.server
        let channel = context.channel
        let answered = loopIO.runOffLoop { () -> CatalogResult in
            server.answer(query, for: channel)
        }
        answered.assumeIsolated().whenComplete { result in
            switch result {
            case .success(let found):
                guard self.core.isOpen else {
                    if let export = found.export { server.release(export) }
                    return
                }
                if case .refused(let why, _) = found.answer { server.log("could not open export: \(why)") }
                self.openedExport = found.export
                self.run(self.handshake.answer(found.answer), context: context)
                self.processPending(context: context)
            case .failure:
                // The thread pool stopped: the server is going away.
                self.close(context: context, flush: false)
            }
        }
    }
}

/// A catalog answer, and the export it opened (for `open` queries that succeeded).
struct CatalogResult: Sendable {
    var answer: NBDHandshake.CatalogAnswer
    var export: NBDExport?
}
