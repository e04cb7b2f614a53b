import NIOCore

/// An option the client sends during haggling: `IHAVEOPT`, option, length, payload.
public struct NBDOptionRequest: Equatable, Sendable {
    public var option: NBDOption
    public var payload: ByteBuffer

    public init(option: NBDOption, payload: ByteBuffer = ByteBuffer()) {
        self.option = option
        self.payload = payload
    }
}

/// The server's answer to an option (every option but NBD_OPT_EXPORT_NAME).
public struct NBDOptionReply: Equatable, Sendable {
    public var option: NBDOption
    public var type: NBDOptionReplyType
    public var payload: ByteBuffer

    public init(option: NBDOption, type: NBDOptionReplyType, payload: ByteBuffer = ByteBuffer()) {
        self.option = option
        self.type = type
        self.payload = payload
    }
}

/// The server's answer to NBD_OPT_EXPORT_NAME: size, flags and (unless both sides
/// agreed to NO_ZEROES) 124 zero bytes.
public struct NBDExportNameReply: Equatable, Sendable {
    public var size: UInt64
    public var flags: NBDTransmissionFlags
    public var padded: Bool

    public init(size: UInt64, flags: NBDTransmissionFlags, padded: Bool) {
        self.size = size
        self.flags = flags
        self.padded = padded
    }
}

/// A transmission request header (28 bytes). WRITE requests are followed by `length`
/// payload bytes.
public struct NBDRequestHeader: Equatable, Sendable {
    public static let size = 28

    public var flags: NBDCommandFlags
    public var command: NBDCommand
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: NBDCommandFlags = [], command: NBDCommand, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }
}

/// A complete request: the header and, for WRITE, its payload.
public struct NBDRequest: Equatable, Sendable {
    public var header: NBDRequestHeader
    public var payload: ByteBuffer?

    public init(header: NBDRequestHeader, payload: ByteBuffer? = nil) {
        self.header = header
        self.payload = payload
    }
}

/// A simple reply header (16 bytes); READ data follows it on success.
public struct NBDSimpleReplyHeader: Equatable, Sendable {
    public static let size = 16
    public var error: NBDError
    public var cookie: UInt64

    public init(error: NBDError, cookie: UInt64) {
        self.error = error
        self.cookie = cookie
    }
}

/// One structured reply chunk.
public struct NBDStructuredChunk: Equatable, Sendable {
    public static let headerSize = 20

    public struct Flags: OptionSet, Hashable, Sendable {
        public var rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let done = Flags(rawValue: 1)
    }

    public enum Payload: Equatable, Sendable {
        case none
        case offsetData(offset: UInt64, data: ByteBuffer)
        case offsetHole(offset: UInt64, length: UInt32)
        case blockStatus(contextID: UInt32, descriptors: [BlockStatusDescriptor])
        case error(NBDError, message: String)
        case errorOffset(NBDError, message: String, offset: UInt64)
        /// A chunk type this codec does not interpret.
        case unknown(type: NBDReplyType, bytes: ByteBuffer)
    }

    public var flags: Flags
    public var cookie: UInt64
    public var payload: Payload

    public init(flags: Flags, cookie: UInt64, payload: Payload) {
        self.flags = flags
        self.cookie = cookie
        self.payload = payload
    }
}

/// A block status extent: `length` bytes with `flags` (for base:allocation,
/// `NBDAllocationState`).
public struct BlockStatusDescriptor: Equatable, Sendable {
    public var length: UInt32
    public var flags: UInt32

    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// The payload of NBD_OPT_INFO and NBD_OPT_GO.
public struct NBDExportQuery: Equatable, Sendable {
    public var name: String
    public var infoRequests: [NBDInfoType]

    public init(name: String, infoRequests: [NBDInfoType]) {
        self.name = name
        self.infoRequests = infoRequests
    }
}

/// The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
public struct NBDMetaContextQuery: Equatable, Sendable {
    public var exportName: String
    public var queries: [String]

    public init(exportName: String, queries: [String]) {
        self.exportName = exportName
        self.queries = queries
    }
}
