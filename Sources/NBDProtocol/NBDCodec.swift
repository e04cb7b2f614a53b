import NIOCore

/// Encoders and decoders for every NBD message, as ByteBuffer extensions. Decoders read
/// a whole message or nothing: on incomplete input they return nil and leave the reader
/// index unchanged. No I/O happens here.
extension ByteBuffer {
    // MARK: Handshake, server side

    /// The greeting: NBDMAGIC, IHAVEOPT, handshake flags.
    public mutating func writeNBDGreeting(flags: NBDHandshakeFlags) {
        writeInteger(NBDMagic.greeting)
        writeInteger(NBDMagic.option)
        writeInteger(flags.rawValue)
    }

    public mutating func readNBDGreeting() throws(NBDDecodingError) -> NBDHandshakeFlags? {
        guard readableBytes >= 18 else { return nil }
        let magic = getInteger(at: readerIndex, as: UInt64.self)!
        let option = getInteger(at: readerIndex + 8, as: UInt64.self)!
        guard magic == NBDMagic.greeting, option == NBDMagic.option else { throw .badMagic }
        moveReaderIndex(forwardBy: 16)
        return NBDHandshakeFlags(rawValue: readInteger(as: UInt16.self)!)
    }

    public mutating func writeNBDClientFlags(_ flags: NBDClientFlags) {
        writeInteger(flags.rawValue)
    }

    public mutating func readNBDClientFlags() -> NBDClientFlags? {
        readInteger(as: UInt32.self).map(NBDClientFlags.init(rawValue:))
    }

    // MARK: Options

    public mutating func writeNBDOptionRequest(_ request: NBDOptionRequest) {
        writeInteger(NBDMagic.option)
        writeInteger(request.option.rawValue)
        writeInteger(UInt32(request.payload.readableBytes))
        writeImmutableBuffer(request.payload)
    }

    /// The 16-byte option header: option and payload length.
    public func peekNBDOptionHeader() throws(NBDDecodingError) -> (option: NBDOption, length: UInt32)? {
        guard readableBytes >= 16 else { return nil }
        guard getInteger(at: readerIndex, as: UInt64.self)! == NBDMagic.option else { throw .badMagic }
        return (NBDOption(rawValue: getInteger(at: readerIndex + 8, as: UInt32.self)!), getInteger(at: readerIndex + 12, as: UInt32.self)!)
    }

    public mutating func readNBDOptionRequest() throws(NBDDecodingError) -> NBDOptionRequest? {
        guard let (option, length) = try peekNBDOptionHeader(), readableBytes >= 16 + Int(length) else { return nil }
        moveReaderIndex(forwardBy: 16)
        return NBDOptionRequest(option: option, payload: readSlice(length: Int(length))!)
    }

    public mutating func writeNBDOptionReply(_ reply: NBDOptionReply) {
        writeInteger(NBDMagic.optionReply)
        writeInteger(reply.option.rawValue)
        writeInteger(reply.type.rawValue)
        writeInteger(UInt32(reply.payload.readableBytes))
        writeImmutableBuffer(reply.payload)
    }

    public mutating func readNBDOptionReply() throws(NBDDecodingError) -> NBDOptionReply? {
        guard readableBytes >= 20 else { return nil }
        guard getInteger(at: readerIndex, as: UInt64.self)! == NBDMagic.optionReply else { throw .badMagic }
        let length = Int(getInteger(at: readerIndex + 16, as: UInt32.self)!)
        guard readableBytes >= 20 + length else { return nil }
        moveReaderIndex(forwardBy: 8)
        let option = NBDOption(rawValue: readInteger(as: UInt32.self)!)
        let type = NBDOptionReplyType(rawValue: readInteger(as: UInt32.self)!)
        moveReaderIndex(forwardBy: 4)
        return NBDOptionReply(option: option, type: type, payload: readSlice(length: length)!)
    }

    public mutating func writeNBDExportNameReply(_ reply: NBDExportNameReply) {
        writeInteger(reply.size)
        writeInteger(reply.flags.rawValue)
        if reply.padded { writeRepeatingByte(0, count: 124) }
    }

    public mutating func readNBDExportNameReply(padded: Bool) -> NBDExportNameReply? {
        guard readableBytes >= (padded ? 134 : 10) else { return nil }
        let size = readInteger(as: UInt64.self)!
        let flags = NBDTransmissionFlags(rawValue: readInteger(as: UInt16.self)!)
        if padded { moveReaderIndex(forwardBy: 124) }
        return NBDExportNameReply(size: size, flags: flags, padded: padded)
    }

    // MARK: Option payloads

    public mutating func writeNBDExportQuery(_ query: NBDExportQuery) {
        let name = Array(query.name.utf8)
        writeInteger(UInt32(name.count))
        writeBytes(name)
        writeInteger(UInt16(query.infoRequests.count))
        for info in query.infoRequests { writeInteger(info.rawValue) }
    }

    /// Parses a whole NBD_OPT_INFO/GO payload; throws when it is malformed.
    public mutating func readNBDExportQuery() throws(NBDDecodingError) -> NBDExportQuery {
        guard let nameLength = readInteger(as: UInt32.self), Int(nameLength) <= readableBytes - 2 else {
            throw .malformed("export name length exceeds the option")
        }
        let name = try readNBDString(length: Int(nameLength))
        guard let count = readInteger(as: UInt16.self), readableBytes == Int(count) * 2 else {
            throw .malformed("information request count does not match the option length")
        }
        var infos: [NBDInfoType] = []
        for _ in 0..<count { infos.append(NBDInfoType(rawValue: readInteger(as: UInt16.self)!)) }
        return NBDExportQuery(name: name, infoRequests: infos)
    }

    public mutating func writeNBDMetaContextQuery(_ query: NBDMetaContextQuery) {
        let name = Array(query.exportName.utf8)
        writeInteger(UInt32(name.count))
        writeBytes(name)
        writeInteger(UInt32(query.queries.count))
        for q in query.queries {
            let bytes = Array(q.utf8)
            writeInteger(UInt32(bytes.count))
            writeBytes(bytes)
        }
    }

    public mutating func readNBDMetaContextQuery() throws(NBDDecodingError) -> NBDMetaContextQuery {
        guard let nameLength = readInteger(as: UInt32.self), Int(nameLength) <= readableBytes - 4 else {
            throw .malformed("export name length exceeds the option")
        }
        let name = try readNBDString(length: Int(nameLength))
        guard let count = readInteger(as: UInt32.self) else { throw .malformed("missing query count") }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = readInteger(as: UInt32.self), Int(length) <= readableBytes else {
                throw .malformed("query length exceeds the option")
            }
            queries.append(try readNBDString(length: Int(length)))
        }
        guard readableBytes == 0 else { throw .malformed("trailing bytes after the queries") }
        return NBDMetaContextQuery(exportName: name, queries: queries)
    }

    /// Reads a protocol string: UTF-8, no NUL, at most 4096 bytes.
    public mutating func readNBDString(length: Int) throws(NBDDecodingError) -> String {
        guard length <= NBDLimits.maxString else { throw .malformed("string longer than 4096 bytes") }
        guard let bytes = readBytes(length: length) else { throw .malformed("string runs past the message") }
        guard !bytes.contains(0), let string = String(validating: bytes, as: UTF8.self) else {
            throw .malformed("string is not valid UTF-8 or contains NUL")
        }
        return string
    }

    /// An NBD_REP_SERVER payload: name length, name, description.
    public mutating func writeNBDServerEntry(name: String, description: String) {
        let bytes = Array(name.utf8)
        writeInteger(UInt32(bytes.count))
        writeBytes(bytes)
        writeString(description)
    }

    // MARK: Transmission

    public mutating func writeNBDRequest(_ request: NBDRequest) {
        let h = request.header
        writeInteger(NBDMagic.request)
        writeInteger(h.flags.rawValue)
        writeInteger(h.command.rawValue)
        writeInteger(h.cookie)
        writeInteger(h.offset)
        writeInteger(h.length)
        if let payload = request.payload { writeImmutableBuffer(payload) }
    }

    /// The request header at the reader index, without consuming it; nil until all 28
    /// bytes are here. Once per request on the server, so the fields are loaded from one
    /// view of the bytes (each `getInteger` is a separate checked access to the buffer).
    public func peekNBDRequestHeader() throws(NBDDecodingError) -> NBDRequestHeader? {
        guard readableBytes >= NBDRequestHeader.size else { return nil }
        let header = withUnsafeReadableBytes { raw -> NBDRequestHeader? in
            func field<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
                T(bigEndian: raw.loadUnaligned(fromByteOffset: offset, as: T.self))
            }
            guard field(0, UInt32.self) == NBDMagic.request else { return nil }
            return NBDRequestHeader(
                flags: NBDCommandFlags(rawValue: field(4, UInt16.self)),
                command: NBDCommand(rawValue: field(6, UInt16.self)),
                cookie: field(8, UInt64.self),
                offset: field(16, UInt64.self),
                length: field(24, UInt32.self))
        }
        guard let header else { throw .badMagic }
        return header
    }

    /// Appends a simple reply (16 bytes) in one write to the buffer: once per WRITE on the
    /// server.
    public mutating func writeNBDSimpleReply(_ header: NBDSimpleReplyHeader) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: NBDSimpleReplyHeader.size) { raw in
            raw.storeBytes(of: NBDMagic.simpleReply.bigEndian, toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: header.error.rawValue.bigEndian, toByteOffset: 4, as: UInt32.self)
            raw.storeBytes(of: header.cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
            return NBDSimpleReplyHeader.size
        }
    }

    public mutating func readNBDSimpleReplyHeader() throws(NBDDecodingError) -> NBDSimpleReplyHeader? {
        guard readableBytes >= NBDSimpleReplyHeader.size else { return nil }
        guard getInteger(at: readerIndex, as: UInt32.self)! == NBDMagic.simpleReply else { throw .badMagic }
        moveReaderIndex(forwardBy: 4)
        return NBDSimpleReplyHeader(error: NBDError(rawValue: readInteger()!), cookie: readInteger()!)
    }

    /// Writes a chunk header for a payload of `length` bytes (the payload follows), in
    /// one write to the buffer.
    public mutating func writeNBDChunkHeader(flags: NBDStructuredChunk.Flags, type: NBDReplyType, cookie: UInt64, length: Int) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: Self.chunkHeaderSize) { raw in
            Self.storeChunkHeader(into: raw, flags: flags, type: type, cookie: cookie, length: length)
            return Self.chunkHeaderSize
        }
    }

    /// Writes an OFFSET_DATA chunk's header and offset (28 bytes; `dataLength` bytes of
    /// data follow), in one write to the buffer: once per structured READ reply.
    public mutating func writeNBDOffsetDataHeader(flags: NBDStructuredChunk.Flags, cookie: UInt64, offset: UInt64, dataLength: Int) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: Self.chunkHeaderSize + 8) { raw in
            Self.storeChunkHeader(into: raw, flags: flags, type: .offsetData, cookie: cookie, length: 8 + dataLength)
            raw.storeBytes(of: offset.bigEndian, toByteOffset: Self.chunkHeaderSize, as: UInt64.self)
            return Self.chunkHeaderSize + 8
        }
    }

    private static let chunkHeaderSize = 20

    private static func storeChunkHeader(
        into raw: UnsafeMutableRawBufferPointer, flags: NBDStructuredChunk.Flags, type: NBDReplyType, cookie: UInt64, length: Int
    ) {
        raw.storeBytes(of: NBDMagic.structuredReply.bigEndian, toByteOffset: 0, as: UInt32.self)
        raw.storeBytes(of: flags.rawValue.bigEndian, toByteOffset: 4, as: UInt16.self)
        raw.storeBytes(of: type.rawValue.bigEndian, toByteOffset: 6, as: UInt16.self)
        raw.storeBytes(of: cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
        raw.storeBytes(of: UInt32(length).bigEndian, toByteOffset: 16, as: UInt32.self)
    }

    public mutating func writeNBDStructuredChunk(_ chunk: NBDStructuredChunk) {
        switch chunk.payload {
        case .none:
            writeNBDChunkHeader(flags: chunk.flags, type: .none, cookie: chunk.cookie, length: 0)
        case .offsetData(let offset, let data):
            writeNBDOffsetDataHeader(flags: chunk.flags, cookie: chunk.cookie, offset: offset, dataLength: data.readableBytes)
            writeImmutableBuffer(data)
        case .offsetHole(let offset, let length):
            writeNBDChunkHeader(flags: chunk.flags, type: .offsetHole, cookie: chunk.cookie, length: 12)
            writeInteger(offset)
            writeInteger(length)
        case .blockStatus(let contextID, let descriptors):
            writeNBDChunkHeader(flags: chunk.flags, type: .blockStatus, cookie: chunk.cookie, length: 4 + 8 * descriptors.count)
            writeInteger(contextID)
            for d in descriptors {
                writeInteger(d.length)
                writeInteger(d.flags)
            }
        case .error(let error, let message):
            let text = Array(message.utf8.prefix(NBDLimits.maxString))
            writeNBDChunkHeader(flags: chunk.flags, type: .error, cookie: chunk.cookie, length: 6 + text.count)
            writeInteger(error.rawValue)
            writeInteger(UInt16(text.count))
            writeBytes(text)
        case .errorOffset(let error, let message, let offset):
            let text = Array(message.utf8.prefix(NBDLimits.maxString))
            writeNBDChunkHeader(flags: chunk.flags, type: .errorOffset, cookie: chunk.cookie, length: 14 + text.count)
            writeInteger(error.rawValue)
            writeInteger(UInt16(text.count))
            writeBytes(text)
            writeInteger(offset)
        case .unknown(let type, let bytes):
            writeNBDChunkHeader(flags: chunk.flags, type: type, cookie: chunk.cookie, length: bytes.readableBytes)
            writeImmutableBuffer(bytes)
        }
    }

    public mutating func readNBDStructuredChunk() throws(NBDDecodingError) -> NBDStructuredChunk? {
        guard readableBytes >= NBDStructuredChunk.headerSize else { return nil }
        guard getInteger(at: readerIndex, as: UInt32.self)! == NBDMagic.structuredReply else { throw .badMagic }
        let length = Int(getInteger(at: readerIndex + 16, as: UInt32.self)!)
        guard readableBytes >= NBDStructuredChunk.headerSize + length else { return nil }
        moveReaderIndex(forwardBy: 4)
        let flags = NBDStructuredChunk.Flags(rawValue: readInteger()!)
        let type = NBDReplyType(rawValue: readInteger()!)
        let cookie: UInt64 = readInteger()!
        moveReaderIndex(forwardBy: 4)
        var body = readSlice(length: length)!
        let payload: NBDStructuredChunk.Payload
        switch type {
        case .none:
            guard length == 0 else { throw .malformed("NONE chunk with a payload") }
            payload = .none
        case .offsetData:
            guard length >= 9 else { throw .malformed("OFFSET_DATA chunk shorter than 9 bytes") }
            payload = .offsetData(offset: body.readInteger()!, data: body.readSlice(length: length - 8)!)
        case .offsetHole:
            guard length == 12 else { throw .malformed("OFFSET_HOLE chunk is not 12 bytes") }
            payload = .offsetHole(offset: body.readInteger()!, length: body.readInteger()!)
        case .blockStatus:
            guard length >= 12, (length - 4) % 8 == 0 else { throw .malformed("BLOCK_STATUS chunk has a bad length") }
            let id: UInt32 = body.readInteger()!
            var descriptors: [BlockStatusDescriptor] = []
            while body.readableBytes > 0 {
                descriptors.append(BlockStatusDescriptor(length: body.readInteger()!, flags: body.readInteger()!))
            }
            payload = .blockStatus(contextID: id, descriptors: descriptors)
        case .error, .errorOffset:
            let fixed = type == .error ? 6 : 14
            guard length >= fixed else { throw .malformed("error chunk too short") }
            let error = NBDError(rawValue: body.readInteger()!)
            let messageLength = Int(body.readInteger(as: UInt16.self)!)
            guard messageLength <= length - fixed else { throw .malformed("error message longer than its chunk") }
            let message = try body.readNBDString(length: messageLength)
            if type == .error {
                payload = .error(error, message: message)
            } else {
                payload = .errorOffset(error, message: message, offset: body.readInteger()!)
            }
        default:
            payload = .unknown(type: type, bytes: body)
        }
        return NBDStructuredChunk(flags: flags, cookie: cookie, payload: payload)
    }
}

/// Why bytes could not be decoded as an NBD message.
public enum NBDDecodingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A magic number is wrong: the stream cannot be resynchronized.
    case badMagic
    /// A message's contents contradict each other.
    case malformed(String)
    /// A length so large that reading it would be a denial of service.
    case excessive(String)

    public var description: String {
        switch self {
        case .badMagic: "bad magic number"
        case .malformed(let why): why
        case .excessive(let why): why
        }
    }
}
