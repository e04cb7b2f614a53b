/// Wire constants of the NBD protocol (shared/reference/nbd-proto.md). Every integer on
/// the wire is big-endian.
public enum NBDMagic {
    /// "NBDMAGIC": first 8 bytes the server sends.
    public static let greeting: UInt64 = 0x4E42_444D_4147_4943
    /// "IHAVEOPT": after the greeting, and before every client option.
    public static let option: UInt64 = 0x4948_4156_454F_5054
    public static let optionReply: UInt64 = 0x0003_E889_0455_65A9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668E_33EF
}

/// Handshake flags (server, 16 bits).
public struct NBDHandshakeFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Client flags (32 bits), the client's answer to the handshake flags.
public struct NBDClientFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
}

/// Transmission flags (16 bits), per export.
public struct NBDTransmissionFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// Option types sent by the client during haggling. Unknown values are kept.
public struct NBDOption: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let exportName = NBDOption(rawValue: 1)
    public static let abort = NBDOption(rawValue: 2)
    public static let list = NBDOption(rawValue: 3)
    public static let startTLS = NBDOption(rawValue: 5)
    public static let info = NBDOption(rawValue: 6)
    public static let go = NBDOption(rawValue: 7)
    public static let structuredReply = NBDOption(rawValue: 8)
    public static let listMetaContext = NBDOption(rawValue: 9)
    public static let setMetaContext = NBDOption(rawValue: 10)
    public static let extendedHeaders = NBDOption(rawValue: 11)

    public var description: String {
        switch self {
        case .exportName: "NBD_OPT_EXPORT_NAME"
        case .abort: "NBD_OPT_ABORT"
        case .list: "NBD_OPT_LIST"
        case .startTLS: "NBD_OPT_STARTTLS"
        case .info: "NBD_OPT_INFO"
        case .go: "NBD_OPT_GO"
        case .structuredReply: "NBD_OPT_STRUCTURED_REPLY"
        case .listMetaContext: "NBD_OPT_LIST_META_CONTEXT"
        case .setMetaContext: "NBD_OPT_SET_META_CONTEXT"
        case .extendedHeaders: "NBD_OPT_EXTENDED_HEADERS"
        default: "option \(rawValue)"
        }
    }
}

/// Option reply types; errors have bit 31 set.
public struct NBDOptionReplyType: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let ack = NBDOptionReplyType(rawValue: 1)
    public static let server = NBDOptionReplyType(rawValue: 2)
    public static let info = NBDOptionReplyType(rawValue: 3)
    public static let metaContext = NBDOptionReplyType(rawValue: 4)
    public static let errUnsupported = NBDOptionReplyType(rawValue: 1 << 31 | 1)
    public static let errPolicy = NBDOptionReplyType(rawValue: 1 << 31 | 2)
    public static let errInvalid = NBDOptionReplyType(rawValue: 1 << 31 | 3)
    public static let errPlatform = NBDOptionReplyType(rawValue: 1 << 31 | 4)
    public static let errTLSRequired = NBDOptionReplyType(rawValue: 1 << 31 | 5)
    public static let errUnknown = NBDOptionReplyType(rawValue: 1 << 31 | 6)
    public static let errShutdown = NBDOptionReplyType(rawValue: 1 << 31 | 7)
    public static let errBlockSizeRequired = NBDOptionReplyType(rawValue: 1 << 31 | 8)
    public static let errTooBig = NBDOptionReplyType(rawValue: 1 << 31 | 9)

    public var isError: Bool { rawValue & (1 << 31) != 0 }
}

/// Information types in NBD_OPT_INFO / NBD_OPT_GO.
public struct NBDInfoType: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let export = NBDInfoType(rawValue: 0)
    public static let name = NBDInfoType(rawValue: 1)
    public static let description = NBDInfoType(rawValue: 2)
    public static let blockSize = NBDInfoType(rawValue: 3)
}

/// Transmission commands.
public struct NBDCommand: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let read = NBDCommand(rawValue: 0)
    public static let write = NBDCommand(rawValue: 1)
    public static let disconnect = NBDCommand(rawValue: 2)
    public static let flush = NBDCommand(rawValue: 3)
    public static let trim = NBDCommand(rawValue: 4)
    public static let cache = NBDCommand(rawValue: 5)
    public static let writeZeroes = NBDCommand(rawValue: 6)
    public static let blockStatus = NBDCommand(rawValue: 7)

    public var description: String {
        switch self {
        case .read: "READ"
        case .write: "WRITE"
        case .disconnect: "DISC"
        case .flush: "FLUSH"
        case .trim: "TRIM"
        case .cache: "CACHE"
        case .writeZeroes: "WRITE_ZEROES"
        case .blockStatus: "BLOCK_STATUS"
        default: "command \(rawValue)"
        }
    }
}

/// Command flags (16 bits) on a request.
public struct NBDCommandFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let requestOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
}

/// Error values carried by replies.
public struct NBDError: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let none = NBDError(rawValue: 0)
    public static let permission = NBDError(rawValue: 1)
    public static let io = NBDError(rawValue: 5)
    public static let noMemory = NBDError(rawValue: 12)
    public static let invalid = NBDError(rawValue: 22)
    public static let noSpace = NBDError(rawValue: 28)
    public static let overflow = NBDError(rawValue: 75)
    public static let notSupported = NBDError(rawValue: 95)
    public static let shutdown = NBDError(rawValue: 108)

    public var description: String {
        switch self {
        case .none: "success"
        case .permission: "EPERM"
        case .io: "EIO"
        case .noMemory: "ENOMEM"
        case .invalid: "EINVAL"
        case .noSpace: "ENOSPC"
        case .overflow: "EOVERFLOW"
        case .notSupported: "ENOTSUP"
        case .shutdown: "ESHUTDOWN"
        default: "error \(rawValue)"
        }
    }
}

/// Structured reply chunk types; error chunks have bit 15 set.
public struct NBDReplyType: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let none = NBDReplyType(rawValue: 0)
    public static let offsetData = NBDReplyType(rawValue: 1)
    public static let offsetHole = NBDReplyType(rawValue: 2)
    public static let blockStatus = NBDReplyType(rawValue: 5)
    public static let error = NBDReplyType(rawValue: 1 << 15 | 1)
    public static let errorOffset = NBDReplyType(rawValue: 1 << 15 | 2)
}

/// Flags of `base:allocation` block status descriptors.
public struct NBDAllocationState: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let hole = NBDAllocationState(rawValue: 1 << 0)
    public static let zero = NBDAllocationState(rawValue: 1 << 1)
}

/// Limits thinbd applies on the wire.
public enum NBDLimits {
    /// Largest READ/WRITE payload served (the spec's interoperable maximum).
    public static let maxPayload = 32 << 20
    /// WRITE payloads up to this are read and discarded with an error; larger ones end
    /// the connection.
    public static let maxDiscardablePayload = 64 << 20
    /// Largest option payload handled; larger ones get NBD_REP_ERR_TOO_BIG.
    public static let maxOptionPayload = 64 << 10
    /// Option payloads beyond this end the connection (denial of service).
    public static let maxDiscardableOption = 16 << 20
    /// Longest string (export name, query) the spec allows.
    public static let maxString = 4096
    /// Most block status descriptors in one chunk.
    public static let maxBlockStatusDescriptors = 1 << 20
}
