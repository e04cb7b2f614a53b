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

/// A metadata context an export offers besides `base:allocation`, as its provider
/// resolves a query: the full name and a key of the provider's choosing that names
/// what the context describes for as long as the connection lasts (thinbd: the id of
/// the base snapshot, which survives a rename and is never reused).
public struct NBDMetaContext: Equatable, Sendable {
    public var name: String
    public var key: UInt64

    public init(name: String, key: UInt64) {
        self.name = name
        self.key = key
    }
}

/// A metadata context selected with SET_META_CONTEXT, with the id BLOCK_STATUS
/// replies carry for it.
public struct NBDSelectedMetaContext: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        /// `base:allocation`: holes and zeros.
        case allocation
        /// A context of the export's provider (`NBDMetaContext.key`).
        case provided(key: UInt64)
    }

    public var id: UInt32
    public var name: String
    public var kind: Kind

    public init(id: UInt32, name: String, kind: Kind) {
        self.id = id
        self.name = name
        self.kind = kind
    }
}

/// What transmission needs to know once the handshake ends.
public struct NBDSession: Equatable, Sendable {
    public var export: NBDExportDescription
    public var flags: NBDTransmissionFlags
    public var structuredReplies: Bool
    /// The contexts the client selected for this export, in id order; BLOCK_STATUS
    /// answers one chunk for each.
    public var metaContexts: [NBDSelectedMetaContext]

    public init(export: NBDExportDescription, flags: NBDTransmissionFlags, structuredReplies: Bool, metaContexts: [NBDSelectedMetaContext]) {
        self.export = export
        self.flags = flags
        self.structuredReplies = structuredReplies
        self.metaContexts = metaContexts
    }

    /// The id of `base:allocation` when the client selected it.
    public var allocationContextID: UInt32? {
        metaContexts.first { $0.kind == .allocation }?.id
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

    public enum State: Equatable, Sendable { case awaitingClientFlags, haggling, awaitingCatalog, transmission, closed }

    /// What the server must find out from its exports before the handshake goes on.
    public enum CatalogQuery: Equatable, Sendable {
        /// Describe one export ("" = the default export).
        case describe(String)
        /// Every export (NBD_OPT_LIST).
        case list
        /// Look the export up and open it for this connection (GO, EXPORT_NAME).
        case open(String)
        /// The metadata contexts besides `base:` that export `exportName` offers and that
        /// match `queries` (LIST_META_CONTEXT when `listing`, else SET_META_CONTEXT).
        /// Queries of namespaces the provider does not know are ignored.
        case metaContexts(exportName: String, queries: [String], listing: Bool)
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
        /// `metaContexts` found the export; these of its contexts match.
        case metaContexts([NBDMetaContext])
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
    /// The export named in the last SET_META_CONTEXT and the contexts it selected.
    private var metaContext: (exportName: String, selected: [NBDSelectedMetaContext])?
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
        case (.metaContext(let option, let query), .metaContexts(let provided)):
            return metaContextReplies(option, query, provided: provided)
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
            return ask(
                .metaContexts(exportName: query.exportName, queries: query.queries, listing: option == .listMetaContext),
                .metaContext(option, query))
        default:
            return [reply(option, .errUnsupported, "\(option) is not supported")]
        }
    }

    private func makeSession(_ export: NBDExportDescription, requestedName: String) -> NBDSession {
        let selected = metaContext.flatMap { $0.exportName == requestedName ? $0.selected : nil } ?? []
        return NBDSession(
            export: export, flags: export.transmissionFlags(structuredReplies: structuredReplies),
            structuredReplies: structuredReplies, metaContexts: selected)
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

    /// LIST/SET_META_CONTEXT replies once the export is known to exist: `base:allocation`
    /// when a query names it (or `base:` lists), then the provider's matching contexts.
    /// SET numbers them 1, 2, ... in that order; LIST sends id 0, as the spec asks.
    private mutating func metaContextReplies(_ option: NBDOption, _ query: NBDMetaContextQuery, provided: [NBDMetaContext]) -> [Action] {
        let listing = option == .listMetaContext
        let wantsAllocation =
            query.queries.contains { $0 == Self.allocationContext || (listing && $0 == "base:") } || (listing && query.queries.isEmpty)
        var chosen: [(name: String, kind: NBDSelectedMetaContext.Kind)] = wantsAllocation ? [(Self.allocationContext, .allocation)] : []
        for context in provided where !chosen.contains(where: { $0.name == context.name }) {
            chosen.append((context.name, .provided(key: context.key)))
        }
        var actions: [Action] = []
        var selected: [NBDSelectedMetaContext] = []
        for (index, context) in chosen.enumerated() {
            let id = listing ? 0 : UInt32(index + 1)
            var payload = ByteBuffer()
            payload.writeInteger(id)
            payload.writeString(context.name)
            actions.append(.send(NBDOptionReply(option: option, type: .metaContext, payload: payload)))
            selected.append(NBDSelectedMetaContext(id: id, name: context.name, kind: context.kind))
        }
        if !listing { metaContext = (query.exportName, selected) }
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
    /// `CatalogQuery.metaContexts`: nil when there is no such export. The default
    /// offers nothing besides `base:allocation`.
    func metaContexts(of exportName: String, matching queries: [String], listing: Bool) -> [NBDMetaContext]?
}

extension NBDExportCatalog {
    public func metaContexts(of exportName: String, matching queries: [String], listing: Bool) -> [NBDMetaContext]? {
        export(named: exportName) == nil ? nil : []
    }
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
            case .metaContexts(let name, let queries, let listing):
                found = catalog.metaContexts(of: name, matching: queries, listing: listing).map { .metaContexts($0) } ?? .notFound
            }
            actions += answer(found)
        }
        return actions
    }
}
