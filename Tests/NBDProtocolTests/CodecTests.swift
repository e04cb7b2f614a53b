import NBDProtocol
import NBDServer
import NIOCore
import Testing

func bytes(_ s: String) -> ByteBuffer { ByteBuffer(string: s) }

/// Feeds `stream` to a parser one byte at a time and collects the messages.
func parseByteByByte(_ stream: ByteBuffer, transmissionAfter: Int? = nil) throws -> [NBDServerParser.Message] {
    var parser = NBDServerParser()
    var pending = ByteBuffer()
    var messages: [NBDServerParser.Message] = []
    for byte in stream.readableBytesView {
        pending.writeInteger(byte)
        while let message = try parser.next(&pending) {
            messages.append(message)
            if let after = transmissionAfter, messages.count == after { parser.enterTransmission() }
        }
    }
    #expect(pending.readableBytes == 0)
    return messages
}

/// Feeds the whole stream at once.
func parseAtOnce(_ stream: ByteBuffer, transmissionAfter: Int? = nil) throws -> [NBDServerParser.Message] {
    var parser = NBDServerParser()
    var pending = stream
    var messages: [NBDServerParser.Message] = []
    while let message = try parser.next(&pending) {
        messages.append(message)
        if let after = transmissionAfter, messages.count == after { parser.enterTransmission() }
    }
    return messages
}

@Suite struct CodecRoundTripTests {
    @Test func greetingRoundTrips() throws {
        var buffer = NBDHandshake.greeting()
        #expect(buffer.readableBytes == 18)
        #expect(try buffer.readNBDGreeting() == [.fixedNewstyle, .noZeroes])
        var partial = NBDHandshake.greeting()
        partial.moveWriterIndex(to: 17)
        #expect(try partial.readNBDGreeting() == nil)
    }

    @Test func optionRepliesRoundTrip() throws {
        let replies = [
            NBDOptionReply(option: .go, type: .ack),
            NBDOptionReply(option: .list, type: .server, payload: bytes("\0\0\0\u{4}disk thin volume")),
            NBDOptionReply(option: .info, type: .info, payload: bytes("xyz")),
            NBDOptionReply(option: NBDOption(rawValue: 12345), type: .errUnsupported, payload: bytes("nope")),
        ]
        var buffer = ByteBuffer()
        for r in replies { buffer.writeNBDOptionReply(r) }
        var decoded: [NBDOptionReply] = []
        // One byte at a time: nothing is consumed until a whole reply is there.
        var pending = ByteBuffer()
        for byte in buffer.readableBytesView {
            pending.writeInteger(byte)
            while let r = try pending.readNBDOptionReply() { decoded.append(r) }
        }
        #expect(decoded == replies)
    }

    @Test func exportNameReplyRoundTrips() {
        for padded in [true, false] {
            var buffer = ByteBuffer()
            let reply = NBDExportNameReply(size: 1 << 40, flags: [.hasFlags, .readOnly, .canMultiConn], padded: padded)
            buffer.writeNBDExportNameReply(reply)
            #expect(buffer.readableBytes == (padded ? 134 : 10))
            #expect(buffer.readNBDExportNameReply(padded: padded) == reply)
        }
    }

    @Test func exportQueryAndMetaContextQueryRoundTrip() throws {
        let query = NBDExportQuery(name: "vol@snap", infoRequests: [.name, .blockSize, .description])
        var buffer = ByteBuffer()
        buffer.writeNBDExportQuery(query)
        #expect(try buffer.readNBDExportQuery() == query)
        let meta = NBDMetaContextQuery(exportName: "disk", queries: ["base:allocation", "qemu:dirty-bitmap:x"])
        buffer.clear()
        buffer.writeNBDMetaContextQuery(meta)
        #expect(try buffer.readNBDMetaContextQuery() == meta)
    }

    @Test func malformedQueriesAreRejected() {
        var truncated = ByteBuffer()
        truncated.writeInteger(UInt32(100))
        truncated.writeString("short")
        #expect(throws: NBDDecodingError.self) { try truncated.readNBDExportQuery() }
        var countMismatch = ByteBuffer()
        countMismatch.writeNBDExportQuery(NBDExportQuery(name: "a", infoRequests: [.name]))
        countMismatch.writeInteger(UInt16(9))
        #expect(throws: NBDDecodingError.self) { try countMismatch.readNBDExportQuery() }
        var nul = ByteBuffer()
        nul.writeInteger(UInt32(3))
        nul.writeBytes([0x61, 0, 0x62])
        nul.writeInteger(UInt16(0))
        #expect(throws: NBDDecodingError.self) { try nul.readNBDExportQuery() }
        var badQuery = ByteBuffer()
        badQuery.writeInteger(UInt32(0))
        badQuery.writeInteger(UInt32(1))
        badQuery.writeInteger(UInt32(1000))
        #expect(throws: NBDDecodingError.self) { try badQuery.readNBDMetaContextQuery() }
    }

    @Test func structuredChunksRoundTripOneByteAtATime() throws {
        let chunks: [NBDStructuredChunk] = [
            NBDStructuredChunk(flags: [], cookie: 1, payload: .offsetData(offset: 4096, data: bytes("hello world"))),
            NBDStructuredChunk(flags: [], cookie: 1, payload: .offsetHole(offset: 8192, length: 65536)),
            NBDStructuredChunk(flags: .done, cookie: 1, payload: .none),
            NBDStructuredChunk(
                flags: .done, cookie: 2,
                payload: .blockStatus(contextID: 1, descriptors: [BlockStatusDescriptor(length: 4096, flags: 3), BlockStatusDescriptor(length: 512, flags: 0)])),
            NBDStructuredChunk(flags: .done, cookie: 3, payload: .error(.noSpace, message: "pool is full")),
            NBDStructuredChunk(flags: .done, cookie: 4, payload: .errorOffset(.io, message: "bad sector", offset: 777)),
            NBDStructuredChunk(flags: .done, cookie: 5, payload: .unknown(type: NBDReplyType(rawValue: 99), bytes: bytes("??"))),
        ]
        var buffer = ByteBuffer()
        for c in chunks { buffer.writeNBDStructuredChunk(c) }
        var decoded: [NBDStructuredChunk] = []
        var pending = ByteBuffer()
        for byte in buffer.readableBytesView {
            pending.writeInteger(byte)
            while let c = try pending.readNBDStructuredChunk() { decoded.append(c) }
        }
        #expect(decoded == chunks)
    }

    @Test func simpleReplyRoundTrips() throws {
        var buffer = ByteBuffer()
        buffer.writeNBDSimpleReply(NBDSimpleReplyHeader(error: .permission, cookie: 0xDEAD_BEEF))
        #expect(try buffer.readNBDSimpleReplyHeader() == NBDSimpleReplyHeader(error: .permission, cookie: 0xDEAD_BEEF))
    }
}

@Suite struct ServerParserTests {
    /// A whole client session: flags, options, then requests including a write payload.
    func sessionStream() -> (ByteBuffer, [NBDServerParser.Message]) {
        var stream = ByteBuffer()
        var expected: [NBDServerParser.Message] = []
        stream.writeNBDClientFlags([.fixedNewstyle, .noZeroes])
        expected.append(.clientFlags([.fixedNewstyle, .noZeroes]))
        let options = [
            NBDOptionRequest(option: .structuredReply),
            NBDOptionRequest(option: .list),
            NBDOptionRequest(option: .go, payload: {
                var p = ByteBuffer()
                p.writeNBDExportQuery(NBDExportQuery(name: "disk", infoRequests: [.blockSize]))
                return p
            }()),
        ]
        for o in options {
            stream.writeNBDOptionRequest(o)
            expected.append(.option(o))
        }
        let requests = [
            NBDRequest(header: NBDRequestHeader(command: .read, cookie: 1, offset: 0, length: 4096)),
            NBDRequest(header: NBDRequestHeader(flags: .fua, command: .write, cookie: 2, offset: 512, length: 5), payload: bytes("abcde")),
            NBDRequest(header: NBDRequestHeader(command: .write, cookie: 3, offset: 0, length: 0), payload: ByteBuffer()),
            NBDRequest(header: NBDRequestHeader(command: .flush, cookie: 4, offset: 0, length: 0)),
            NBDRequest(header: NBDRequestHeader(flags: .requestOne, command: .blockStatus, cookie: 5, offset: 0, length: 1 << 30)),
            NBDRequest(header: NBDRequestHeader(command: .disconnect, cookie: 6, offset: 0, length: 0)),
        ]
        for r in requests {
            stream.writeNBDRequest(r)
            expected.append(.request(r))
        }
        return (stream, expected)
    }

    @Test func wholeSessionParsesTheSameAtOnceAndByteByByte() throws {
        let (stream, expected) = sessionStream()
        #expect(try parseAtOnce(stream, transmissionAfter: 4) == expected)
        #expect(try parseByteByByte(stream, transmissionAfter: 4) == expected)
    }

    @Test func oversizedOptionIsSkippedAndTheStreamStaysInSync() throws {
        var stream = ByteBuffer()
        stream.writeNBDClientFlags(.fixedNewstyle)
        stream.writeNBDOptionRequest(NBDOptionRequest(option: .list, payload: ByteBuffer(repeating: 7, count: 100_000)))
        stream.writeNBDOptionRequest(NBDOptionRequest(option: .abort))
        let expected: [NBDServerParser.Message] = [
            .clientFlags(.fixedNewstyle), .oversizedOption(.list, length: 100_000), .option(NBDOptionRequest(option: .abort)),
        ]
        #expect(try parseAtOnce(stream) == expected)
        #expect(try parseByteByByte(stream) == expected)
    }

    @Test func oversizedWriteIsSkippedAndTheStreamStaysInSync() throws {
        var stream = ByteBuffer()
        stream.writeNBDClientFlags(.fixedNewstyle)
        let big = NBDRequestHeader(command: .write, cookie: 9, offset: 0, length: UInt32(40 << 20))
        stream.writeNBDRequest(NBDRequest(header: big, payload: ByteBuffer(repeating: 1, count: 40 << 20)))
        let read = NBDRequest(header: NBDRequestHeader(command: .read, cookie: 10, offset: 0, length: 1))
        stream.writeNBDRequest(read)
        #expect(try parseAtOnce(stream, transmissionAfter: 1) == [.clientFlags(.fixedNewstyle), .oversizedWrite(big), .request(read)])
    }

    @Test func excessiveLengthsAndBadMagicThrow() {
        var stream = ByteBuffer()
        stream.writeNBDClientFlags(.fixedNewstyle)
        stream.writeInteger(NBDMagic.option)
        stream.writeInteger(NBDOption.go.rawValue)
        stream.writeInteger(UInt32.max)
        #expect(throws: NBDDecodingError.self) { try parseAtOnce(stream) }
        var badMagic = ByteBuffer()
        badMagic.writeNBDClientFlags(.fixedNewstyle)
        badMagic.writeInteger(UInt64(0x1234))
        badMagic.writeRepeatingByte(0, count: 8)
        #expect(throws: NBDDecodingError.badMagic) { try parseAtOnce(badMagic) }
        var hugeWrite = ByteBuffer()
        hugeWrite.writeNBDClientFlags(.fixedNewstyle)
        hugeWrite.writeNBDRequest(NBDRequest(header: NBDRequestHeader(command: .write, cookie: 1, offset: 0, length: UInt32.max)))
        #expect(throws: NBDDecodingError.self) { try parseAtOnce(hugeWrite, transmissionAfter: 1) }
    }
}
