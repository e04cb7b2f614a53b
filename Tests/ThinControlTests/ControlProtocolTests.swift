import Testing
import ThinControl
import ThinPool
import ThinSystem

@Suite struct JSONTests {
    static let samples: [JSON] = [
        .null, .bool(true), .bool(false), .number(0), .number(UInt64.max), .string(""),
        .string("quote \" backslash \\ newline \n tab \t bell \u{07} é 𝄞"),
        .array([]), .object([]),
        .object([("a", .array([.number(1), .null, .object([("b", .string("c"))])])), ("z", .bool(false))]),
    ]

    @Test func roundTripsCompactAndPretty() throws {
        for value in Self.samples {
            #expect(try JSON.parse(value.rendered(pretty: false)) == value)
            #expect(try JSON.parse(value.rendered()) == value)
            #expect(!value.rendered(pretty: false).contains("\n"))
        }
    }

    @Test func rendersEscapesExactly() {
        #expect(JSON.string("a\"b\\c\n\u{1}").rendered() == "\"a\\\"b\\\\c\\n\\u0001\"")
        #expect(JSON.object([("k", .array([.number(1), .bool(true), .null]))]).rendered(pretty: false) == "{\"k\":[1,true,null]}")
    }

    @Test func readsEscapesAndSurrogatePairs() throws {
        #expect(try JSON.parse(#""\u00e9\ud834\udd1e\/\b\f""#) == .string("é𝄞/\u{08}\u{0C}"))
        #expect(try JSON.parse(" { \"k\" : [ 1 , 2 ] } ") == .object([("k", .array([.number(1), .number(2)]))]))
    }

    @Test func refusesMalformedInputWithItsPosition() {
        let bad = [
            "", "{", "[1,]", "{\"a\" 1}", "01", "-1", "1.5", "1e3", "18446744073709551616", "\"abc",
            "\"\\ud834\"", "\"\\x\"", "tru", "nul", "[1] 2", "\"\u{01}\"", String(repeating: "[", count: 100),
        ]
        for text in bad {
            #expect(throws: JSONParseError.self, "\(text)") { try JSON.parse(text) }
        }
        do {
            _ = try JSON.parse("[1, x]")
            Issue.record("accepted")
        } catch {
            #expect(error.offset == 4)
        }
    }
}

@Suite struct ControlMessageTests {
    static let commands: [ControlCommand] = [
        .hello, .info, .list, .check, .exports, .grow(size: 1 << 40),
        .createVolume(name: "vm", size: 10 << 30), .delete(name: "vm@s", force: true), .delete(name: "x", force: false),
        .rename(from: "a", to: "b"), .resize(name: "vm", size: 4096, force: true),
        .snapshot(name: "vm@golden", ifMissing: true), .clone(source: "vm@golden", name: "build-1", ifMissing: false),
        .rollback(snapshot: "vm@golden", force: true), .limits,
        .setLimit(ExportLimitRule(pattern: "build-*", operationsPerSecond: 1000, bytesPerSecond: 100 << 20)),
    ]

    @Test func commandsRoundTripThroughOneLine() throws {
        for command in Self.commands {
            let line = command.line
            #expect(line.hasSuffix("\n") && line.dropLast().firstIndex(of: "\n") == nil)
            #expect(try ControlCommand(line: String(line.dropLast())) == command)
        }
    }

    @Test func repliesRoundTrip() throws {
        let replies: [ControlReply] = [
            .success(.object([("created", .bool(true))])), .success(.null),
            .failure(ControlError(code: "in-use", message: "vm has 2 connected clients")),
        ]
        for reply in replies { #expect(try ControlReply(line: String(reply.line.dropLast())) == reply) }
    }

    @Test func badRequestsNameTheProblem() {
        let cases: [(String, String)] = [
            ("[]", "a request is a JSON object"),
            ("{}", "no \"command\""),
            ("{\"command\":\"explode\"}", "unknown command"),
            ("{\"command\":\"delete\"}", "needs \"name\""),
            ("{\"command\":\"grow\",\"size\":\"big\"}", "needs \"size\""),
            ("{\"command\":\"delete\",\"name\":\"v\",\"force\":1}", "\"force\" must be true or false"),
            ("{not json", "malformed JSON"),
        ]
        for (line, expected) in cases {
            do {
                _ = try ControlCommand(line: line)
                Issue.record("accepted \(line)")
            } catch {
                #expect(error.code == "invalid-request")
                #expect(error.message.contains(expected), "\(error.message)")
            }
        }
    }

    @Test func unknownKeysAreIgnoredForLaterVersions() throws {
        #expect(try ControlCommand(line: #"{"command":"snapshot","name":"v@s","if_missing":true,"comment":"ci"}"#) == .snapshot(name: "v@s", ifMissing: true))
    }
}

@Suite struct FramerTests {
    @Test func linesSurviveBeingFedOneByteAtATime() throws {
        let lines = ControlMessageTests.commands.map(\.line)
        var framer = ControlLineFramer()
        var out: [String] = []
        for byte in lines.joined().utf8 {
            framer.append([byte])
            while let line = try framer.nextLine() { out.append(line) }
        }
        #expect(out == lines.map { String($0.dropLast()) })
        #expect(framer.bufferedBytes == 0)
    }

    @Test func crLfAndManyLinesInOnePiece() throws {
        var framer = ControlLineFramer()
        framer.append(Array("a\r\nb\n\nc".utf8))
        #expect(try framer.nextLine() == "a")
        #expect(try framer.nextLine() == "b")
        #expect(try framer.nextLine() == "")
        #expect(try framer.nextLine() == nil)
        framer.append(Array("\n".utf8))
        #expect(try framer.nextLine() == "c")
    }

    @Test func endlessLinesAndBadUTF8AreRefused() throws {
        var framer = ControlLineFramer()
        framer.append([UInt8](repeating: UInt8(ascii: "x"), count: ControlLineFramer.maxLineBytes + 1))
        #expect(throws: ControlError.self) { try framer.nextLine() }
        var other = ControlLineFramer()
        other.append([0xFF, 0xFE, 0x0A])
        #expect(throws: ControlError.self) { try other.nextLine() }
    }
}

/// A stand-in for the server's side: counts and disconnects as the tests say.
final class FakeServedExports: ServedExports, @unchecked Sendable {
    var counts: [String: Int]
    var closedDuringBody: [String] = []
    var rules: [ExportLimitRule] = []
    init(_ counts: [String: Int]) { self.counts = counts }

    func setLimit(_ rule: ExportLimitRule) -> [ExportLimitRule] {
        rules.removeAll { $0.pattern == rule.pattern }
        rules.append(rule)
        return rules
    }

    func limits() -> [ExportLimitRule] { rules }

    func connectionCounts() -> [String: Int] { counts }
    var serverURIs: [String] { ["nbd+unix:///?socket=/tmp/x.sock"] }
    var metricsURL: String? { nil }
    func renamed(from old: String, to new: String) {
        if let count = counts.removeValue(forKey: old) { counts[new] = count }
    }

    func whileClosed(_ names: [String], disconnect: Bool, _ body: () throws(ControlError) -> Void) throws(ControlError) -> Int {
        let connected = names.reduce(0) { $0 + (counts[$1] ?? 0) }
        if connected > 0 && !disconnect { throw ControlError(code: "in-use", message: "busy") }
        for name in names { counts[name] = nil }
        closedDuringBody = names
        try body()
        return connected
    }
}

@Suite struct PoolCommandsTests {
    func makePool() throws -> Pool {
        try Pool.create(on: MemoryDevice(size: 0), geometry: PoolGeometry(dataSize: 4 << 20, blockSize: 4096, metadataSize: 4 << 20))
    }

    func ok(_ reply: ControlReply) throws -> JSON {
        guard case .success(let json) = reply else { throw ControlError(code: "test", message: "\(reply)") }
        return json
    }

    @Test func offlineCommandsDoWhatTheySay() throws {
        let pool = try makePool()
        let commands = PoolCommands(pool: pool, served: nil)
        let created = try ok(commands.perform(.createVolume(name: "vm", size: 1 << 20)))
        #expect(created["volume"]?["size"]?.numberValue == 1 << 20)
        #expect(try ok(commands.perform(.snapshot(name: "vm@a", ifMissing: false)))["created"] == .bool(true))
        #expect(try ok(commands.perform(.snapshot(name: "vm@a", ifMissing: true)))["created"] == .bool(false))
        #expect(try ok(commands.perform(.clone(source: "vm@a", name: "c", ifMissing: false)))["volume"]?["kind"] == .string("clone"))
        let list = try ok(commands.perform(.list)).arrayValue ?? []
        #expect(list.compactMap { $0["name"]?.stringValue } == ["c", "vm", "vm@a"])
        #expect(try ok(commands.perform(.rename(from: "c", to: "d")))["volume"]?["name"] == .string("d"))
        #expect(try ok(commands.perform(.resize(name: "vm", size: 4096, force: false)))["volume"]?["size"] == .number(4096))
        #expect(try ok(commands.perform(.rollback(snapshot: "vm@a", force: false)))["volume"]?["size"] == .number(1 << 20))
        #expect(try ok(commands.perform(.delete(name: "d", force: false)))["deleted"] == .string("d"))
        #expect(try ok(commands.perform(.check))["clean"] == .bool(true))
        #expect(try ok(commands.perform(.info))["served"] == .bool(false))
        guard case .failure(let error) = commands.perform(.exports) else { Issue.record("exports offline"); return }
        #expect(error.code == "not-served")
    }

    @Test func poolErrorsBecomeStableCodes() throws {
        let commands = PoolCommands(pool: try makePool(), served: nil)
        let cases: [(ControlCommand, String)] = [
            (.delete(name: "nope", force: false), "no-such-volume"),
            (.createVolume(name: "bad@name", size: 1), "invalid-argument"),
            (.createVolume(name: "v", size: 0), "invalid-argument"),
        ]
        for (command, code) in cases {
            guard case .failure(let error) = commands.perform(command) else { Issue.record("\(command) succeeded"); continue }
            #expect(error.code == code, "\(command): \(error)")
        }
        _ = commands.perform(.createVolume(name: "v", size: 4096))
        guard case .failure(let exists) = commands.perform(.createVolume(name: "v", size: 4096)) else { Issue.record("made twice"); return }
        #expect(exists.code == "exists")
    }

    @Test func servedVolumesWithClientsNeedForce() throws {
        let pool = try makePool()
        try pool.createVolume("vm", size: 1 << 20)
        try pool.snapshot("vm@s")
        let served = FakeServedExports(["vm": 2, "vm@s": 1])
        let commands = PoolCommands(pool: pool, served: served)
        for command in [ControlCommand.delete(name: "vm", force: false), .rollback(snapshot: "vm@s", force: false), .resize(name: "vm", size: 4096, force: false)] {
            guard case .failure(let error) = commands.perform(command) else { Issue.record("\(command) went ahead"); continue }
            #expect(error.code == "in-use")
        }
        #expect(try pool.volumeInfo("vm").size == 1 << 20)
        // Growing and renaming leave clients alone.
        #expect(try ok(commands.perform(.resize(name: "vm", size: 2 << 20, force: false)))["disconnected"] == .number(0))
        #expect(served.closedDuringBody.isEmpty)
        let info = try ok(commands.perform(.info))
        #expect(info["connections"] == .number(3))
        #expect(try ok(commands.perform(.rollback(snapshot: "vm@s", force: true)))["disconnected"] == .number(2))
        #expect(served.closedDuringBody == ["vm"])
        #expect(try ok(commands.perform(.delete(name: "vm@s", force: true)))["disconnected"] == .number(1))
        #expect(pool.check().isClean)
    }

    @Test func forceDisconnectsNobodyForARequestThatCannotSucceed() throws {
        let pool = try makePool()
        try pool.createVolume("vm", size: 1 << 20)
        let served = FakeServedExports(["vm": 2])
        let commands = PoolCommands(pool: pool, served: served)
        let hopeless: [(ControlCommand, String)] = [
            (.rollback(snapshot: "vm", force: true), "invalid-argument"),
            (.rollback(snapshot: "vm@missing", force: true), "no-such-volume"),
            (.resize(name: "vm", size: 0, force: true), "invalid-argument"),
            (.delete(name: "missing", force: true), "no-such-volume"),
        ]
        for (command, code) in hopeless {
            guard case .failure(let error) = commands.perform(command) else { Issue.record("\(command) succeeded"); continue }
            #expect(error.code == code, "\(command): \(error)")
        }
        #expect(served.closedDuringBody.isEmpty && served.counts["vm"] == 2, "clients were disconnected for nothing")
    }
}

@Suite struct HostileInputTests {
    /// Random and mutated input never crashes the parser or the framer; it is refused
    /// with an error or parsed.
    @Test func randomAndMutatedRequestsAreRefusedCleanly() {
        var rng = SystemRandomNumberGenerator()
        let seeds = ControlMessageTests.commands.map { Array($0.line.utf8) }
        for round in 0..<20_000 {
            var bytes: [UInt8]
            if round % 2 == 0 {
                bytes = (0..<Int.random(in: 0..<64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            } else {
                bytes = seeds[round % seeds.count]
                for _ in 0..<Int.random(in: 1...4, using: &rng) where !bytes.isEmpty {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
            }
            var framer = ControlLineFramer()
            framer.append(bytes + [0x0A])
            guard let line = try? framer.nextLine() else { continue }
            _ = try? ControlCommand(line: line)
            _ = try? JSON.parse(line)
        }
    }
}
