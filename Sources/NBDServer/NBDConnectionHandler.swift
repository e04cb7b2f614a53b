import NBDProtocol
import NBDTLS
import NIOCore
import NIOSSL
import NIOTLS

/// Serves one NBD connection: the handshake, then requests executed concurrently and
/// answered as they complete (possibly out of order). Reads start on the event loop
/// when the export can do that without blocking (their disk I/O then completes on the
/// loop too); everything else runs off the loop (`NBDServer.blocking`).
///
/// The handler holds no state flags: the handshake is `NBDHandshake` and the
/// connection's life (in flight, held reads, draining, closed) is `NBDConnectionState`,
/// both values that return actions which the handler carries out. The loop never
/// waits: export lookups and opens are asked off the loop and answered back to it.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let server: NBDServer
    @exclusivity(unchecked) private var parser = NBDServerParser()
    private var handshake: NBDHandshake
    @exclusivity(unchecked) private var state: NBDConnectionState
    @exclusivity(unchecked) private var session: NBDSession?
    @exclusivity(unchecked) private var export: NBDExport?
    @exclusivity(unchecked) private var input = UnparsedInput()
    private let loopIO: LoopIO
    /// A flush of replies written by loop completions is queued with the loop's I/O.
    @exclusivity(unchecked) private var flushScheduled = false
    /// Transmission replies not yet handed to the channel; every flush hands them over
    /// (`sendReplies(context:)`, the only way this handler flushes).
    @exclusivity(unchecked) private var replies = ReplyBatch()
    /// The export a catalog answer opened, until the handshake enters transmission.
    private var openedExport: NBDExport?
    /// Closes the connection when the handshake takes too long (slowloris).
    private var handshakeTimer: Scheduled<Void>?
    /// The client sent NBD_OPT_ABORT: its close is not worth a log line.
    private var abortRequested = false
    /// A large WRITE whose payload is still arriving: its bytes are copied once,
    /// straight into a 4 KiB-aligned buffer of their own, instead of accumulating in
    /// `input` (where every read would append and the buffer would regrow).
    @exclusivity(unchecked) private var assembly: (header: NBDRequestHeader, payload: ByteBuffer, remaining: Int)?
    /// Where a read's reply header is encoded before it is copied in front of the data
    /// (see `writeReadData`); never handed to the channel, so reused in place.
    @exclusivity(unchecked) private var readHeader = ByteBuffer()
    /// WRITEs parsed in the current pass: they go off the loop together.
    @exclusivity(unchecked) private var gatheredWrites: [GatheredWrite] = []
    /// WRITE payloads at least this large are assembled that way.
    static let assembledPayloadMinimum = 16384
    /// The TLS handler STARTTLS put at the front of the pipeline.
    private var tlsHandler: NIOSSLServerHandler?

    init(server: NBDServer, loopIO: LoopIO) {
        self.server = server
        self.loopIO = loopIO
        handshake = NBDHandshake(tlsMode: server.configuration.tls?.mode ?? .off)
        state = NBDConnectionState(
            maxInFlight: server.configuration.maxInFlightPerConnection,
            maxInFlightBytes: server.configuration.maxInFlightBytesPerConnection)
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
            guard state.isOpen, !state.isInTransmission else { return }
            server.log("closing connection: no handshake within \(limit.nanoseconds / 1_000_000) ms")
            close(context: context, flush: false)
        }
        context.writeAndFlush(wrapOutboundOut(NBDHandshake.greeting()), promise: nil)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        state.closed()
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
        if event is NBDServer.ShutdownEvent {
            handshake.isShuttingDown = true
            // Parses what arrived (answered with errors), then closes when idle.
            let actions = state.shutdownRequested()
            if actions.contains(.parse) { processPending(context: context) }
            run(actions.subtracting(.parse), context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        run(state.writabilityChanged(context.channel.isWritable), context: context)
        context.fireChannelWritabilityChanged()
    }

    /// Carries out what the connection state asked for.
    private func run(_ actions: NBDConnectionState.Actions, context: ChannelHandlerContext) {
        guard !actions.isEmpty else { return }
        if actions.contains(.parse), input.bytes.readableBytes > 0 { processPending(context: context) }
        if actions.contains(.read) { context.read() }
        if actions.contains(.close) { close(context: context, flush: true) }
    }

    /// Closes the connection (the state machine's `.close`, or the handler's own reasons:
    /// errors, timeouts); with `flush`, replies already written go out first. Closing
    /// twice is harmless: the second close fails its (absent) promise.
    private func close(context: ChannelHandlerContext, flush: Bool) {
        state.closed()
        if flush { self.sendReplies(context: context) }
        context.close(promise: nil)
    }

    // MARK: Input

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard state.isOpen else { return }
        var bytes = unwrapInboundIn(data)
        input.lastReadSize = bytes.readableBytes
        if assembly != nil {
            continueAssembly(with: &bytes, context: context)
            if bytes.readableBytes == 0 { return }
        }
        input.receive(&bytes)
        processPending(context: context)
    }

    func read(context: ChannelHandlerContext) {
        run(state.readRequested(), context: context)
    }

    private func processPending(context: ChannelHandlerContext) {
        while state.mayParse {
            // While the export catalog is asked, later options wait their turn.
            if parser.phase != .transmission && !handshake.acceptsMessages { break }
            if parser.phase == .transmission && startAssembly(context: context) { break }
            let message: NBDServerParser.Message?
            do {
                message = try parser.next(&input.bytes)
            } catch {
                server.log("closing connection: \(error)")
                close(context: context, flush: false)
                return
            }
            guard let message else { break }
            if parser.phase == .transmission {
                handleTransmission(message, context: context)
            } else {
                handleHandshake(message, context: context)
            }
        }
        input.keepTail(allocator: context.channel.allocator)
        dispatchGatheredWrites(context: context)
        sendReplies(context: context)
        loopIO.scheduleSubmission()
        loopIO.loopMayIdle()
        run(state.inputProcessed(), context: context)
    }

    /// Sends the WRITEs gathered in this pass off the loop as one batch: one hand-off
    /// and one wake-up of the loop for all of them, and the export may plan and submit
    /// them together.
    private func dispatchGatheredWrites(context: ChannelHandlerContext) {
        guard !gatheredWrites.isEmpty, let export else { return }
        // Handed over whole: the next pass starts a new array (keeping capacity here
        // would copy, since the batch still shares the storage).
        let writes = gatheredWrites
        gatheredWrites = []
        if let limit = export.rateLimit {
            // The batch waits for its slowest member's turn.
            let wait = writes.map { limit.reserve(bytes: $0.payload.readableBytes) }.max() ?? .zero
            if wait > .zero {
                context.eventLoop.assumeIsolated().scheduleTask(in: wait) {
                    self.runWrites(writes, export: export, context: context)
                    self.loopIO.scheduleSubmission()
                }
                return
            }
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
                self.writeFinishedOnLoop(write, error, context: context)
            }
        }
        if case .started = start { return true }
        return false
    }

    private func writeFinishedOnLoop(_ write: GatheredWrite, _ error: NBDExportError?, context: ChannelHandlerContext) {
        finishRequest(bytes: write.payload.readableBytes, flush: .afterCompletions, context: context) {
            writeReply(cookie: write.cookie, error, context: context)
        }
    }

    /// The outcomes of writes handed to `LoopIO.submitWrites`, on the loop.
    func writesFinished(_ writes: [GatheredWrite], _ result: Result<[NBDExportError?], Error>, context: ChannelHandlerContext) {
        var actions: NBDConnectionState.Actions = []
        for (i, write) in writes.enumerated() {
            actions.formUnion(requestFinished(bytes: write.payload.readableBytes))
            guard state.isOpen else { continue }
            switch result {
            case .success(let outcomes):
                writeReply(cookie: write.cookie, outcomes[i], context: context)
            case .failure(let error):
                refuseShutDownPool(error, cookie: write.cookie, context: context)
            }
        }
        if state.isOpen { sendReplies(context: context) }
        run(actions, context: context)
    }

    /// Appends (without flushing) a WRITE's reply: done, or its error.
    private func writeReply(cookie: UInt64, _ error: NBDExportError?, context: ChannelHandlerContext) {
        if let error {
            NBDReplyEncoder.error(
                error.code, message: error.message, cookie: cookie, structured: session?.structuredReplies ?? false,
                into: &replies.bytes)
        } else {
            NBDReplyEncoder.done(cookie: cookie, into: &replies.bytes)
        }
    }

    /// Appends a reply that a worker built off the loop: copied into the batch, or, when
    /// large (BLOCK_STATUS with many descriptors), written after it as it is.
    private func append(builtOffLoop reply: ByteBuffer, context: ChannelHandlerContext) {
        guard reply.readableBytes <= ReplyBatch.largestBatched else {
            write(afterBatch: reply, context: context)
            return
        }
        var reply = reply
        replies.bytes.writeBuffer(&reply)
    }

    /// Hands the batch to the channel, then `bytes`, without flushing: for what must
    /// follow the batch's last bytes (read data after its header) or is too large to
    /// copy into it.
    private func write(afterBatch bytes: ByteBuffer, context: ChannelHandlerContext) {
        handOverReplies(context: context)
        context.write(wrapOutboundOut(bytes), promise: nil)
    }

    private func handOverReplies(context: ChannelHandlerContext) {
        if let batch = replies.take() { context.write(wrapOutboundOut(batch), promise: nil) }
    }

    /// Hands the batched replies to the channel and flushes. Every flush of this
    /// handler goes through here, so a batched reply never waits past one.
    private func sendReplies(context: ChannelHandlerContext) {
        handOverReplies(context: context)
        context.flush()
        replies.rewind()
    }

    /// Called by the loop's I/O after a round of completions wrote replies.
    func flushReplies(context: ChannelHandlerContext) {
        flushScheduled = false
        if state.isOpen { sendReplies(context: context) }
    }

    /// Starts assembling when `input` begins with a large WRITE whose payload has not
    /// all arrived. Returns true when it did (the rest comes through `continueAssembly`).
    private func startAssembly(context: ChannelHandlerContext) -> Bool {
        guard assembly == nil, let header = try? input.bytes.peekNBDRequestHeader(), header.command == .write else { return false }
        let length = Int(header.length)
        guard length >= Self.assembledPayloadMinimum, length <= NBDLimits.maxPayload,
            input.bytes.readableBytes < NBDRequestHeader.size + length
        else { return false }
        input.bytes.moveReaderIndex(forwardBy: NBDRequestHeader.size)
        var payload = Self.makeAlignedBuffer(capacity: length, allocator: context.channel.allocator)
        let arrived = input.bytes.readableBytes
        payload.writeBuffer(&input.bytes)
        input.release()
        assembly = (header, payload, length - arrived)
        return true
    }

    /// Moves the awaited payload bytes out of `bytes`; once complete, runs the WRITE and
    /// goes back to parsing (what is left in `bytes` is the caller's).
    private func continueAssembly(with bytes: inout ByteBuffer, context: ChannelHandlerContext) {
        // Taken out, so that the payload's storage has one owner and appends in place.
        guard var current = assembly.take() else { return }
        var chunk = bytes.readSlice(length: min(current.remaining, bytes.readableBytes))!
        current.remaining -= chunk.readableBytes
        current.payload.writeBuffer(&chunk)
        guard current.remaining == 0 else {
            assembly = current
            return
        }
        handleTransmission(.request(NBDRequest(header: current.header, payload: current.payload)), context: context)
        if bytes.readableBytes == 0 {
            // Nothing else arrived with it: parse what `input` may hold, then flush.
            processPending(context: context)
        }
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
                export = openedExport.take()
                session = newSession
                parser.enterTransmission()
                handshakeTimer?.cancel()
                handshakeTimer = nil
                state.enterTransmission()
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
        guard input.bytes.readableBytes == 0, assembly == nil else {
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
                guard self.state.isOpen else {
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

    // MARK: Transmission

    private func handleTransmission(_ message: NBDServerParser.Message, context: ChannelHandlerContext) {
        guard let session, let export else { return }
        let header: NBDRequestHeader
        var payload: ByteBuffer?
        switch message {
        case .request(let request):
            header = request.header
            payload = request.payload
        case .oversizedWrite(let oversized):
            reply(error: .invalid, "WRITE of \(oversized.length) bytes exceeds the 32 MiB maximum", cookie: oversized.cookie, context: context)
            return
        case .clientFlags, .option, .oversizedOption:
            // The parser yields requests only once in transmission.
            close(context: context, flush: false)
            return
        }
        switch state.admit() {
        case .drop:
            return
        case .refuseShuttingDown:
            if header.command != .disconnect {
                reply(error: .shutdown, "server is shutting down", cookie: header.cookie, context: context)
            }
            return
        case .run:
            break
        }
        switch NBDRequestValidator.validate(header, session: session) {
        case .reject(let error, let message):
            reply(error: error, message, cookie: header.cookie, context: context)
        case .execute(.disconnect):
            state.disconnectRequested()
        case .execute(.write(let offset, let fua)):
            let aligned = Self.alignedPayload(payload.take() ?? ByteBuffer(), allocator: context.channel.allocator)
            requestStarted(bytes: aligned.readableBytes)
            gatheredWrites.append(GatheredWrite(cookie: header.cookie, offset: offset, fua: fua, payload: aligned))
        case .execute(.read(let offset, let length, let dontFragment)):
            requestStarted(bytes: Int(length))
            let (cookie, structured) = (header.cookie, session.structuredReplies)
            // Without a wait, no closure: this runs for every READ.
            if let wait = rateLimitWait(of: export, bytes: Int(length)) {
                later(wait, context: context) {
                    self.read(
                        offset: offset, length: length, dontFragment: dontFragment, cookie: cookie, export: export,
                        structured: structured, context: context)
                }
            } else {
                read(
                    offset: offset, length: length, dontFragment: dontFragment, cookie: cookie, export: export,
                    structured: structured, context: context)
            }
        case .execute(.blocking(let operation)):
            requestStarted(bytes: 0)
            withinLimit(of: export, bytes: operation.limitedBytes, context: context) {
                let allocator = context.channel.allocator
                let future = self.loopIO.runOffLoop { () -> ByteBuffer in
                    Self.perform(operation, cookie: header.cookie, export: export, session: session, allocator: allocator)
                }
                future.assumeIsolated().whenComplete { result in
                    self.finishRequest(bytes: 0, flush: .now, context: context) {
                        switch result {
                        case .success(let reply):
                            self.append(builtOffLoop: reply, context: context)
                        case .failure(let error):
                            self.refuseShutDownPool(error, cookie: header.cookie, context: context)
                        }
                    }
                }
            }
        }
    }

    /// Every request is counted by the connection (back-pressure) and told to the loop
    /// (which adapts and schedules its poll before sleeping).
    private func requestStarted(bytes: Int) {
        state.requestStarted(bytes: bytes)
        loopIO.workArrived()
    }

    private func requestFinished(bytes: Int) -> NBDConnectionState.Actions {
        loopIO.loopMayIdle()
        return state.requestFinished(bytes: bytes)
    }

    /// Runs `start` now, or, when the export's rate limit says to wait, later on this
    /// loop (never blocking it). The request counts as in flight meanwhile, so a
    /// throttled client also stops being read once it has `maxInFlight` waiting.
    private func withinLimit(of export: NBDExport, bytes: Int, context: ChannelHandlerContext, _ start: @escaping () -> Void) {
        guard let wait = rateLimitWait(of: export, bytes: bytes) else { return start() }
        later(wait, context: context, start)
    }

    /// How long the export's rate limit makes a request of `bytes` wait, having
    /// reserved them; nil when it may start now.
    private func rateLimitWait(of export: NBDExport, bytes: Int) -> TimeAmount? {
        guard let limit = export.rateLimit else { return nil }
        let wait = limit.reserve(bytes: bytes)
        return wait > .zero ? wait : nil
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

    private func reply(error: NBDError, _ message: String, cookie: UInt64, context: ChannelHandlerContext) {
        NBDReplyEncoder.error(
            error, message: message, cookie: cookie, structured: session?.structuredReplies ?? false, into: &replies.bytes)
    }

    private func read(
        offset: UInt64, length: UInt32, dontFragment: Bool, cookie: UInt64, export: NBDExport, structured: Bool,
        context: ChannelHandlerContext
    ) {
        let bytes = Int(length)
        let (data, target, headroom) = Self.makeReadBuffer(length: bytes, allocator: context.channel.allocator)
        let reply = ReadReply(
            cookie: cookie, offset: offset, data: data, headroom: headroom, structured: structured, dontFragment: dontFragment)
        // One closure, with everything the reply needs in it: on the loop's path, a
        // read's only allocation here besides its buffer (the export makes its own).
        let start = export.readWithoutBlocking(at: offset, into: target, queue: loopIO.queue) { result in
            // On the loop, from its completion round.
            self.finishRequest(bytes: bytes, flush: .afterCompletions, context: context) {
                self.writeReadReply(reply, result, context: context)
            }
        }
        switch start {
        case .completed(let result):
            finishRequest(bytes: bytes, flush: .withThisPass, context: context) {
                writeReadReply(reply, result, context: context)
            }
        case .started:
            break
        case .wouldBlock:
            // Off the loop; the worker is freed as soon as the disk read is submitted,
            // and the device's completion thread fulfils the promise.
            let promise = context.eventLoop.makePromise(of: Result<[NBDExtent], NBDExportError>.self)
            // The reply's data buffer owns this memory and outlives the read (the
            // completion below holds it).
            nonisolated(unsafe) let memory = target
            let read = loopIO.submitOffLoop(orFail: promise) {
                export.readAsync(at: offset, into: memory) { promise.succeed($0) }
            }
            read.assumeIsolated().whenComplete { outcome in
                self.finishRequest(bytes: bytes, flush: .now, context: context) {
                    switch outcome {
                    case .success(let result): self.writeReadReply(reply, result, context: context)
                    case .failure(let error): self.refuseShutDownPool(error, cookie: cookie, context: context)
                    }
                }
            }
        }
    }

    /// What a READ's reply needs once its data is in.
    private struct ReadReply {
        var cookie: UInt64
        var offset: UInt64
        var data: ByteBuffer
        var headroom: UnsafeMutableRawBufferPointer
        var structured: Bool
        var dontFragment: Bool
    }

    /// Appends a READ's reply: its data, or its error.
    private func writeReadReply(_ reply: ReadReply, _ result: Result<[NBDExtent], NBDExportError>, context: ChannelHandlerContext) {
        switch result {
        case .success(let extents):
            writeReadData(reply, extents: extents, context: context)
        case .failure(let error):
            NBDReplyEncoder.error(
                error.code, message: error.message, cookie: reply.cookie, structured: reply.structured, into: &replies.bytes)
        }
    }

    /// Writes a successful read's reply. The usual one, a header and the data as they
    /// are, leaves as one buffer: the header is copied into the room left in front of
    /// the data (`makeReadBuffer`), so the read costs one channel write and no other
    /// buffer. A reply the encoder builds whole (structured, with holes) goes into the
    /// batch instead.
    private func writeReadData(_ read: ReadReply, extents: [NBDExtent], context: ChannelHandlerContext) {
        readHeader.clear()
        let follows = NBDReplyEncoder.read(
            cookie: read.cookie, offset: read.offset, data: read.data, extents: extents, structured: read.structured,
            dontFragment: read.dontFragment, into: &readHeader)
        let length = readHeader.readableBytes
        let headroom = read.headroom
        guard let follows, length <= headroom.count, follows.readerIndex == read.data.readerIndex,
            follows.readerIndex >= length
        else {
            replies.bytes.writeBuffer(&readHeader)
            if let follows { write(afterBatch: follows, context: context) }
            return
        }
        // The room is this reply's own memory (no other copy of the buffer reads it).
        readHeader.withUnsafeReadableBytes { header in
            UnsafeMutableRawBufferPointer(rebasing: headroom[(headroom.count - length)...]).copyMemory(from: header)
        }
        var reply = follows
        reply.moveReaderIndex(to: reply.readerIndex - length)
        context.write(wrapOutboundOut(reply), promise: nil)
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

    /// Lets the request's bytes go, writes its reply with `writeReply` while the
    /// connection is open, arranges the flush, and lets the next requests in.
    private func finishRequest(
        bytes: Int, flush: ReplyFlush, context: ChannelHandlerContext, writeReply: () -> Void
    ) {
        let actions = requestFinished(bytes: bytes)
        if state.isOpen {
            writeReply()
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

    /// The reply when the thread pool refused the work: the server is going away.
    private func refuseShutDownPool(_ error: Error, cookie: UInt64, context: ChannelHandlerContext) {
        reply(error: .shutdown, "server is shutting down (\(error))", cookie: cookie, context: context)
    }

    /// An empty buffer whose reader and writer index sit on a 4 KiB-aligned address,
    /// with room for `capacity` bytes from there: O_DIRECT can use it without bouncing.
    /// At least `headroom` bytes come before that address, inside the buffer.
    private static func makeAlignedBuffer(capacity: Int, headroom: Int = 0, allocator: ByteBufferAllocator) -> ByteBuffer {
        let alignment = 4096
        var buffer = allocator.buffer(capacity: capacity + alignment + headroom)
        let pad = buffer.withUnsafeMutableWritableBytes { raw in
            headroom + (alignment - (Int(bitPattern: raw.baseAddress) + headroom) % alignment) % alignment
        }
        buffer.moveWriterIndex(forwardBy: pad)
        buffer.moveReaderIndex(forwardBy: pad)
        return buffer
    }

    /// The payload itself when it starts on a 4 KiB boundary (assembled ones do), else
    /// a copy that does. The copy is the one O_DIRECT needs anyway, and it keeps a
    /// write in flight from pinning the whole receive buffer it was sliced from. (Under
    /// `--cache writeback` the page cache needs no alignment, but keeping the slice
    /// instead cost more than the copy: writes in flight pinned the channel's pooled
    /// receive buffers, so it allocated new ones (up to 256 KiB), which malloc gave
    /// back to the kernel and faulted in again. Tried again once freed memory stayed
    /// mapped, it was no faster than the copy; docs/performance.md.)
    private static func alignedPayload(_ payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        let aligned = payload.withUnsafeReadableBytes { Int(bitPattern: $0.baseAddress) % 4096 == 0 }
        guard !aligned, payload.readableBytes > 0 else { return payload }
        var copy = makeAlignedBuffer(capacity: payload.readableBytes, allocator: allocator)
        var source = payload
        copy.writeBuffer(&source)
        return copy
    }

    /// A reply buffer holding `length` data bytes at a 4 KiB-aligned address, and that
    /// memory, for the read to fill (valid while the buffer is alive and not written to).
    /// Also returns the `readHeaderRoom` bytes right before the data, where
    /// `writeReadData` puts the reply's header.
    private static func makeReadBuffer(
        length: Int, allocator: ByteBufferAllocator
    ) -> (ByteBuffer, target: UnsafeMutableRawBufferPointer, headroom: UnsafeMutableRawBufferPointer) {
        var data = makeAlignedBuffer(capacity: length, headroom: readHeaderRoom, allocator: allocator)
        var target = UnsafeMutableRawBufferPointer(start: nil, count: 0)
        data.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { raw in
            target = UnsafeMutableRawBufferPointer(rebasing: raw[0..<length])
            return length
        }
        // Taken last, from the storage the data lives in (nothing reallocates it after).
        let start = data.readerIndex
        let headroom = data.withVeryUnsafeMutableBytes { storage in
            UnsafeMutableRawBufferPointer(rebasing: storage[(start - readHeaderRoom)..<start])
        }
        return (data, target, headroom)
    }

    /// Room for the longest header that goes in front of read data: a structured
    /// OFFSET_DATA chunk's (20 bytes of chunk header and the 8-byte offset).
    static let readHeaderRoom = 32

    /// Runs one blocking operation off the loop and builds its reply. Never throws:
    /// failures become error replies.
    private static func perform(
        _ operation: NBDBlockingOperation, cookie: UInt64, export: NBDExport, session: NBDSession,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var out = allocator.buffer(capacity: 64)
        let structured = session.structuredReplies
        do throws(NBDExportError) {
            switch operation {
            case .writeZeroes(let offset, let length, let mayTrim, let fua):
                try export.writeZeroes(at: offset, length: UInt64(length), mayTrim: mayTrim, fua: fua)
                NBDReplyEncoder.done(cookie: cookie, into: &out)
            case .trim(let offset, let length, let fua):
                try export.trim(at: offset, length: UInt64(length), fua: fua)
                NBDReplyEncoder.done(cookie: cookie, into: &out)
            case .flush:
                try export.flush()
                NBDReplyEncoder.done(cookie: cookie, into: &out)
            case .cache(let offset, let length):
                // Metadata for the range is pulled into the cache; data is not prefetched.
                _ = try export.extents(at: offset, length: UInt64(length))
                NBDReplyEncoder.done(cookie: cookie, into: &out)
            case .blockStatus(let offset, let length, let onlyOne):
                // One chunk per selected context (the validator admits BLOCK_STATUS only
                // with at least one); all are worked out before any is written, so a
                // failure leaves a lone error chunk.
                var chunks: [(id: UInt32, extents: [NBDStatusExtent])] = []
                for context in session.metaContexts {
                    switch context.kind {
                    case .allocation:
                        let extents = try export.extents(at: offset, length: UInt64(length))
                        chunks.append((context.id, extents.map(NBDReplyEncoder.allocationStatus)))
                    case .provided(let key):
                        chunks.append((context.id, try export.statusExtents(context: key, at: offset, length: UInt64(length))))
                    }
                }
                for (index, chunk) in chunks.enumerated() {
                    NBDReplyEncoder.blockStatus(
                        cookie: cookie, contextID: chunk.id, offset: offset, length: length, extents: chunk.extents,
                        onlyOne: onlyOne, isLast: index == chunks.count - 1, into: &out)
                }
            }
        } catch {
            out.clear()
            NBDReplyEncoder.error(error.code, message: error.message, cookie: cookie, structured: structured, into: &out)
        }
        return out
    }
}

extension Optional {
    /// Moves the value out, leaving nil (avoids a copy-on-write of large buffers).
    fileprivate mutating func take() -> Wrapped? {
        defer { self = nil }
        return self
    }
}

/// A catalog answer, and the export it opened (for `open` queries that succeeded).
struct CatalogResult: Sendable {
    var answer: NBDHandshake.CatalogAnswer
    var export: NBDExport?
}
