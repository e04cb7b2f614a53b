import NBDProtocol
import NIOCore
import Testing

struct FixedCatalog: NBDExportCatalog {
    var exports: [NBDExportDescription]
    var defaultName: String?
    func export(named name: String) -> NBDExportDescription? {
        let resolved = name.isEmpty ? defaultName : name
        return exports.first { $0.name == resolved }
    }
    func allExports() -> [NBDExportDescription] { exports }
}

let catalog = FixedCatalog(
    exports: [
        NBDExportDescription(name: "disk", size: 1 << 30, isReadOnly: false, description: "thin volume", preferredBlockSize: 65536),
        NBDExportDescription(name: "disk@s", size: 1 << 30, isReadOnly: true, description: "snapshot"),
    ], defaultName: nil)

func option(_ option: NBDOption, _ fill: (inout ByteBuffer) -> Void = { _ in }) -> NBDServerParser.Message {
    var payload = ByteBuffer()
    fill(&payload)
    return .option(NBDOptionRequest(option: option, payload: payload))
}

func replyTypes(_ actions: [NBDHandshake.Action]) -> [NBDOptionReplyType] {
    actions.compactMap { if case .send(let r) = $0 { r.type } else { nil } }
}

@Suite struct HandshakeTests {
    func started() -> NBDHandshake {
        var h = NBDHandshake()
        #expect(h.receive(.clientFlags([.fixedNewstyle, .noZeroes]), catalog: catalog).isEmpty)
        return h
    }

    @Test func unknownClientFlagsClose() {
        var h = NBDHandshake()
        let actions = h.receive(.clientFlags(NBDClientFlags(rawValue: 0x80)), catalog: catalog)
        #expect(h.state == .closed)
        guard case .close = actions.first else { Issue.record("expected close"); return }
    }

    @Test func goEntersTransmissionWithInfoAndFlags() {
        var h = started()
        #expect(replyTypes(h.receive(option(.structuredReply), catalog: catalog)) == [.ack])
        let setMeta = h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["base:allocation"])) }, catalog: catalog)
        #expect(replyTypes(setMeta) == [.metaContext, .ack])
        let actions = h.receive(option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: "disk", infoRequests: [.name, .description, .blockSize])) }, catalog: catalog)
        #expect(replyTypes(actions) == [.info, .info, .info, .info, .ack])
        guard case .enterTransmission(let session) = actions.last else {
            Issue.record("GO did not enter transmission")
            return
        }
        #expect(h.state == .transmission)
        #expect(session.structuredReplies)
        #expect(session.allocationContextID != nil)
        #expect(session.flags.isSuperset(of: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendDF, .canMultiConn, .sendCache, .sendFastZero]))
        #expect(!session.flags.contains(.readOnly))
    }

    @Test func readOnlyExportsAdvertiseNoWrites() {
        var h = started()
        let actions = h.receive(option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: "disk@s", infoRequests: [])) }, catalog: catalog)
        guard case .enterTransmission(let session) = actions.last else { Issue.record("no transmission"); return }
        #expect(session.flags.contains(.readOnly))
        #expect(!session.flags.contains(.sendTrim) && !session.flags.contains(.sendWriteZeroes))
        #expect(!session.flags.contains(.sendDF), "DF needs structured replies")
        #expect(session.allocationContextID == nil)
    }

    @Test func unknownExportsAndMalformedOptionsAreErrorsNotDisconnects() {
        var h = started()
        #expect(replyTypes(h.receive(option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: "nope", infoRequests: [])) }, catalog: catalog)) == [.errUnknown])
        #expect(replyTypes(h.receive(option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: "", infoRequests: [])) }, catalog: catalog)) == [.errUnknown])
        #expect(replyTypes(h.receive(option(.info) { $0.writeString("garbage") }, catalog: catalog)) == [.errInvalid])
        #expect(replyTypes(h.receive(option(.list) { $0.writeString("x") }, catalog: catalog)) == [.errInvalid])
        #expect(replyTypes(h.receive(option(NBDOption(rawValue: 77)), catalog: catalog)) == [.errUnsupported])
        #expect(replyTypes(h.receive(option(.startTLS), catalog: catalog)) == [.errUnsupported])
        #expect(replyTypes(h.receive(option(.extendedHeaders), catalog: catalog)) == [.errUnsupported])
        #expect(replyTypes(h.receive(.oversizedOption(.list, length: 1 << 20), catalog: catalog)) == [.errTooBig])
        // Metadata contexts need structured replies first.
        #expect(replyTypes(h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["base:allocation"])) }, catalog: catalog)) == [.errInvalid])
        #expect(h.state == .haggling)
    }

    @Test func listAndMetaContextQueries() {
        var h = started()
        #expect(replyTypes(h.receive(option(.list), catalog: catalog)) == [.server, .server, .ack])
        _ = h.receive(option(.structuredReply), catalog: catalog)
        #expect(replyTypes(h.receive(option(.structuredReply), catalog: catalog)) == [.errInvalid])
        let all = h.receive(option(.listMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: [])) }, catalog: catalog)
        #expect(replyTypes(all) == [.metaContext, .ack])
        let wildcard = h.receive(option(.listMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["base:"])) }, catalog: catalog)
        #expect(replyTypes(wildcard) == [.metaContext, .ack])
        let other = h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["qemu:dirty-bitmap:x"])) }, catalog: catalog)
        #expect(replyTypes(other) == [.ack])
        let noColon = h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["nonsense"])) }, catalog: catalog)
        #expect(replyTypes(noColon) == [.errInvalid])
    }

    @Test func metaContextOnlyAppliesToTheExportItNamed() {
        var h = started()
        _ = h.receive(option(.structuredReply), catalog: catalog)
        _ = h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk@s", queries: ["base:allocation"])) }, catalog: catalog)
        let actions = h.receive(option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: "disk", infoRequests: [])) }, catalog: catalog)
        guard case .enterTransmission(let session) = actions.last else { Issue.record("no transmission"); return }
        #expect(session.allocationContextID == nil)
    }

    @Test func exportNameAnswersWithoutPaddingWhenAgreed() {
        var h = started()
        let actions = h.receive(option(.exportName) { $0.writeString("disk") }, catalog: catalog)
        #expect(actions.first == .sendExportName(NBDExportNameReply(size: 1 << 30, flags: catalog.exports[0].transmissionFlags(structuredReplies: false), padded: false)))
        var unknown = started()
        guard case .close = unknown.receive(option(.exportName) { $0.writeString("zzz") }, catalog: catalog).first else {
            Issue.record("unknown EXPORT_NAME must close")
            return
        }
    }

    @Test func abortAndShutdown() {
        var h = started()
        h.isShuttingDown = true
        #expect(replyTypes(h.receive(option(.list), catalog: catalog)) == [.errShutdown])
        let abort = h.receive(option(.abort), catalog: catalog)
        #expect(replyTypes(abort) == [.ack])
        #expect(h.state == .closed)
    }

    // MARK: The catalog is asked, never called

    func go(_ name: String) -> NBDServerParser.Message {
        option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: name, infoRequests: [])) }
    }

    @Test func optionsThatNeedExportsAskAndWait() {
        var h = started()
        #expect(h.receive(go("disk")) == [.ask(.open("disk"))])
        #expect(h.state == .awaitingCatalog)
        #expect(!h.acceptsMessages)
        let actions = h.answer(.found(catalog.exports[0]))
        #expect(replyTypes(actions) == [.info, .info, .ack])
        guard case .enterTransmission = actions.last else { Issue.record("no transmission"); return }

        var i = started()
        #expect(i.receive(option(.info) { $0.writeNBDExportQuery(NBDExportQuery(name: "", infoRequests: [])) }) == [.ask(.describe(""))])
        #expect(replyTypes(i.answer(.notFound)) == [.errUnknown])
        #expect(i.state == .haggling && i.acceptsMessages)
        #expect(i.receive(option(.list)) == [.ask(.list)])
        #expect(replyTypes(i.answer(.exports(catalog.exports))) == [.server, .server, .ack])
        #expect(i.receive(option(.exportName) { $0.writeString("disk") }) == [.ask(.open("disk"))])
    }

    @Test func aRefusedOpenIsAnErrorAndHagglingGoesOn() {
        var h = started()
        _ = h.receive(go("build-1"))
        #expect(replyTypes(h.answer(.refused("build-1 is being changed", shuttingDown: false))) == [.errUnknown])
        #expect(h.state == .haggling)
        _ = h.receive(go("build-1"))
        #expect(replyTypes(h.answer(.refused("server is shutting down", shuttingDown: true))) == [.errShutdown])
        #expect(h.state == .haggling)
        // EXPORT_NAME has no way to report an error: a refusal closes.
        _ = h.receive(option(.exportName) { $0.writeString("build-1") })
        guard case .close = h.answer(.refused("busy", shuttingDown: false)).first else {
            Issue.record("a refused EXPORT_NAME must close")
            return
        }
        #expect(h.state == .closed)
    }

    @Test func answersOutOfTurnAndMessagesWhileAskingClose() {
        var unasked = started()
        guard case .close = unasked.answer(.notFound).first else { Issue.record("an unasked answer must close"); return }
        var mismatched = started()
        _ = mismatched.receive(option(.list))
        guard case .close = mismatched.answer(.found(catalog.exports[0])).first else {
            Issue.record("an answer of the wrong kind must close")
            return
        }
        var early = started()
        _ = early.receive(go("disk"))
        guard case .close = early.receive(option(.list)).first else {
            Issue.record("a message while asking must close")
            return
        }
    }

    @Test func metaContextsAskWhetherTheExportExists() {
        var h = started()
        _ = h.receive(option(.structuredReply))
        let query = NBDMetaContextQuery(exportName: "gone", queries: ["base:allocation"])
        #expect(
            h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(query) })
                == [.ask(.metaContexts(exportName: "gone", queries: ["base:allocation"], listing: false))])
        #expect(replyTypes(h.answer(.notFound)) == [.errUnknown])
        _ = h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["base:allocation"])) })
        #expect(replyTypes(h.answer(.metaContexts([]))) == [.metaContext, .ack])
    }
}

/// A catalog whose exports offer `x-test:changed:NAME` for every other export NAME.
struct ContextCatalog: NBDExportCatalog {
    var inner = catalog
    func export(named name: String) -> NBDExportDescription? { inner.export(named: name) }
    func allExports() -> [NBDExportDescription] { inner.allExports() }
    func metaContexts(of exportName: String, matching queries: [String], listing: Bool) -> [NBDMetaContext]? {
        guard export(named: exportName) != nil else { return nil }
        let offered = inner.exports.enumerated().filter { $0.element.name != exportName }.map {
            NBDMetaContext(name: "x-test:changed:\($0.element.name)", key: UInt64($0.offset + 100))
        }
        return offered.filter { context in
            queries.contains { $0 == context.name || (listing && context.name.hasPrefix($0) && $0.hasSuffix(":")) } || (listing && queries.isEmpty)
        }
    }
}

@Suite struct MetaContextSelectionTests {
    func negotiated() -> NBDHandshake {
        var h = NBDHandshake()
        _ = h.receive(.clientFlags([.fixedNewstyle, .noZeroes]))
        _ = h.receive(option(.structuredReply))
        return h
    }

    func contexts(_ actions: [NBDHandshake.Action]) -> [(id: UInt32, name: String)] {
        actions.compactMap { action in
            guard case .send(let reply) = action, reply.type == .metaContext else { return nil }
            var payload = reply.payload
            guard let id = payload.readInteger(as: UInt32.self), let name = payload.readString(length: payload.readableBytes) else { return nil }
            return (id, name)
        }
    }

    @Test func setNumbersEveryContextAndTheSessionCarriesThemAll() {
        var h = negotiated()
        let query = NBDMetaContextQuery(exportName: "disk", queries: ["x-test:changed:disk@s", "base:allocation", "x-test:changed:disk@s"])
        let set = h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(query) }, catalog: ContextCatalog())
        let replied = contexts(set)
        #expect(replied.map(\.name) == ["base:allocation", "x-test:changed:disk@s"], "a context asked for twice is selected once")
        #expect(replied.map(\.id) == [1, 2])
        let go = h.receive(option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: "disk", infoRequests: [])) }, catalog: ContextCatalog())
        guard case .enterTransmission(let session) = go.last else { Issue.record("no transmission"); return }
        #expect(session.metaContexts == [
            NBDSelectedMetaContext(id: 1, name: "base:allocation", kind: .allocation),
            NBDSelectedMetaContext(id: 2, name: "x-test:changed:disk@s", kind: .provided(key: 101)),
        ])
        #expect(session.allocationContextID == 1)
    }

    @Test func listSendsIdZeroAndEveryContextForAnEmptyQuery() {
        var h = negotiated()
        let all = contexts(h.receive(option(.listMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: [])) }, catalog: ContextCatalog()))
        #expect(all.map(\.name) == ["base:allocation", "x-test:changed:disk@s"])
        #expect(all.allSatisfy { $0.id == 0 })
        let prefix = contexts(h.receive(option(.listMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["x-test:changed:"])) }, catalog: ContextCatalog()))
        #expect(prefix.map(\.name) == ["x-test:changed:disk@s"])
    }

    @Test func aProvidedContextAloneAdmitsBlockStatusAndASecondSetReplacesTheFirst() {
        var h = negotiated()
        _ = h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk@s", queries: ["x-test:changed:disk"])) }, catalog: ContextCatalog())
        let unknown = h.receive(option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk@s", queries: ["x-test:changed:nope"])) }, catalog: ContextCatalog())
        #expect(replyTypes(unknown) == [.ack], "an unknown leaf selects nothing and is not an error")
        let go = h.receive(option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: "disk@s", infoRequests: [])) }, catalog: ContextCatalog())
        guard case .enterTransmission(let session) = go.last else { Issue.record("no transmission"); return }
        #expect(session.metaContexts.isEmpty, "the last SET_META_CONTEXT is what counts")
    }
}

@Suite struct HandshakeTLSTests {
    func started(_ mode: NBDTLSMode) -> NBDHandshake {
        var h = NBDHandshake(tlsMode: mode)
        #expect(h.receive(.clientFlags([.fixedNewstyle, .noZeroes]), catalog: catalog).isEmpty)
        return h
    }

    func go(_ name: String) -> NBDServerParser.Message {
        option(.go) { $0.writeNBDExportQuery(NBDExportQuery(name: name, infoRequests: [])) }
    }

    /// STARTTLS is acknowledged, then the connection switches: the ack comes first.
    func startTLS(_ h: inout NBDHandshake) {
        let actions = h.receive(option(.startTLS), catalog: catalog)
        #expect(replyTypes(actions) == [.ack])
        guard actions.count == 2, case .startTLS = actions[1] else {
            Issue.record("expected the acknowledgement, then .startTLS: \(actions)")
            return
        }
        #expect(h.isTLSActive)
    }

    @Test func requireRefusesEveryOptionButStartTLSAndAbortInPlainText() {
        var h = started(.require)
        for message in [
            option(.list), go("disk"), option(.info) { $0.writeNBDExportQuery(NBDExportQuery(name: "disk", infoRequests: [])) },
            option(.structuredReply), option(NBDOption(rawValue: 77)),
            option(.setMetaContext) { $0.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["base:allocation"])) },
        ] {
            let actions = h.receive(message, catalog: catalog)
            #expect(replyTypes(actions) == [.errTLSRequired], "\(message)")
            // Nothing about the exports leaks: no entry, no info, no transmission.
            #expect(actions.count == 1)
        }
        #expect(h.state == .haggling)
        // EXPORT_NAME cannot be refused with an error: the connection ends.
        var plain = started(.require)
        let dropped = plain.receive(option(.exportName) { $0.writeString("disk") }, catalog: catalog)
        #expect(plain.state == .closed && replyTypes(dropped).isEmpty)
        guard case .close = dropped.last else { Issue.record("expected close: \(dropped)"); return }
        // ABORT is answered as usual.
        var aborting = started(.require)
        #expect(replyTypes(aborting.receive(option(.abort), catalog: catalog)) == [.ack])
        #expect(aborting.state == .closed)
    }

    @Test func requireServesEverythingOnceTLSIsUp() {
        var h = started(.require)
        startTLS(&h)
        #expect(replyTypes(h.receive(option(.list), catalog: catalog)) == [.server, .server, .ack])
        // A second STARTTLS, or one with data, is invalid; never TLS_REQD after TLS.
        #expect(replyTypes(h.receive(option(.startTLS), catalog: catalog)) == [.errInvalid])
        #expect(replyTypes(h.receive(option(.startTLS) { $0.writeInteger(UInt8(1)) }, catalog: catalog)) == [.errInvalid])
        #expect(replyTypes(h.receive(option(NBDOption(rawValue: 77)), catalog: catalog)) == [.errUnsupported])
        let actions = h.receive(go("disk"), catalog: catalog)
        guard case .enterTransmission = actions.last else { Issue.record("no transmission: \(actions)"); return }
    }

    @Test func onAllowsPlainTextAndForgetsWhatWasNegotiatedBeforeTLS() {
        var plain = started(.on)
        #expect(replyTypes(plain.receive(option(.list), catalog: catalog)) == [.server, .server, .ack])
        #expect(replyTypes(plain.receive(option(.structuredReply), catalog: catalog)) == [.ack])
        startTLS(&plain)
        // Structured replies negotiated in plain text are off again until asked over TLS.
        let actions = plain.receive(go("disk"), catalog: catalog)
        guard case .enterTransmission(let session) = actions.last else { Issue.record("no transmission"); return }
        #expect(!session.structuredReplies)

        var again = started(.on)
        #expect(replyTypes(again.receive(option(.startTLS) { $0.writeString("x") }, catalog: catalog)) == [.errInvalid])
        #expect(!again.isTLSActive)
    }

    @Test func offAnswersStartTLSUnsupported() {
        var h = started(.off)
        #expect(replyTypes(h.receive(option(.startTLS), catalog: catalog)) == [.errUnsupported])
        #expect(!h.isTLSActive)
        #expect(replyTypes(h.receive(option(.list), catalog: catalog)) == [.server, .server, .ack])
    }
}
