import NBDProtocol
import NIOCore
import Testing

@testable import NBDServer

/// `NBDConnectionCore`, the transport-free half of a connection: driven here the way a
/// transport drives it (bytes in, steps out, outcomes in, replies out), with no channel.
@Suite struct ConnectionCoreTests {
    private static let session = NBDSession(
        export: NBDExportDescription(name: "disk", size: 1 << 20, isReadOnly: false, description: ""),
        flags: [], structuredReplies: false, metaContexts: [])

    private func makeCore(maxInFlight: Int = 64, rateLimit: NBDRateLimit? = nil) -> NBDConnectionCore {
        var core = NBDConnectionCore(maxInFlight: maxInFlight, maxInFlightBytes: 64 << 20, allocator: ByteBufferAllocator())
        core.enterTransmission(session: Self.session, rateLimit: rateLimit)
        return core
    }

    private func request(_ command: NBDCommand, cookie: UInt64, offset: UInt64 = 0, length: UInt32, payload: [UInt8]? = nil) -> ByteBuffer {
        var out = ByteBuffer()
        out.writeNBDRequest(NBDRequest(
            header: NBDRequestHeader(flags: [], command: command, cookie: cookie, offset: offset, length: length),
            payload: payload.map { ByteBuffer(bytes: $0) }))
        return out
    }

    /// Feeds `bytes` in pieces of `piece` bytes, collecting the steps of every pass.
    private func feed(_ bytes: ByteBuffer, to core: inout NBDConnectionCore, piece: Int) -> [NBDConnectionCore.Step] {
        var steps: [NBDConnectionCore.Step] = []
        var rest = bytes
        while rest.readableBytes > 0 {
            var chunk = rest.readSlice(length: min(piece, rest.readableBytes))!
            guard core.receive(&chunk) else { continue }
            while let step = core.nextStep(handshakeAcceptsMessages: false) { steps.append(step) }
        }
        return steps
    }

    /// Every byte the core hands out, concatenated in order.
    private func takeReplies(_ core: inout NBDConnectionCore) -> [UInt8] {
        var out: [UInt8] = []
        core.takeReplies { out += Array($0.readableBytesView) }
        core.repliesFlushed()
        return out
    }

    private func simpleReply(cookie: UInt64, error: UInt32 = 0) -> [UInt8] {
        var out = ByteBuffer()
        out.writeInteger(NBDMagic.simpleReply)
        out.writeInteger(error)
        out.writeInteger(cookie)
        return Array(out.readableBytesView)
    }

    @Test(arguments: [1, 7, 4096, 1 << 20])
    func requestsCutAnywhereComeOutWhole(piece: Int) throws {
        var core = makeCore()
        let small = [UInt8](repeating: 0xAB, count: 4096)
        let large = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        var stream = request(.read, cookie: 1, offset: 8192, length: 4096)
        stream.writeImmutableBuffer(request(.write, cookie: 2, offset: 0, length: 4096, payload: small))
        stream.writeImmutableBuffer(request(.write, cookie: 3, offset: 65536, length: 65536, payload: large))
        stream.writeImmutableBuffer(request(.flush, cookie: 4, length: 0))
        var steps = feed(stream, to: &core, piece: piece)
        var writes: [GatheredWrite] = []
        // Gathered writes are taken at the end of each pass; collect what is left.
        if let (taken, delay) = core.takeGatheredWrites() {
            #expect(delay == nil)
            writes += taken
        }
        steps = steps.filter { if case .handshake = $0 { return false } else { return true } }
        #expect(steps.count == 2)
        guard case .read(let read, nil) = steps.first else {
            Issue.record("expected a READ first, got \(String(describing: steps.first))")
            return
        }
        #expect(read.cookie == 1 && read.offset == 8192 && read.length == 4096 && !read.structured)
        guard case .blocking(.flush, 4, nil) = steps.last else {
            Issue.record("expected the FLUSH last, got \(String(describing: steps.last))")
            return
        }
        #expect(writes.map(\.cookie) == [2, 3])
        #expect(Array(writes[0].payload.readableBytesView) == small)
        #expect(Array(writes[1].payload.readableBytesView) == large)
        for write in writes {
            let address = write.payload.withUnsafeReadableBytes { Int(bitPattern: $0.baseAddress) }
            #expect(address % 4096 == 0, "WRITE \(write.cookie)'s payload is not 4 KiB-aligned")
        }
        #expect(core.state.inFlight == 4)
    }

    @Test func repliesLeaveInTheOrderTheyWereWritten() {
        var core = makeCore()
        var stream = request(.write, cookie: 10, length: 4, payload: [1, 2, 3, 4])
        stream.writeImmutableBuffer(request(.read, cookie: 11, length: 8))
        stream.writeImmutableBuffer(request(.write, cookie: 12, length: 2, payload: [5, 5]))
        let steps = feed(stream, to: &core, piece: 1 << 20)
        guard case .read(let request, _) = steps.first, let (writes, _) = core.takeGatheredWrites() else {
            Issue.record("expected a READ and a WRITE")
            return
        }
        // The WRITE finishes first, then the READ with its data.
        _ = core.finishWrite(writes[0], nil)
        let read = NBDConnectionCore.PendingRead(request, allocator: ByteBufferAllocator())
        read.target.copyBytes(from: [9, 8, 7, 6, 5, 4, 3, 2])
        _ = core.finishRead(read, .success([NBDExtent(offset: 0, length: 8, isHole: false)]))
        // A failed WRITE's error after both.
        _ = core.finishWrite(writes[1], NBDExportError(.io, "disk on fire"))
        let out = takeReplies(&core)
        let expected =
            simpleReply(cookie: 10) + simpleReply(cookie: 11) + [9, 8, 7, 6, 5, 4, 3, 2]
            + simpleReply(cookie: 12, error: NBDError.io.rawValue)
        #expect(out == expected)
        #expect(takeReplies(&core).isEmpty, "a reply is handed out once")
    }

    @Test func backPressureStopsParsingUntilARequestFinishes() {
        var core = makeCore(maxInFlight: 2)
        var stream = ByteBuffer()
        for cookie in 1...3 { stream.writeImmutableBuffer(request(.read, cookie: UInt64(cookie), length: 512)) }
        let steps = feed(stream, to: &core, piece: 1 << 20)
        #expect(steps.count == 2, "the third READ waits for room")
        guard case .read(let first, _) = steps.first else { return }
        let actions = core.finishRead(
            NBDConnectionCore.PendingRead(first, allocator: ByteBufferAllocator()), .success([NBDExtent(offset: 0, length: 512, isHole: false)]))
        #expect(actions.contains(.parse))
        guard case .read(let third, _) = core.nextStep(handshakeAcceptsMessages: false) else {
            Issue.record("the third READ did not come once there was room")
            return
        }
        #expect(third.cookie == 3)
    }

    @Test func disconnectClosesOnceTheRunningRequestsAreAnswered() {
        var core = makeCore()
        var stream = request(.read, cookie: 1, length: 512)
        stream.writeImmutableBuffer(request(.disconnect, cookie: 2, length: 0))
        stream.writeImmutableBuffer(request(.read, cookie: 3, length: 512))
        let steps = feed(stream, to: &core, piece: 1 << 20)
        #expect(steps.count == 1, "nothing after NBD_CMD_DISC runs")
        #expect(core.endPass().isEmpty, "a READ is still running")
        guard case .read(let read, _) = steps.first else { return }
        let actions = core.finishRead(
            NBDConnectionCore.PendingRead(read, allocator: ByteBufferAllocator()), .success([NBDExtent(offset: 0, length: 512, isHole: false)]))
        #expect(actions.contains(.close))
        #expect(takeReplies(&core).count == 16 + 512, "the READ was still answered")
    }

    @Test func aClosedConnectionAnswersNothing() {
        var core = makeCore()
        let steps = feed(request(.read, cookie: 1, length: 512), to: &core, piece: 1 << 20)
        guard case .read(let read, _) = steps.first else { return }
        core.closed()
        _ = core.finishRead(NBDConnectionCore.PendingRead(read, allocator: ByteBufferAllocator()), .failure(NBDExportError(.io, "x")))
        #expect(takeReplies(&core).isEmpty)
        #expect(core.state.inFlight == 0)
    }

    @Test func badMagicIsAProtocolError() {
        var core = makeCore()
        var junk = ByteBuffer(repeating: 0x42, count: 28)
        let parse = core.receive(&junk)
        #expect(parse)
        guard case .protocolError = core.nextStep(handshakeAcceptsMessages: false) else {
            Issue.record("bad magic was not refused")
            return
        }
    }

    @Test func invalidRequestsAreAnsweredWithoutAStep() {
        var core = makeCore()
        let steps = feed(request(.read, cookie: 5, offset: 1 << 20, length: 512), to: &core, piece: 1 << 20)
        #expect(steps.isEmpty)
        #expect(takeReplies(&core) == simpleReply(cookie: 5, error: NBDError.invalid.rawValue))
        #expect(core.state.inFlight == 0)
    }

    @Test func aRateLimitDelaysTheRequestsPastItsBurst() {
        let limit = NBDRateLimit(.init(operationsPerSecond: 10))
        var core = makeCore(rateLimit: limit)
        var stream = request(.read, cookie: 1, length: 512)
        stream.writeImmutableBuffer(request(.read, cookie: 2, length: 512))
        let steps = feed(stream, to: &core, piece: 1 << 20)
        guard steps.count == 2, case .read(_, let first) = steps[0], case .read(_, let second) = steps[1] else {
            Issue.record("expected two READs, got \(steps)")
            return
        }
        // The burst is one operation: the first runs now, the second waits its turn.
        #expect(first == nil)
        #expect(second.map { $0 > .milliseconds(50) } == true)
    }

    @Test func aHalfClosedClientGetsItsRepliesThenTheConnectionCloses() {
        var core = makeCore()
        var stream = request(.read, cookie: 1, length: 512)
        // A request cut short by the end of the input: never run, never answered.
        stream.writeBytes(request(.read, cookie: 2, length: 512).readableBytesView.prefix(10))
        let steps = feed(stream, to: &core, piece: 1 << 20)
        #expect(core.endPass().isEmpty)
        let actions = core.inputEnded()
        #expect(actions == [.parse] && core.passIsUseful)
        #expect(core.nextStep(handshakeAcceptsMessages: false) == nil)
        #expect(core.endPass().isEmpty, "the READ is still running")
        guard case .read(let read, _) = steps.first else {
            Issue.record("expected the READ")
            return
        }
        let finished = core.finishRead(
            NBDConnectionCore.PendingRead(read, allocator: ByteBufferAllocator()), .success([NBDExtent(offset: 0, length: 512, isHole: false)]))
        #expect(finished.contains(.parse) && core.passIsUseful)
        #expect(core.nextStep(handshakeAcceptsMessages: false) == nil)
        #expect(core.endPass() == [.close])
        #expect(takeReplies(&core).count == 16 + 512, "the READ was answered")
    }
}
