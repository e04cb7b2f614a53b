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

/// How a server offers TLS (`serve --tls`), as the NBD spec's modes.
public enum NBDTLSMode: String, Sendable, Equatable, CaseIterable {
    /// NOTLS: STARTTLS gets NBD_REP_ERR_UNSUP.
    case off
    /// SELECTIVETLS with no TLS-only export: a client may upgrade with STARTTLS, or not.
    case on
    /// FORCEDTLS: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until
    /// TLS is up; EXPORT_NAME before it ends the connection (it cannot be refused).
    case require
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
/// It never looks exports up itself: where an option needs the catalog it returns
/// `.ask(query)` and waits in `awaitingCatalog` until the caller feeds the answer to
/// `answer(_:)`. The server asks off its event loop (a lookup may wait for the pool
/// lock; opening an ephemeral export creates a clone), so one client's
/// handshake never stalls the loop's other connections.
///
/// ```
///   (greeting sent)
///        │ client flags
///        ▼
///   ┌─────────┐  option ──► replies ──────────────┐
///   │haggling │◄──────────────────────────────────┘
///   └─────────┘◄─────────── answer ──────┐
///     │    │ option that needs exports   │
///     │    └──────► .ask(query) ──► awaitingCatalog
///     │                                  │ GO / EXPORT_NAME opened
///     │ ABORT, bad flags,                ▼
///     │ unknown EXPORT_NAME          transmission
///     ▼
///   closed
/// ```
public struct NBDHandshake: Sendable {
    public static let serverFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]
    public static let allocationContext = "base:allocation"
    public static let allocationContextID: UInt32 = 1

    public enum State: Equatable, Sendable { case awaitingClientFlags, haggling, awaitingCatalog, transmission, closed }

    /// What the server must find out from its exports before the handshake goes on.
    public enum CatalogQuery: Equatable, Sendable {
        /// Describe one export ("" = the default export).
        case describe(String)
        /// Every export (NBD_OPT_LIST).
        case list
        /// Look the export up and open it for this connection (GO, EXPORT_NAME).
        case open(String)
    }

    /// The answer to a `CatalogQuery`.
    public enum CatalogAnswer: Equatable, Sendable {
        /// `describe` found it, or `open` opened it.
        case found(NBDExportDescription)
        /// No export by that name (`describe`, `open`).
        case notFound
        /// The exports, for `list`.
        case exports([NBDExportDescription])
        /// `open` found the export but could not open it now (being changed, shutting down).
        case refused(String, shuttingDown: Bool)
    }

    public enum Action: Equatable, Sendable {
        case send(NBDOptionReply)
        case sendExportName(NBDExportNameReply)
        /// Ask the catalog, then call `answer(_:)`; feed no message meanwhile.
        case ask(CatalogQuery)
        case enterTransmission(NBDSession)
        /// The STARTTLS acknowledgement was sent (the action before this one): from the
        /// next byte on, the connection speaks TLS. Nothing more may be read in plain
        /// text; bytes the client sent before reading the acknowledgement break the
        /// protocol and end the connection.
        case startTLS
        case close(reason: String)
    }

    /// The option that waits for the catalog's answer.
    private enum Awaiting: Sendable {
        case exportName(requestedName: String)
        case info(NBDOption, NBDExportQuery)
        case list
        case metaContext(NBDOption, NBDMetaContextQuery)
    }

    public private(set) var state: State = .awaitingClientFlags
    private var awaiting: Awaiting?
    private var noZeroes = false
    private var structuredReplies = false
    /// The export named in the last SET_META_CONTEXT and whether it selected base:allocation.
    private var metaContext: (exportName: String, selected: Bool)?
    /// Set by the server while it shuts down: options get NBD_REP_ERR_SHUTDOWN.
    public var isShuttingDown = false
    public let tlsMode: NBDTLSMode
    /// STARTTLS was acknowledged: everything since has gone over TLS.
    public private(set) var isTLSActive = false

    public init(tlsMode: NBDTLSMode = .off) {
        self.tlsMode = tlsMode
    }

    /// The bytes the server sends as soon as a client connects.
    public static func greeting() -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeNBDGreeting(flags: serverFlags)
        return buffer
    }

    /// Whether the next client message may be fed to `receive` (not while a query is out).
    public var acceptsMessages: Bool { state == .awaitingClientFlags || state == .haggling }

    public mutating func receive(_ message: NBDServerParser.Message) -> [Action] {
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
            return handle(request)
        case (.awaitingCatalog, _):
            // The server feeds nothing while it asks; a message here is its bug, and
            // the connection cannot continue in order.
            state = .closed
            return [.close(reason: "a message arrived while the export catalog was being asked")]
        default:
            state = .closed
            return [.close(reason: "unexpected message during the handshake")]
        }
    }

    /// Feeds the answer to the query of the last `.ask` action.
    public mutating func answer(_ answer: CatalogAnswer) -> [Action] {
        guard state == .awaitingCatalog, let waiting = awaiting else {
            state = .closed
            return [.close(reason: "a catalog answer arrived that nobody asked for")]
        }
        awaiting = nil
        state = .haggling
        switch (waiting, answer) {
        case (.exportName(let name), .found(let export)):
            state = .transmission
            let session = makeSession(export, requestedName: name)
            return [
                .sendExportName(NBDExportNameReply(size: export.size, flags: session.flags, padded: !noZeroes)),
                .enterTransmission(session),
            ]
        case (.exportName, .notFound), (.exportName, .refused):
            state = .closed
            if case .refused(let why, _) = answer { return [.close(reason: "NBD_OPT_EXPORT_NAME refused: \(why)")] }
            return [.close(reason: "NBD_OPT_EXPORT_NAME for an unknown export")]
        case (.info(let option, let query), .found(let export)):
            let session = makeSession(export, requestedName: query.name)
            var actions = infoReplies(option, export, session, requested: query.infoRequests)
            actions.append(reply(option, .ack))
            if option == .go {
                state = .transmission
                actions.append(.enterTransmission(session))
            }
            return actions
        case (.info(let option, let query), .notFound):
            let what = query.name.isEmpty ? "no default export is configured" : "no such export: \(query.name)"
            return [reply(option, .errUnknown, what)]
        case (.info(let option, _), .refused(let why, let shuttingDown)):
            return [reply(option, shuttingDown ? .errShutdown : .errUnknown, why)]
        case (.list, .exports(let exports)):
            var actions: [Action] = exports.map { export in
                var entry = ByteBuffer()
                entry.writeNBDServerEntry(name: export.name, description: export.description)
                return .send(NBDOptionReply(option: .list, type: .server, payload: entry))
            }
            actions.append(reply(.list, .ack))
            return actions
        case (.metaContext(let option, let query), .found):
            return metaContextReplies(option, query)
        case (.metaContext(let option, let query), .notFound):
            return [reply(option, .errUnknown, "no such export: \(query.exportName)")]
        default:
            state = .closed
            return [.close(reason: "the export catalog gave an answer that does not fit the question")]
        }
    }

    private func reply(_ option: NBDOption, _ type: NBDOptionReplyType, _ message: String = "") -> Action {
        var payload = ByteBuffer()
        payload.writeString(message)
        return .send(NBDOptionReply(option: option, type: type, payload: payload))
    }

    private mutating func ask(_ query: CatalogQuery, _ waiting: Awaiting) -> [Action] {
        state = .awaitingCatalog
        awaiting = waiting
        return [.ask(query)]
    }

    private mutating func handle(_ request: NBDOptionRequest) -> [Action] {
        let option = request.option
        var payload = request.payload
        if isShuttingDown && option != .abort {
            if option == .exportName {
                state = .closed
                return [.close(reason: "server is shutting down")]
            }
            return [reply(option, .errShutdown, "server is shutting down")]
        }
        if tlsMode == .require && !isTLSActive && option != .startTLS && option != .abort {
            // FORCEDTLS: nothing about the exports is told, and nothing served, in plain text.
            if option == .exportName {
                state = .closed
                return [.close(reason: "NBD_OPT_EXPORT_NAME before STARTTLS, and this server requires TLS")]
            }
            return [reply(option, .errTLSRequired, "this server requires TLS: send NBD_OPT_STARTTLS first")]
        }
        switch option {
        case .exportName:
            guard let name = try? payload.readNBDString(length: payload.readableBytes) else {
                state = .closed
                return [.close(reason: "NBD_OPT_EXPORT_NAME with a name that is not UTF-8")]
            }
            return ask(.open(name), .exportName(requestedName: name))
        case .abort:
            state = .closed
            return [reply(option, .ack), .close(reason: "client aborted the handshake")]
        case .list:
            guard payload.readableBytes == 0 else { return [reply(option, .errInvalid, "NBD_OPT_LIST takes no data")] }
            return ask(.list, .list)
        case .startTLS:
            guard payload.readableBytes == 0 else { return [reply(option, .errInvalid, "NBD_OPT_STARTTLS takes no data")] }
            guard tlsMode != .off else { return [reply(option, .errUnsupported, "TLS is not enabled on this server (serve --tls)")] }
            guard !isTLSActive else { return [reply(option, .errInvalid, "TLS is already on")] }
            isTLSActive = true
            // What was negotiated in plain text could have been changed on the way: it is
            // forgotten, and the client negotiates again over TLS.
            structuredReplies = false
            metaContext = nil
            return [reply(option, .ack), .startTLS]
        case .info, .go:
            let query: NBDExportQuery
            do {
                query = try payload.readNBDExportQuery()
            } catch {
                return [reply(option, .errInvalid, "malformed \(option): \(error)")]
            }
            return ask(option == .go ? .open(query.name) : .describe(query.name), .info(option, query))
        case .structuredReply:
            guard payload.readableBytes == 0 else {
                return [reply(option, .errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")]
            }
            guard !structuredReplies else { return [reply(option, .errInvalid, "structured replies are already on")] }
            structuredReplies = true
            return [reply(option, .ack)]
        case .listMetaContext, .setMetaContext:
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
            if let bad = query.queries.first(where: { !$0.contains(":") }) {
                return [reply(option, .errInvalid, "query '\(bad)' has no namespace")]
            }
            return ask(.describe(query.exportName), .metaContext(option, query))
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

    /// LIST/SET_META_CONTEXT replies once the export is known to exist.
    private mutating func metaContextReplies(_ option: NBDOption, _ query: NBDMetaContextQuery) -> [Action] {
        var matches = query.queries.contains { $0 == Self.allocationContext || (option == .listMetaContext && $0 == "base:") }
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

/// Exports known up front, for driving the handshake without a server (tests, fuzzing).
public protocol NBDExportCatalog {
    /// The export named `name`; the empty name means the default export, if any.
    func export(named name: String) -> NBDExportDescription?
    /// Every export, for NBD_OPT_LIST.
    func allExports() -> [NBDExportDescription]
}

extension NBDHandshake {
    /// `receive`, with every query answered at once from `catalog` (opening always
    /// succeeds for an export it knows). For tests and fuzzing; a server asks off its
    /// event loop instead.
    public mutating func receive(_ message: NBDServerParser.Message, catalog: some NBDExportCatalog) -> [Action] {
        var actions = receive(message)
        while case .ask(let query) = actions.last {
            actions.removeLast()
            let found: CatalogAnswer
            switch query {
            case .describe(let name), .open(let name):
                found = catalog.export(named: name).map { .found($0) } ?? .notFound
            case .list:
                found = .exports(catalog.allExports())
            }
            actions += answer(found)
        }
        return actions
    }
}
