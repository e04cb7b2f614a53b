import NBDProtocol
import NIOCore
import ThinSystem

/// One connection in transmission on a `LeanLoop`: its socket, its
/// `NBDConnectionCore`, and the replies the socket has not taken yet. What the core
/// asks for is carried out as `NBDConnectionHandler` does on swift-nio, with the loop's
/// poller, timers and inbox in place of the channel, and one gathered send per flush in
/// place of the pipeline's writes.
///
/// Loop thread only.
final class LeanConnection {
    let token: UInt64
    let descriptor: Int32
    private unowned let loop: LeanLoop
    private let server: NBDServer
    private let export: NBDExport
    private let session: NBDSession
    private let handle: LeanConnectionHandle
    @exclusivity(unchecked) private var core: NBDConnectionCore
    /// Where the socket's bytes are read into; reused while nothing else holds it.
    @exclusivity(unchecked) private var receiveBuffer: ByteBuffer
    /// Replies the socket has not taken, in order, and their size.
    @exclusivity(unchecked) private var output: [ByteBuffer] = []
    @exclusivity(unchecked) private var outputBytes = 0
    private let writer = VectoredWriter()
    /// What the poller watches the socket for.
    @exclusivity(unchecked) private var watchingReadable = true
    @exclusivity(unchecked) private var watchingWritable = false
    /// The core wants bytes (it said `.read`); false while back-pressure holds them.
    @exclusivity(unchecked) private var wantsInput = true
    @exclusivity(unchecked) private var inputEnded = false
    /// False while the socket holds more than the high-water mark of replies.
    @exclusivity(unchecked) private var writable = true
    @exclusivity(unchecked) private var inFlushList = false
    /// `close` has begun (its last flush may run requests' outcomes).
    @exclusivity(unchecked) private var closing = false
    @exclusivity(unchecked) private(set) var isClosed = false

    /// The most one read takes from the socket (what swift-nio's adaptive allocator
    /// grows to on this path).
    static let readSize = 256 << 10
    /// Reads per poller wake-up at most (swift-nio's `maxMessagesPerRead` here).
    static let readsPerWakeup = 16

    init(loop: LeanLoop, server: NBDServer, token: UInt64, handOff: LeanHandOff) {
        self.loop = loop
        self.server = server
        self.token = token
        descriptor = handOff.descriptor
        export = handOff.export
        session = handOff.session
        handle = handOff.handle
        let allocator = ByteBufferAllocator.recycling
        core = NBDConnectionCore(
            maxInFlight: server.configuration.maxInFlightPerConnection,
            maxInFlightBytes: server.configuration.maxInFlightBytesPerConnection, allocator: allocator)
        core.enterTransmission(session: handOff.session, rateLimit: handOff.export.rateLimit)
        receiveBuffer = allocator.buffer(capacity: Self.readSize)
    }

    /// Starts serving: the bytes that came with the handshake first.
    func start(leftover: ByteBuffer, shuttingDown: Bool) {
        handle.adopted(as: token)
        var bytes = leftover
        if bytes.readableBytes > 0, core.receive(&bytes) { pass() }
        if shuttingDown { shutdownRequested() }
    }

    /// The connection could not be watched: it counts as closed without having served.
    func abandon() {
        isClosed = true
        core.closed()
        server.release(export)
        server.connectionClosed(ObjectIdentifier(handle))
        handle.closed.succeed(())
    }

    // MARK: Socket events

    /// The socket has input, or (`failed`) an error or hang-up, which epoll reports
    /// whatever it was asked to watch.
    func socketReadable(failed: Bool) {
        guard !isClosed else { return }
        guard !inputEnded else {
            // A hang-up after the end of input: the client closed its side entirely and
            // cannot read replies; waiting would only spin on the hang-up.
            if failed { close(flush: false) }
            return
        }
        guard core.readRequested().contains(.read) else {
            // Back-pressure: the core lets the input wait; it says `.read` when it may.
            wantsInput = false
            updateInterest()
            return
        }
        // Up to a few reads per wake-up while each fills the buffer (a large WRITE
        // arriving), as swift-nio's channel does: fewer trips through the poller.
        for _ in 0..<Self.readsPerWakeup {
            receiveBuffer.clear()
            var outcome = SocketIO.ReadResult.wouldBlock
            receiveBuffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Self.readSize) { memory in
                outcome = SocketIO.read(descriptor, into: UnsafeMutableRawBufferPointer(rebasing: memory.prefix(Self.readSize)))
                if case .bytes(let count) = outcome { return count }
                return 0
            }
            switch outcome {
            case .bytes(let count):
                if core.receive(&receiveBuffer) { pass() }
                guard count == Self.readSize, !isClosed, core.readRequested().contains(.read) else { return }
            case .wouldBlock:
                return
            case .endOfFile:
                inputEnded = true
                updateInterest()
                run(core.inputEnded())
                return
            case .failed(let error):
                server.log("connection error: \(error)")
                close(flush: false)
                return
            }
        }
    }

    func socketWritable() {
        guard !isClosed else { return }
        writeOutput()
    }

    /// The server shuts down, or a management command closes this export.
    func shutdownRequested() {
        guard !isClosed else { return }
        let actions = core.shutdownRequested()
        if actions.contains(.parse) { pass() }
        run(actions.subtracting(.parse))
    }

    // MARK: Requests

    /// One parsing pass, as `NBDConnectionHandler.processPending`.
    private func pass() {
        while let step = core.nextStep(handshakeAcceptsMessages: false) {
            switch step {
            case .handshake:
                // The parser is in transmission from the start: this cannot come.
                server.log("closing connection: a handshake message in transmission")
                close(flush: false)
                return
            case .read(let request, let delay):
                if let delay {
                    loop.schedule(after: delay) { [self] in
                        startRead(request)
                        scheduleFlush()
                    }
                } else {
                    startRead(request)
                }
            case .blocking(let operation, let cookie, let delay):
                if let delay {
                    loop.schedule(after: delay) { [self] in startBlocking(operation, cookie: cookie) }
                } else {
                    startBlocking(operation, cookie: cookie)
                }
            case .protocolError(let reason):
                server.log("closing connection: \(reason)")
                close(flush: false)
                return
            }
        }
        dispatchGatheredWrites()
        flush()
        run(core.endPass())
    }

    private func run(_ actions: NBDConnectionState.Actions) {
        guard !actions.isEmpty, !isClosed else { return }
        if actions.contains(.parse), core.passIsUseful { pass() }
        if actions.contains(.read), !wantsInput {
            wantsInput = true
            updateInterest()
        }
        if actions.contains(.close) { close(flush: true) }
    }

    private func startRead(_ request: NBDConnectionCore.ReadRequest) {
        guard !isClosed else { return }
        let read = NBDConnectionCore.PendingRead(request, allocator: core.allocator)
        let start = export.readWithoutBlocking(at: request.offset, into: read.target, queue: loop.queue) { [self] result in
            // On the loop, from its completion round (which flushes by its budget).
            loop.readDataQueued(Int(request.length))
            finished(core.finishRead(read, result))
        }
        switch start {
        case .completed(let result):
            // Within a pass, which flushes at its end.
            run(core.finishRead(read, result))
        case .started:
            break
        case .wouldBlock:
            let export = self.export
            let memory = LoopBound(read.target)
            let loop = self.loop
            // The worker is freed once the read is submitted; the device's completion
            // thread hands the outcome to the loop.
            // Counted until the read's outcome is back, not only its submission.
            let waiting = LoopBound((self, read))
            loop.awaitingOtherThread()
            loop.offLoop({ () -> Void in
                export.readAsync(at: request.offset, into: memory.value) { result in
                    let outcome = LoopBound(result)
                    loop.execute {
                        loop.otherThreadAnswered()
                        let (connection, read) = waiting.value
                        connection.finished(connection.core.finishRead(read, outcome.value))
                    }
                }
            }, completion: { [self] submitted in
                guard case .failure(let error) = submitted else { return }
                loop.otherThreadAnswered()
                finished(core.finishRead(read, refusedWith: error))
            })
        }
    }

    private func startBlocking(_ operation: NBDBlockingOperation, cookie: UInt64) {
        guard !isClosed else { return }
        let (export, session, allocator) = (self.export, self.session, core.allocator)
        loop.offLoop({
            NBDConnectionCore.perform(operation, cookie: cookie, export: export, session: session, allocator: allocator)
        }, completion: { [self] result in
            finished(core.finishBlocking(cookie: cookie, result))
        })
    }

    private func dispatchGatheredWrites() {
        guard let (writes, delay) = core.takeGatheredWrites() else { return }
        if let delay {
            loop.schedule(after: delay) { [self] in runWrites(writes) }
        } else {
            runWrites(writes)
        }
    }

    private func runWrites(_ writes: [GatheredWrite]) {
        guard !isClosed else { return }
        var offLoop: [GatheredWrite] = []
        for write in writes {
            if write.fua || !startOnLoop(write) { offLoop.append(write) }
        }
        guard !offLoop.isEmpty else { return }
        let (export, provider) = (self.export, server.provider)
        let batch = LoopBound(offLoop)
        loop.offLoop({
            LoopIO.runWriteBatches([(export, batch.value)], provider: provider)[0]
        }, completion: { [self] result in
            finished(core.finishWrites(offLoop, result))
        })
    }

    private func startOnLoop(_ write: GatheredWrite) -> Bool {
        guard let queue = loop.queue else { return false }
        // The payload's storage lives as long as the completion, which holds `write`.
        let start = write.payload.withUnsafeReadableBytes { data in
            export.writeWithoutBlocking(at: write.offset, from: data, queue: queue) { [self] error in
                finished(core.finishWrite(write, error))
            }
        }
        if case .started = start { return true }
        return false
    }

    /// A request finished and the core wrote its reply: it leaves with the round's
    /// flush, and the next requests come in.
    private func finished(_ actions: NBDConnectionState.Actions) {
        scheduleFlush()
        run(actions)
    }

    // MARK: Output

    private func scheduleFlush() {
        guard !inFlushList, !isClosed else { return }
        inFlushList = true
        loop.flushAtEndOfRound(self)
    }

    /// Takes the core's replies and sends what the socket takes now.
    func flush() {
        inFlushList = false
        guard !isClosed else { return }
        sendReplies()
    }

    /// Queues the core's replies behind what the socket has not taken, and sends.
    private func sendReplies() {
        core.takeReplies { [self] reply in
            outputBytes += reply.readableBytes
            output.append(reply)
        }
        writeOutput()
    }

    /// Sends queued replies until they are all out or the socket is full; then watches
    /// for room, and tells the core when the queue crosses a water mark.
    private func writeOutput() {
        while !output.isEmpty {
            writer.reset()
            // The buffers stay in `output`, alive and unmodified, until the send returns.
            for buffer in output {
                let added = buffer.withUnsafeReadableBytes { writer.append($0) }
                if !added { break }
            }
            switch writer.write(to: descriptor) {
            case .wrote(let count):
                consumeOutput(count)
                if count < writer.byteCount { break }
                continue
            case .wouldBlock:
                break
            case .failed(let error):
                if !closing { server.log("connection error: \(error)") }
                close(flush: false)
                return
            }
            break
        }
        // The batch's storage is reused once the socket took it.
        core.repliesFlushed()
        let highWater = server.configuration.outboundHighWaterMark
        if writable && outputBytes > highWater {
            writable = false
            run(core.writabilityChanged(false))
        } else if !writable && outputBytes <= highWater / 2 {
            writable = true
            run(core.writabilityChanged(true))
        }
        updateInterest()
    }

    private func consumeOutput(_ count: Int) {
        var left = count
        var done = 0
        while done < output.count && left > 0 {
            let size = output[done].readableBytes
            if size <= left {
                left -= size
                done += 1
            } else {
                output[done].moveReaderIndex(forwardBy: left)
                left = 0
            }
        }
        if done == output.count {
            // All sent (the usual case): no shifting, and the array keeps its storage.
            output.removeAll(keepingCapacity: true)
        } else {
            output.removeFirst(done)
        }
        outputBytes -= count
    }

    private func updateInterest() {
        guard !isClosed else { return }
        let readable = wantsInput && !inputEnded
        let writable = !output.isEmpty
        guard readable != watchingReadable || writable != watchingWritable else { return }
        watchingReadable = readable
        watchingWritable = writable
        loop.socketInterestChanged(self, readable: readable, writable: writable)
    }

    // MARK: Closing

    /// Closes the connection; with `flush`, replies already written are sent first (as
    /// far as the socket takes them now). Closing twice does nothing.
    func close(flush: Bool) {
        guard !closing else { return }
        closing = true
        // First: nothing more is parsed or answered, whatever the last send sets off.
        core.closed()
        if flush { sendReplies() }
        isClosed = true
        output.removeAll()
        outputBytes = 0
        loop.connectionClosed(self)
        server.release(export)
        server.connectionClosed(ObjectIdentifier(handle))
        handle.closed.succeed(())
    }
}
