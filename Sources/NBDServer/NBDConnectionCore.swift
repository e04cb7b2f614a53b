import NBDProtocol
import NIOCore

/// One connection's byte stream and requests, with no transport in it: the bytes that
/// arrived and are not parsed, the request logic (admission, validation, back-pressure,
/// the rate limit, write gathering) and the replies waiting to leave. A value that
/// returns actions; whoever owns the socket (the channel handler, for every connection
/// today) carries them out: it feeds in bytes, starts the reads and off-loop work the
/// core asks for, reports their outcomes, and writes out what `takeReplies` gives it.
///
/// Nothing here does I/O, blocks or touches a clock except the rate limit's (a
/// reservation is a lock and a clock read, only when the export is limited). Costs per
/// request: no allocation for a READ besides its data buffer, none for a WRITE besides
/// the aligned copy of a payload that did not arrive aligned.
///
/// Used on one thread (its event loop's) only.
struct NBDConnectionCore {
    /// What the owner is to do next (see `nextStep`).
    enum Step {
        /// A handshake message, for the owner's `NBDHandshake`.
        case handshake(NBDServerParser.Message)
        /// Start this READ, after `delay` when the rate limit says to wait; its outcome
        /// goes to `finishRead`.
        case read(ReadRequest, delay: TimeAmount?)
        /// Run this operation off the loop (`perform`), after `delay` when the rate limit
        /// says to wait; its reply goes to `finishBlocking`.
        case blocking(NBDBlockingOperation, cookie: UInt64, delay: TimeAmount?)
        /// The input broke the protocol: close without answering.
        case protocolError(String)
    }

    /// A READ that was admitted and counted as in flight.
    struct ReadRequest {
        var cookie: UInt64
        var offset: UInt64
        var length: UInt32
        var dontFragment: Bool
        var structured: Bool
    }

    /// A READ whose buffer is allocated: `target` is where the export puts the data, and
    /// the reply is built around it (`finishRead`). The memory stays valid while this
    /// value (its `data`) is alive.
    struct PendingRead {
        var request: ReadRequest
        var data: ByteBuffer
        var target: UnsafeMutableRawBufferPointer
        /// The bytes right before the data, where the reply's header is put.
        var headroom: UnsafeMutableRawBufferPointer

        init(_ request: ReadRequest, allocator: ByteBufferAllocator) {
            self.request = request
            (data, target, headroom) = NBDConnectionCore.makeReadBuffer(length: Int(request.length), allocator: allocator)
        }
    }

    private(set) var parser = NBDServerParser()
    private(set) var state: NBDConnectionState
    /// Set when the handshake ends in transmission.
    private(set) var session: NBDSession?
    private var rateLimit: NBDRateLimit?
    private var input = UnparsedInput()
    /// A large WRITE whose payload is still arriving: its bytes are copied once,
    /// straight into a 4 KiB-aligned buffer of their own, instead of accumulating in
    /// `input` (where every read would append and the buffer would regrow).
    private var assembly: (header: NBDRequestHeader, payload: ByteBuffer, remaining: Int)?
    /// WRITEs parsed in the current pass: they leave together (`takeGatheredWrites`).
    private var gatheredWrites: [GatheredWrite] = []
    private var replies = ReplyQueue()
    /// Where a read's reply header is encoded before it is copied in front of the data
    /// (see `writeReadData`); never handed out, so reused in place.
    private var readHeader = ByteBuffer()
    let allocator: ByteBufferAllocator

    /// WRITE payloads at least this large are assembled that way.
    static let assembledPayloadMinimum = 16384

    init(maxInFlight: Int, maxInFlightBytes: Int, allocator: ByteBufferAllocator) {
        state = NBDConnectionState(maxInFlight: maxInFlight, maxInFlightBytes: maxInFlightBytes)
        self.allocator = allocator
    }

    // MARK: Connection state

    var isOpen: Bool { state.isOpen }
    var isInTransmission: Bool { state.isInTransmission }

    /// Whether bytes wait that were received and not used (a WRITE being assembled
    /// included).
    var hasUnparsedInput: Bool { input.bytes.readableBytes > 0 || assembly != nil }

    /// The handshake ended: requests for `session` may come, drawing from `rateLimit`.
    mutating func enterTransmission(session: NBDSession, rateLimit: NBDRateLimit?) {
        self.session = session
        self.rateLimit = rateLimit
        parser.enterTransmission()
        state.enterTransmission()
    }

    /// For a hand-off to another transport during the handshake: the bytes received
    /// and not parsed (the first requests, when the client pipelined them); the core
    /// keeps none.
    mutating func takeUnparsedInput() -> ByteBuffer {
        let bytes = input.bytes
        input.release()
        return bytes
    }

    /// The connection closes (for whatever reason): nothing more is parsed or answered.
    mutating func closed() { state.closed() }

    /// The owner wants to read from the socket: `.read` when it may now.
    mutating func readRequested() -> NBDConnectionState.Actions { state.readRequested() }

    mutating func writabilityChanged(_ isWritable: Bool) -> NBDConnectionState.Actions {
        state.writabilityChanged(isWritable)
    }

    mutating func shutdownRequested() -> NBDConnectionState.Actions { state.shutdownRequested() }

    /// The client shut down its sending side; see `NBDConnectionState.inputEnded`.
    mutating func inputEnded() -> NBDConnectionState.Actions { state.inputEnded() }

    /// Whether a parsing pass has anything to do: input waits, or the input ended and
    /// the pass's end decides whether the connection is done.
    var passIsUseful: Bool { input.bytes.readableBytes > 0 || state.inputHasEnded }

    // MARK: Input

    /// Takes bytes the socket gave. Returns true when the owner should run a parsing
    /// pass (`nextStep` until nil, then `endPass`); false when they all went into a
    /// WRITE still being assembled, or the connection is closed.
    mutating func receive(_ bytes: inout ByteBuffer) -> Bool {
        guard state.isOpen else { return false }
        input.lastReadSize = bytes.readableBytes
        if assembly != nil {
            let completed = continueAssembly(with: &bytes)
            if bytes.readableBytes == 0 { return completed }
        }
        input.receive(&bytes)
        return true
    }

    /// The next thing the owner must do with the input, or nil when nothing more can be
    /// parsed now (then the pass is over: `endPass`). WRITEs, errors and NBD_CMD_DISC are
    /// handled here and return no step. Handshake messages are taken only while
    /// `handshakeAcceptsMessages`.
    mutating func nextStep(handshakeAcceptsMessages: Bool) -> Step? {
        while state.mayParse {
            let inTransmission = parser.phase == .transmission
            // While the export catalog is asked, later options wait their turn.
            if !inTransmission && !handshakeAcceptsMessages { break }
            if inTransmission && startAssembly() { break }
            let message: NBDServerParser.Message?
            do {
                message = try parser.next(&input.bytes)
            } catch {
                return .protocolError("\(error)")
            }
            guard let message else { break }
            guard inTransmission else { return .handshake(message) }
            if let step = handleTransmission(message) { return step }
        }
        input.keepTail(allocator: allocator)
        return nil
    }

    /// After a pass: a draining connection with nothing running asks to close.
    mutating func endPass() -> NBDConnectionState.Actions { state.inputProcessed() }

    /// The WRITEs gathered in this pass, to go off the loop (or to the loop's disk queue)
    /// as one batch, and how long the rate limit makes the batch wait (its slowest
    /// member's turn); nil when there are none.
    mutating func takeGatheredWrites() -> (writes: [GatheredWrite], delay: TimeAmount?)? {
        guard !gatheredWrites.isEmpty else { return nil }
        // Handed over whole: the next pass starts a new array (keeping capacity here
        // would copy, since the batch still shares the storage).
        let writes = gatheredWrites
        gatheredWrites = []
        guard let rateLimit else { return (writes, nil) }
        let wait = writes.map { rateLimit.reserve(bytes: $0.payload.readableBytes) }.max() ?? .zero
        return (writes, wait > .zero ? wait : nil)
    }

    /// Starts assembling when `input` begins with a large WRITE whose payload has not
    /// all arrived. Returns true when it did (the rest comes through `continueAssembly`).
    private mutating func startAssembly() -> Bool {
        guard assembly == nil, let header = try? input.bytes.peekNBDRequestHeader(), header.command == .write else { return false }
        let length = Int(header.length)
        guard length >= Self.assembledPayloadMinimum, length <= NBDLimits.maxPayload,
            input.bytes.readableBytes < NBDRequestHeader.size + length
        else { return false }
        input.bytes.moveReaderIndex(forwardBy: NBDRequestHeader.size)
        var payload = Self.makeAlignedBuffer(capacity: length, allocator: allocator)
        let arrived = input.bytes.readableBytes
        payload.writeBuffer(&input.bytes)
        input.release()
        assembly = (header, payload, length - arrived)
        return true
    }

    /// Moves the awaited payload bytes out of `bytes`; once complete, takes the WRITE in
    /// and returns true (what is left in `bytes` is the caller's).
    private mutating func continueAssembly(with bytes: inout ByteBuffer) -> Bool {
        // Taken out, so that the payload's storage has one owner and appends in place.
        guard var current = assembly.take() else { return false }
        var chunk = bytes.readSlice(length: min(current.remaining, bytes.readableBytes))!
        current.remaining -= chunk.readableBytes
        current.payload.writeBuffer(&chunk)
        guard current.remaining == 0 else {
            assembly = current
            return false
        }
        let step = handleTransmission(.request(NBDRequest(header: current.header, payload: current.payload)))
        if step != nil { assertionFailure("an assembled WRITE is gathered or answered, never a step") }
        return true
    }

    // MARK: Requests

    private mutating func handleTransmission(_ message: NBDServerParser.Message) -> Step? {
        guard let session else { return .protocolError("a request arrived before the session was set") }
        let header: NBDRequestHeader
        var payload: ByteBuffer?
        switch message {
        case .request(let request):
            header = request.header
            payload = request.payload
        case .oversizedWrite(let oversized):
            reply(error: .invalid, "WRITE of \(oversized.length) bytes exceeds the 32 MiB maximum", cookie: oversized.cookie)
            return nil
        case .clientFlags, .option, .oversizedOption:
            return .protocolError("a handshake message arrived in transmission")
        }
        switch state.admit() {
        case .drop:
            return nil
        case .refuseShuttingDown:
            if header.command != .disconnect {
                reply(error: .shutdown, "server is shutting down", cookie: header.cookie)
            }
            return nil
        case .run:
            break
        }
        switch NBDRequestValidator.validate(header, session: session) {
        case .reject(let error, let message):
            reply(error: error, message, cookie: header.cookie)
            return nil
        case .execute(.disconnect):
            state.disconnectRequested()
            return nil
        case .execute(.write(let offset, let fua)):
            let aligned = Self.alignedPayload(payload.take() ?? ByteBuffer(), allocator: allocator)
            state.requestStarted(bytes: aligned.readableBytes)
            gatheredWrites.append(GatheredWrite(cookie: header.cookie, offset: offset, fua: fua, payload: aligned))
            return nil
        case .execute(.read(let offset, let length, let dontFragment)):
            state.requestStarted(bytes: Int(length))
            let read = ReadRequest(
                cookie: header.cookie, offset: offset, length: length, dontFragment: dontFragment,
                structured: session.structuredReplies)
            return .read(read, delay: rateLimitWait(bytes: Int(length)))
        case .execute(.blocking(let operation)):
            state.requestStarted(bytes: 0)
            return .blocking(operation, cookie: header.cookie, delay: rateLimitWait(bytes: operation.limitedBytes))
        }
    }

    /// How long the export's rate limit makes a request of `bytes` wait, having
    /// reserved them; nil when it may start now. The request counts as in flight
    /// meanwhile, so a throttled client also stops being read once it has `maxInFlight`
    /// waiting.
    private func rateLimitWait(bytes: Int) -> TimeAmount? {
        guard let rateLimit else { return nil }
        let wait = rateLimit.reserve(bytes: bytes)
        return wait > .zero ? wait : nil
    }

    // MARK: Outcomes

    // Each reply is written before its request stops counting: the last request a
    // draining connection (NBD_CMD_DISC) waits for closes it, and its reply still goes
    // out with the close's flush.

    /// A READ finished: its reply (data or error) is written while the connection is
    /// open, and its bytes stop counting.
    mutating func finishRead(_ read: PendingRead, _ result: Result<[NBDExtent], NBDExportError>) -> NBDConnectionState.Actions {
        if state.isOpen {
            switch result {
            case .success(let extents):
                writeReadData(read, extents: extents)
            case .failure(let error):
                NBDReplyEncoder.error(
                    error.code, message: error.message, cookie: read.request.cookie, structured: read.request.structured,
                    into: &replies.batch.bytes)
            }
        }
        return state.requestFinished(bytes: read.data.readableBytes)
    }

    /// A READ never ran: the thread pool refused it (the server is going away).
    mutating func finishRead(_ read: PendingRead, refusedWith error: Error) -> NBDConnectionState.Actions {
        if state.isOpen { refuseShutDownPool(error, cookie: read.request.cookie) }
        return state.requestFinished(bytes: read.data.readableBytes)
    }

    /// A WRITE that ran on the loop's disk queue finished.
    mutating func finishWrite(_ write: GatheredWrite, _ error: NBDExportError?) -> NBDConnectionState.Actions {
        if state.isOpen { writeReply(cookie: write.cookie, error) }
        return state.requestFinished(bytes: write.payload.readableBytes)
    }

    /// The WRITEs of one off-loop batch finished, each with its outcome, or the thread
    /// pool refused them.
    mutating func finishWrites(_ writes: [GatheredWrite], _ result: Result<[NBDExportError?], Error>) -> NBDConnectionState.Actions {
        var actions: NBDConnectionState.Actions = []
        for (i, write) in writes.enumerated() {
            if state.isOpen {
                switch result {
                case .success(let outcomes):
                    writeReply(cookie: write.cookie, outcomes[i])
                case .failure(let error):
                    refuseShutDownPool(error, cookie: write.cookie)
                }
            }
            actions.formUnion(state.requestFinished(bytes: write.payload.readableBytes))
        }
        return actions
    }

    /// A blocking operation finished with the reply `perform` built, or the thread pool
    /// refused it.
    mutating func finishBlocking(cookie: UInt64, _ result: Result<ByteBuffer, Error>) -> NBDConnectionState.Actions {
        if state.isOpen {
            switch result {
            case .success(let reply):
                // Copied into the batch, or, when large (BLOCK_STATUS with many
                // descriptors), sent after it as it is.
                if reply.readableBytes <= ReplyBatch.largestBatched {
                    var reply = reply
                    replies.batch.bytes.writeBuffer(&reply)
                } else {
                    replies.append(afterBatch: reply)
                }
            case .failure(let error):
                refuseShutDownPool(error, cookie: cookie)
            }
        }
        return state.requestFinished(bytes: 0)
    }

    // MARK: Replies

    /// Hands every reply written since the last call to `write`, in order, as few
    /// buffers as possible. After the owner has flushed them, `repliesFlushed`.
    mutating func takeReplies(_ write: (ByteBuffer) -> Void) { replies.take(write) }

    /// The owner flushed what `takeReplies` gave: the batch's memory may be reused.
    mutating func repliesFlushed() { replies.batch.rewind() }

    /// Appends (without flushing) a WRITE's reply: done, or its error.
    private mutating func writeReply(cookie: UInt64, _ error: NBDExportError?) {
        if let error {
            NBDReplyEncoder.error(
                error.code, message: error.message, cookie: cookie, structured: session?.structuredReplies ?? false,
                into: &replies.batch.bytes)
        } else {
            NBDReplyEncoder.done(cookie: cookie, into: &replies.batch.bytes)
        }
    }

    private mutating func reply(error: NBDError, _ message: String, cookie: UInt64) {
        NBDReplyEncoder.error(
            error, message: message, cookie: cookie, structured: session?.structuredReplies ?? false,
            into: &replies.batch.bytes)
    }

    /// The reply when the thread pool refused the work: the server is going away.
    private mutating func refuseShutDownPool(_ error: Error, cookie: UInt64) {
        reply(error: .shutdown, "server is shutting down (\(error))", cookie: cookie)
    }

    /// Writes a successful read's reply. The usual one, a header and the data as they
    /// are, leaves as one buffer: the header is copied into the room left in front of
    /// the data (`makeReadBuffer`), so the read costs one buffer handed out and no
    /// other. A reply the encoder builds whole (structured, with holes) goes into the
    /// batch instead.
    private mutating func writeReadData(_ read: PendingRead, extents: [NBDExtent]) {
        readHeader.clear()
        let request = read.request
        let follows = NBDReplyEncoder.read(
            cookie: request.cookie, offset: request.offset, data: read.data, extents: extents,
            structured: request.structured, dontFragment: request.dontFragment, into: &readHeader)
        let length = readHeader.readableBytes
        let headroom = read.headroom
        guard let follows, length <= headroom.count, follows.readerIndex == read.data.readerIndex,
            follows.readerIndex >= length
        else {
            replies.batch.bytes.writeBuffer(&readHeader)
            if let follows { replies.append(afterBatch: follows) }
            return
        }
        // The room is this reply's own memory (no other copy of the buffer reads it).
        readHeader.withUnsafeReadableBytes { header in
            UnsafeMutableRawBufferPointer(rebasing: headroom[(headroom.count - length)...]).copyMemory(from: header)
        }
        var reply = follows
        reply.moveReaderIndex(to: reply.readerIndex - length)
        replies.append(afterBatch: reply)
    }

    // MARK: Buffers

    /// An empty buffer whose reader and writer index sit on a 4 KiB-aligned address,
    /// with room for `capacity` bytes from there: O_DIRECT can use it without bouncing.
    /// At least `headroom` bytes come before that address, inside the buffer.
    static func makeAlignedBuffer(capacity: Int, headroom: Int = 0, allocator: ByteBufferAllocator) -> ByteBuffer {
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
    static func alignedPayload(_ payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
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
    static func makeReadBuffer(
        length: Int, allocator: ByteBufferAllocator
    ) -> (ByteBuffer, target: UnsafeMutableRawBufferPointer, headroom: UnsafeMutableRawBufferPointer) {
        var data = makeAlignedBuffer(capacity: length, headroom: readHeaderRoom, allocator: allocator)
        // The data's bytes count as written (the read fills them); the buffer has room.
        data.moveWriterIndex(forwardBy: length)
        // Taken last, from the storage the data lives in (nothing reallocates it after).
        let start = data.readerIndex
        let (target, headroom) = data.withVeryUnsafeMutableBytes { storage in
            (
                UnsafeMutableRawBufferPointer(rebasing: storage[start..<(start + length)]),
                UnsafeMutableRawBufferPointer(rebasing: storage[(start - readHeaderRoom)..<start])
            )
        }
        return (data, target, headroom)
    }

    /// Room for the longest header that goes in front of read data: a structured
    /// OFFSET_DATA chunk's (20 bytes of chunk header and the 8-byte offset).
    static let readHeaderRoom = 32

    // MARK: Off-loop operations

    /// Runs one blocking operation (on a thread that may block) and builds its reply.
    /// Never throws: failures become error replies.
    static func perform(
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
    mutating func take() -> Wrapped? {
        defer { self = nil }
        return self
    }
}
