import NIOCore

/// The client side of the fixed-newstyle handshake, as a value type: feed it the
/// server's bytes, send what it returns. With `requireTLS` it first sends
/// NBD_OPT_STARTTLS and insists on the acknowledgement (never going on in plain text:
/// no downgrade); then it asks for structured replies (and goes on without them if
/// refused), with `wantsAllocation` selects the `base:allocation` metadata context (and
/// goes on without it if the server has none), then NBD_OPT_GO with the export name, and
/// ends with the export's size and flags. No I/O.
public struct NBDClientHandshake: Sendable {
    /// What the handshake learned about the export.
    public struct Export: Equatable, Sendable {
        public var name: String
        public var size: UInt64
        public var flags: NBDTransmissionFlags
        public var structuredReplies: Bool
        /// The server's block size constraints (NBD_INFO_BLOCK_SIZE), when sent.
        public var preferredBlockSize: UInt32?
        public var maximumBlockSize: UInt32?
        /// NBD_INFO_DESCRIPTION, when the server sent one.
        public var description: String?
        /// The id of the selected `base:allocation` context (nil: none selected), for
        /// BLOCK_STATUS.
        public var allocationContextID: UInt32?

        public var isReadOnly: Bool { flags.contains(.readOnly) }
    }

    public enum Action: Equatable, Sendable {
        case send(ByteBuffer)
        /// The server acknowledged STARTTLS: do the TLS handshake now, before carrying out
        /// the actions after this one; every later byte, both ways, goes over TLS.
        case startTLS
        case ready(Export)
    }

    private enum State {
        case awaitingGreeting
        case awaitingStartTLS
        case awaitingStructuredReply
        case awaitingMetaContext
        case awaitingGo
        case done
    }

    public let exportName: String
    public let requireTLS: Bool
    public let wantsAllocation: Bool
    private var state = State.awaitingGreeting
    private var allocationContextID: UInt32?
    private var structured = false
    private var size: UInt64?
    private var flags = NBDTransmissionFlags()
    private var preferredBlockSize: UInt32?
    private var maximumBlockSize: UInt32?
    private var exportDescription: String?

    public init(exportName: String, requireTLS: Bool = false, wantsAllocation: Bool = false) {
        self.exportName = exportName
        self.requireTLS = requireTLS
        self.wantsAllocation = wantsAllocation
    }

    private func goRequest() -> ByteBuffer {
        var payload = ByteBuffer()
        payload.writeNBDExportQuery(NBDExportQuery(name: exportName, infoRequests: [.blockSize, .description]))
        var out = ByteBuffer()
        out.writeNBDOptionRequest(NBDOptionRequest(option: .go, payload: payload))
        return out
    }

    private func structuredReplyRequest() -> ByteBuffer {
        var out = ByteBuffer()
        out.writeNBDOptionRequest(NBDOptionRequest(option: .structuredReply))
        return out
    }

    /// Consumes what it can of `input`; returns the bytes to send and, at the end,
    /// `.ready`. An empty result means: read more and call again.
    public mutating func receive(_ input: inout ByteBuffer) throws(NBDClientError) -> [Action] {
        var actions: [Action] = []
        while true {
            switch state {
            case .awaitingGreeting:
                let greeting: NBDHandshakeFlags?
                do throws(NBDDecodingError) {
                    greeting = try input.readNBDGreeting()
                } catch {
                    throw NBDClientError("not an NBD server (or an old-style one): \(error)")
                }
                guard let greeting else { return actions }
                guard greeting.contains(.fixedNewstyle) else { throw NBDClientError("the server does not speak fixed newstyle NBD") }
                var out = ByteBuffer()
                var clientFlags: NBDClientFlags = [.fixedNewstyle]
                if greeting.contains(.noZeroes) { clientFlags.insert(.noZeroes) }
                out.writeNBDClientFlags(clientFlags)
                if requireTLS {
                    out.writeNBDOptionRequest(NBDOptionRequest(option: .startTLS))
                    actions.append(.send(out))
                    state = .awaitingStartTLS
                } else {
                    var request = structuredReplyRequest()
                    out.writeBuffer(&request)
                    actions.append(.send(out))
                    state = .awaitingStructuredReply
                }
            case .awaitingStartTLS:
                guard var reply = try nextReply(&input) else { return actions }
                guard reply.option == .startTLS else { throw NBDClientError("the server answered \(reply.option) to NBD_OPT_STARTTLS") }
                guard reply.type == .ack else {
                    let message = reply.payload.readString(length: reply.payload.readableBytes) ?? ""
                    throw NBDClientError("the server refused TLS\(message.isEmpty ? "" : ": \(message)") (an nbds:// URI never goes on in plain text)")
                }
                // The server sends nothing more before the TLS handshake: bytes after the
                // acknowledgement were not sent by it over TLS.
                guard input.readableBytes == 0 else { throw NBDClientError("the server sent data after acknowledging STARTTLS") }
                actions.append(.startTLS)
                actions.append(.send(structuredReplyRequest()))
                state = .awaitingStructuredReply
                return actions
            case .awaitingStructuredReply:
                guard let reply = try nextReply(&input) else { return actions }
                guard reply.option == .structuredReply else { throw NBDClientError("the server answered \(reply.option) to NBD_OPT_STRUCTURED_REPLY") }
                // Refusal is fine: simple replies work for everything a client here does.
                structured = reply.type == .ack
                if structured && wantsAllocation {
                    var payload = ByteBuffer()
                    payload.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: exportName, queries: ["base:allocation"]))
                    var out = ByteBuffer()
                    out.writeNBDOptionRequest(NBDOptionRequest(option: .setMetaContext, payload: payload))
                    actions.append(.send(out))
                    state = .awaitingMetaContext
                } else {
                    actions.append(.send(goRequest()))
                    state = .awaitingGo
                }
            case .awaitingMetaContext:
                guard var reply = try nextReply(&input) else { return actions }
                guard reply.option == .setMetaContext else { throw NBDClientError("the server answered \(reply.option) to NBD_OPT_SET_META_CONTEXT") }
                if reply.type == .metaContext {
                    guard let id = reply.payload.readInteger(as: UInt32.self) else { throw NBDClientError("a meta context reply without an id") }
                    if reply.payload.readString(length: reply.payload.readableBytes) == "base:allocation" { allocationContextID = id }
                    continue
                }
                // The ACK ends the list; an error means no context: BLOCK_STATUS is not used.
                actions.append(.send(goRequest()))
                state = .awaitingGo
            case .awaitingGo:
                guard var reply = try nextReply(&input) else { return actions }
                guard reply.option == .go else { throw NBDClientError("the server answered \(reply.option) to NBD_OPT_GO") }
                switch reply.type {
                case .info:
                    try readInfo(&reply.payload)
                case .ack:
                    guard let size else { throw NBDClientError("the server sent no size for export '\(exportName)'") }
                    state = .done
                    actions.append(.ready(Export(
                        name: exportName, size: size, flags: flags, structuredReplies: structured,
                        preferredBlockSize: preferredBlockSize, maximumBlockSize: maximumBlockSize, description: exportDescription,
                        allocationContextID: allocationContextID)))
                    return actions
                default:
                    let message = reply.payload.readString(length: reply.payload.readableBytes) ?? ""
                    let what = reply.type == .errUnknown ? "no export named '\(exportName)'" : "export '\(exportName)' refused"
                    throw NBDClientError(message.isEmpty ? what : "\(what): \(message)")
                }
            case .done:
                return actions
            }
        }
    }

    private func nextReply(_ input: inout ByteBuffer) throws(NBDClientError) -> NBDOptionReply? {
        // Replies to what this client asks are small; a huge one is refused unbuffered.
        if input.readableBytes >= 20, let length = input.getInteger(at: input.readerIndex + 16, as: UInt32.self), length > 1 << 20 {
            throw NBDClientError("the server sent a \(length)-byte option reply")
        }
        do throws(NBDDecodingError) {
            return try input.readNBDOptionReply()
        } catch {
            throw NBDClientError("malformed option reply: \(error)")
        }
    }

    private mutating func readInfo(_ payload: inout ByteBuffer) throws(NBDClientError) {
        guard let type = payload.readInteger(as: UInt16.self) else { throw NBDClientError("empty NBD_REP_INFO") }
        switch NBDInfoType(rawValue: type) {
        case .export:
            guard let size = payload.readInteger(as: UInt64.self), let flags = payload.readInteger(as: UInt16.self) else {
                throw NBDClientError("short NBD_INFO_EXPORT")
            }
            self.size = size
            self.flags = NBDTransmissionFlags(rawValue: flags)
        case .blockSize:
            guard payload.readInteger(as: UInt32.self) != nil, let preferred = payload.readInteger(as: UInt32.self),
                let maximum = payload.readInteger(as: UInt32.self)
            else { throw NBDClientError("short NBD_INFO_BLOCK_SIZE") }
            preferredBlockSize = preferred
            maximumBlockSize = maximum
        case .description:
            exportDescription = payload.readString(length: payload.readableBytes)
        default:
            break  // the name: nothing a client here needs
        }
    }
}

/// Why an NBD client operation failed, for a person.
public struct NBDClientError: Error, Equatable, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
