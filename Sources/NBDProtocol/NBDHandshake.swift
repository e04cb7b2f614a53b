import NIOCore

/// What a client may learn about an export.
public struct NBDExportDescription: Equatable, Sendable {
    public var name: String
    public var size: UInt64
    public var isReadOnly: Bool
    public var description: String
    public var preferredBlockSize: UInt32

    public init(name: String, size: UInt64, isReadOnly: Bool, description: String, preferredBlockSize: UInt32 = 4096) {
        self.name = name
        self.size = size
        self.isReadOnly = isReadOnly
        self.description = description
        self.preferredBlockSize = preferredBlockSize
    }

    /// The flags thinbd advertises for this export: every command it implements,
    /// multi-conn always, and DF only with structured replies.
    public func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .canMultiConn, .sendCache]
        if isReadOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}

/// The exports a server offers, looked up while a client haggles.
public protocol NBDExportCatalog {
    /// The export named `name`; the empty name means the default export, if any.
    func export(named name: String) -> NBDExportDescription?
    /// Every export, for NBD_OPT_LIST.
    func allExports() -> [NBDExportDescription]
}

/// What transmission needs to know once the handshake ends.
public struct NBDSession: Equatable, Sendable {
    public var export: NBDExportDescription
    public var flags: NBDTransmissionFlags
    public var structuredReplies: Bool
    /// The id of `base:allocation` when the client selected it for this export.
    public var allocationContextID: UInt32?

    public init(export: NBDExportDescription, flags: NBDTransmissionFlags, structuredReplies: Bool, allocationContextID: UInt32?) {
        self.export = export
        self.flags = flags
        self.structuredReplies = structuredReplies
        self.allocationContextID = allocationContextID
    }
}

/// The server side of the fixed-newstyle handshake, as a value that returns actions.
///
/// ```
///   (greeting sent)
///        │ client flags
///        ▼
///   ┌─────────┐  option ──► replies ──┐
///   │haggling │◄──────────────────────┘
///   └─────────┘
///     │ GO acked / EXPORT_NAME answered      │ ABORT, bad flags, unknown EXPORT_NAME
///     ▼                                      ▼
///   transmission                           closed
/// ```
public struct NBDHandshake: Sendable {
    public static let serverFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]
    public static let allocationContext = "base:allocation"
    static let allocationContextID: UInt32 = 1

    public enum State: Equatable, Sendable { case awaitingClientFlags, haggling, transmission, closed }

    public enum Action: Equatable, Sendable {
        case send(NBDOptionReply)
        case sendExportName(NBDExportNameReply)
        case enterTransmission(NBDSession)
        case close(reason: String)
    }

    public private(set) var state: State = .awaitingClientFlags
    private var noZeroes = false
    private var structuredReplies = false
    /// The export named in the last SET_META_CONTEXT and whether it selected base:allocation.
    private var metaContext: (exportName: String, selected: Bool)?
    /// Set by the server while it shuts down: options get NBD_REP_ERR_SHUTDOWN.
    public var isShuttingDown = false

    public init() {}

    /// The bytes the server sends as soon as a client connects.
    public static func greeting() -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeNBDGreeting(flags: serverFlags)
        return buffer
    }

    public mutating func receive(_ message: NBDServerParser.Message, catalog: some NBDExportCatalog) -> [Action] {
        switch (state, message) {
        case (.awaitingClientFlags, .clientFlags(let flags)):
            let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
            guard flags.isSubset(of: known) else {
                state = .closed
                return [.close(reason: "client sent unknown flags \(flags.rawValue)")]
            }
            noZeroes = flags.contains(.noZeroes)
            state = .haggling
            return []
        case (.haggling, .oversizedOption(let option, let length)):
            return [reply(option, .errTooBig, "option payload of \(length) bytes is too large")]
        case (.haggling, .option(let request)):
            return handle(request, catalog: catalog)
        default:
            state = .closed
            return [.close(reason: "unexpected message during the handshake")]
        }
    }

    private func reply(_ option: NBDOption, _ type: NBDOptionReplyType, _ message: String = "") -> Action {
        var payload = ByteBuffer()
        payload.writeString(message)
        return .send(NBDOptionReply(option: option, type: type, payload: payload))
    }

    private mutating func handle(_ request: NBDOptionRequest, catalog: some NBDExportCatalog) -> [Action] {
        let option = request.option
        var payload = request.payload
        if isShuttingDown && option != .abort {
            if option == .exportName {
                state = .closed
                return [.close(reason: "server is shutting down")]
            }
            return [reply(option, .errShutdown, "server is shutting down")]
        }
        switch option {
        case .exportName:
            guard let name = try? payload.readNBDString(length: payload.readableBytes),
                let export = catalog.export(named: name)
            else {
                state = .closed
                return [.close(reason: "NBD_OPT_EXPORT_NAME for an unknown export")]
            }
            state = .transmission
            let session = makeSession(export, requestedName: name)
            return [
                .sendExportName(NBDExportNameReply(size: export.size, flags: session.flags, padded: !noZeroes)),
                .enterTransmission(session),
            ]
        case .abort:
            state = .closed
            return [reply(option, .ack), .close(reason: "client aborted the handshake")]
        case .list:
            guard payload.readableBytes == 0 else { return [reply(option, .errInvalid, "NBD_OPT_LIST takes no data")] }
            var actions: [Action] = catalog.allExports().map { export in
                var entry = ByteBuffer()
                entry.writeNBDServerEntry(name: export.name, description: export.description)
                return .send(NBDOptionReply(option: option, type: .server, payload: entry))
            }
            actions.append(reply(option, .ack))
            return actions
        case .startTLS:
            guard payload.readableBytes == 0 else { return [reply(option, .errInvalid, "NBD_OPT_STARTTLS takes no data")] }
            return [reply(option, .errUnsupported, "TLS is not supported by this server")]
        case .info, .go:
            let query: NBDExportQuery
            do {
                query = try payload.readNBDExportQuery()
            } catch {
                return [reply(option, .errInvalid, "malformed \(option): \(error)")]
            }
            guard let export = catalog.export(named: query.name) else {
                let what = query.name.isEmpty ? "no default export is configured" : "no such export: \(query.name)"
                return [reply(option, .errUnknown, what)]
            }
            let session = makeSession(export, requestedName: query.name)
            var actions = infoReplies(option, export, session, requested: query.infoRequests)
            actions.append(reply(option, .ack))
            if option == .go {
                state = .transmission
                actions.append(.enterTransmission(session))
            }
            return actions
        case .structuredReply:
            guard payload.readableBytes == 0 else {
                return [reply(option, .errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")]
            }
            guard !structuredReplies else { return [reply(option, .errInvalid, "structured replies are already on")] }
            structuredReplies = true
            return [reply(option, .ack)]
        case .listMetaContext, .setMetaContext:
            return metaContextReplies(option, &payload, catalog: catalog)
        default:
            return [reply(option, .errUnsupported, "\(option) is not supported")]
        }
    }

    private func makeSession(_ export: NBDExportDescription, requestedName: String) -> NBDSession {
        let selected = metaContext.map { $0.exportName == requestedName && $0.selected } ?? false
        return NBDSession(
            export: export, flags: export.transmissionFlags(structuredReplies: structuredReplies),
            structuredReplies: structuredReplies, allocationContextID: selected ? Self.allocationContextID : nil)
    }

    private func infoReplies(_ option: NBDOption, _ export: NBDExportDescription, _ session: NBDSession, requested: [NBDInfoType]) -> [Action] {
        func info(_ type: NBDInfoType, _ body: (inout ByteBuffer) -> Void) -> Action {
            var payload = ByteBuffer()
            payload.writeInteger(type.rawValue)
            body(&payload)
            return .send(NBDOptionReply(option: option, type: .info, payload: payload))
        }
        var actions = [
            info(.export) {
                $0.writeInteger(export.size)
                $0.writeInteger(session.flags.rawValue)
            }
        ]
        if requested.contains(.name) { actions.append(info(.name) { $0.writeString(export.name) }) }
        if requested.contains(.description) { actions.append(info(.description) { $0.writeString(export.description) }) }
        // Always sent: clients that ask learn the preferred size; others may ignore it.
        actions.append(
            info(.blockSize) {
                $0.writeInteger(UInt32(1))
                $0.writeInteger(export.preferredBlockSize)
                $0.writeInteger(UInt32(NBDLimits.maxPayload))
            })
        return actions
    }

    private mutating func metaContextReplies(_ option: NBDOption, _ payload: inout ByteBuffer, catalog: some NBDExportCatalog) -> [Action] {
        if option == .setMetaContext { metaContext = nil }
        guard structuredReplies else {
            return [reply(option, .errInvalid, "negotiate structured replies before metadata contexts")]
        }
        let query: NBDMetaContextQuery
        do {
            query = try payload.readNBDMetaContextQuery()
        } catch {
            return [reply(option, .errInvalid, "malformed \(option): \(error)")]
        }
        guard catalog.export(named: query.exportName) != nil else {
            return [reply(option, .errUnknown, "no such export: \(query.exportName)")]
        }
        var matches = false
        for q in query.queries {
            guard q.contains(":") else { return [reply(option, .errInvalid, "query '\(q)' has no namespace")] }
            if q == Self.allocationContext || (option == .listMetaContext && q == "base:") { matches = true }
        }
        if option == .listMetaContext && query.queries.isEmpty { matches = true }
        var actions: [Action] = []
        if matches {
            var context = ByteBuffer()
            context.writeInteger(option == .setMetaContext ? Self.allocationContextID : 0)
            context.writeString(Self.allocationContext)
            actions.append(.send(NBDOptionReply(option: option, type: .metaContext, payload: context)))
        }
        if option == .setMetaContext { metaContext = (query.exportName, matches) }
        actions.append(reply(option, .ack))
        return actions
    }
}
