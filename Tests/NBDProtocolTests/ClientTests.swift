import NBDProtocol
import NIOCore
import Testing

@Suite struct NBDURIParsingTests {
    @Test func parsesTheURIsServersPrint() throws {
        #expect(try NBDEndpoint(uri: "nbd://127.0.0.1:10810/disk") == NBDEndpoint(address: .tcp(host: "127.0.0.1", port: 10810), export: "disk"))
        #expect(try NBDEndpoint(uri: "nbd://example.org") == NBDEndpoint(address: .tcp(host: "example.org", port: 10809), export: ""))
        #expect(try NBDEndpoint(uri: "nbd://[::1]:999/a%20b") == NBDEndpoint(address: .tcp(host: "::1", port: 999), export: "a b"))
        #expect(try NBDEndpoint(uri: "nbd+unix:///vm@snap?socket=/run/x%20y.sock")
            == NBDEndpoint(address: .unix(path: "/run/x y.sock"), export: "vm@snap"))
        // What the server prints round-trips.
        for (socket, export) in [("/tmp/nbd.sock", "build-1"), ("/a b/c.sock", "vm@golden")] {
            #expect(try NBDEndpoint(uri: NBDURI.unix(socket: socket, export: export)) == NBDEndpoint(address: .unix(path: socket), export: export))
        }
        #expect(try NBDEndpoint(uri: NBDURI.tcp(host: "::1", port: 10809, export: "d")) == NBDEndpoint(address: .tcp(host: "::1", port: 10809), export: "d"))
    }

    @Test func parsesTLSSchemesAndLibnbdParameters() throws {
        let tcp = try NBDEndpoint(uri: "nbds://h:10810/disk?tls-certificates=/etc/pki/a%20b&tls-username=ci")
        #expect(tcp.address == .tcp(host: "h", port: 10810))
        #expect(tcp.export == "disk" && tcp.requiresTLS)
        #expect(tcp.tlsCertificates == "/etc/pki/a b" && tcp.tlsUsername == "ci" && tcp.tlsPSKFile == nil)
        let unix = try NBDEndpoint(uri: "nbds+unix:///vm?tls-psk-file=/k.psk&socket=/run/s.sock")
        #expect(unix.address == .unix(path: "/run/s.sock") && unix.export == "vm" && unix.requiresTLS)
        #expect(unix.tlsPSKFile == "/k.psk")
        #expect(try !NBDEndpoint(uri: "nbd://h/x").requiresTLS)
        // What a server that requires TLS prints round-trips.
        #expect(try NBDEndpoint(uri: NBDURI.unix(socket: "/s", export: "e", tls: true)).requiresTLS)
        #expect(try NBDEndpoint(uri: NBDURI.tcp(host: "::1", port: 1, export: "e", tls: true)) == NBDEndpoint(address: .tcp(host: "::1", port: 1), export: "e", requiresTLS: true))
    }

    @Test func refusesWhatItCannotReach() {
        for bad in ["/tmp/file.raw", "nbd+vsock:///x", "nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd://h:0/x", "nbd://h:99999/x", "nbd://h/%zz"] {
            #expect(throws: NBDURIError.self, "\(bad)") { try NBDEndpoint(uri: bad) }
        }
    }
}

@Suite struct ClientHandshakeTests {
    /// Runs the client state machine against the server's parser and state machine,
    /// moving one byte at a time in each direction. Both sides' STARTTLS switches are
    /// counted (the bytes stay plain here: the state machines are what is tested).
    func negotiate(
        _ name: String, requireTLS: Bool = false, serverTLS: NBDTLSMode = .off, switches: UnsafeMutablePointer<Int>? = nil,
        wantsAllocation: Bool = false
    ) throws(NBDClientError) -> NBDClientHandshake.Export? {
        var client = NBDClientHandshake(exportName: name, requireTLS: requireTLS, wantsAllocation: wantsAllocation)
        var server = NBDHandshake(tlsMode: serverTLS)
        var parser = NBDServerParser()
        var toClient = NBDHandshake.greeting()
        var toServer = ByteBuffer()
        var clientInput = ByteBuffer()
        var serverInput = ByteBuffer()
        for _ in 0..<100_000 {
            if let byte = toClient.readInteger(as: UInt8.self) {
                clientInput.writeInteger(byte)
                for action in try client.receive(&clientInput) {
                    switch action {
                    case .send(var bytes): toServer.writeBuffer(&bytes)
                    case .startTLS:
                        // The server sent nothing after its acknowledgement.
                        #expect(toClient.readableBytes == 0 && clientInput.readableBytes == 0)
                        switches?.pointee += 1
                    case .ready(let export): return export
                    }
                }
            }
            if let byte = toServer.readInteger(as: UInt8.self) {
                serverInput.writeInteger(byte)
                while let message = try? parser.next(&serverInput) {
                    for action in server.receive(message, catalog: catalog) {
                        switch action {
                        case .send(let reply): toClient.writeNBDOptionReply(reply)
                        case .sendExportName(let reply): toClient.writeNBDExportNameReply(reply)
                        case .enterTransmission: parser.enterTransmission()
                        case .close: return nil
                        case .ask: Issue.record("receive(_:catalog:) left a query unanswered")
                        case .startTLS:
                            #expect(requireTLS, "STARTTLS from a client that does not ask for it")
                            switches?.pointee += 1
                        }
                    }
                }
            }
        }
        Issue.record("the handshake did not finish")
        return nil
    }

    @Test func negotiatesStructuredRepliesSizeFlagsAndBlockSize() throws {
        let export = try #require(try negotiate("disk"))
        #expect(export.size == 1 << 30)
        #expect(export.structuredReplies)
        #expect(!export.isReadOnly && export.flags.contains(.sendFlush) && export.flags.contains(.canMultiConn))
        #expect(export.preferredBlockSize == 65536)
        #expect(export.maximumBlockSize == 32 << 20)
        #expect(try #require(try negotiate("disk@s")).isReadOnly)
    }

    @Test func selectsBaseAllocationWhenAskedAndGoesOnWithoutIt() throws {
        let export = try #require(try negotiate("disk", wantsAllocation: true))
        #expect(export.allocationContextID != nil && export.size == 1 << 30)
        #expect(try #require(try negotiate("disk")).allocationContextID == nil, "not asked, not selected")
        // A server that answers SET_META_CONTEXT with an error: no context, and GO follows.
        var client = NBDClientHandshake(exportName: "disk", wantsAllocation: true)
        var input = NBDHandshake.greeting()
        _ = try client.receive(&input)
        var replies = ByteBuffer()
        replies.writeNBDOptionReply(NBDOptionReply(option: .structuredReply, type: .ack))
        var afterStructured = try client.receive(&replies)
        guard case .send(var setMeta) = afterStructured.removeFirst() else { Issue.record("no SET_META_CONTEXT"); return }
        #expect(setMeta.readableBytes > 16 && setMeta.getInteger(at: setMeta.readerIndex + 8, as: UInt32.self) == 10, "NBD_OPT_SET_META_CONTEXT")
        setMeta.clear()
        replies.writeNBDOptionReply(NBDOptionReply(option: .setMetaContext, type: .errUnknown))
        guard case .send(var go) = try client.receive(&replies).first else { Issue.record("no GO after the refusal"); return }
        #expect(go.getInteger(at: go.readerIndex + 8, as: UInt32.self) == 7, "NBD_OPT_GO")
        go.clear()
    }

    @Test func tlsComesFirstAndIsNeverSkipped() throws {
        var switches = 0
        for mode in [NBDTLSMode.on, .require] {
            switches = 0
            let export = try #require(try negotiate("disk", requireTLS: true, serverTLS: mode, switches: &switches))
            #expect(export.size == 1 << 30 && export.structuredReplies)
            #expect(switches == 2, "client and server each switch once")
        }
        // A server without TLS: the client stops; it never goes on in plain text.
        do {
            _ = try negotiate("disk", requireTLS: true, serverTLS: .off)
            Issue.record("went on without TLS")
        } catch {
            #expect(error.description.contains("refused TLS"), "\(error)")
        }
        // A client without TLS against a server that requires it is told why.
        do {
            _ = try negotiate("disk", serverTLS: .require)
            Issue.record("negotiated in plain text with a server that requires TLS")
        } catch {
            #expect(error.description.contains("requires TLS"), "\(error)")
        }
    }

    @Test func bytesAfterTheStartTLSAcknowledgementAreRefused() throws {
        var client = NBDClientHandshake(exportName: "disk", requireTLS: true)
        var input = NBDHandshake.greeting()
        _ = try client.receive(&input)
        var reply = ByteBuffer()
        reply.writeNBDOptionReply(NBDOptionReply(option: .startTLS, type: .ack, payload: ByteBuffer()))
        reply.writeString("injected")
        #expect(throws: NBDClientError.self) { try client.receive(&reply) }
    }

    @Test func unknownExportsFailWithTheirName() {
        do {
            _ = try negotiate("nope")
            Issue.record("negotiated an unknown export")
        } catch {
            #expect(error.description.contains("no export named 'nope'"), "\(error)")
        }
    }

    @Test func notAnNBDServerIsSaidSo() {
        var client = NBDClientHandshake(exportName: "x")
        var input = ByteBuffer(string: "SSH-2.0-OpenSSH_9.6\r\n")
        #expect(throws: NBDClientError.self) { try client.receive(&input) }
    }
}

@Suite struct HostileServerTests {
    /// A server that sends garbage (random, or a real handshake with bytes flipped) makes
    /// the client's handshake fail with an error, never crash or loop.
    @Test func garbageFromTheServerIsAnError() {
        var rng = SystemRandomNumberGenerator()
        var real = NBDHandshake.greeting()
        var reply = ByteBuffer()
        reply.writeInteger(UInt16(0))  // NBD_INFO_EXPORT
        reply.writeInteger(UInt64(1 << 20))
        reply.writeInteger(UInt16(1))
        real.writeNBDOptionReply(NBDOptionReply(option: .structuredReply, type: .ack))
        real.writeNBDOptionReply(NBDOptionReply(option: .go, type: .info, payload: reply))
        real.writeNBDOptionReply(NBDOptionReply(option: .go, type: .ack))
        let realBytes = Array(real.readableBytesView)
        for round in 0..<20_000 {
            var bytes: [UInt8]
            if round % 2 == 0 {
                bytes = (0..<Int.random(in: 0..<200, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            } else {
                bytes = realBytes
                for _ in 0..<Int.random(in: 1...3, using: &rng) {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
            }
            var client = NBDClientHandshake(exportName: "disk")
            var input = ByteBuffer(bytes: bytes)
            _ = try? client.receive(&input)
        }
        // And the unmutated handshake does finish.
        var client = NBDClientHandshake(exportName: "disk")
        var input = ByteBuffer(bytes: realBytes)
        let actions = (try? client.receive(&input)) ?? []
        #expect(actions.contains { if case .ready(let export) = $0 { export.size == 1 << 20 } else { false } })
    }
}
