import FoundationEssentials
import Testing
@testable import ThinControl
import ThinPool
import ThinSystem

@Suite struct ControlMessageTests {
    static let commands: [ControlCommand] = [
        .hello, .info, .list, .check, .exports, .grow(size: 1 << 40),
        .createVolume(name: "vm", size: 10 << 30), .delete(name: "vm@s", force: true), .delete(name: "x", force: false),
        .rename(from: "a", to: "b"), .resize(name: "vm", size: 4096, force: true),
        .snapshot(name: "vm@golden", ifMissing: true), .clone(source: "vm@golden", name: "build-1", ifMissing: false),
        .rollback(snapshot: "vm@golden", force: true), .limits, .diff(from: "vm@golden", to: "vm"),
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
        let replies: [(ControlCommand, ControlReply)] = [
            (.snapshot(name: "v@s", ifMissing: true), .success(.snapshotOrClone(SnapshotCloneResult(created: true, volume: Samples.snapshot)))),
            (.list, .success(.volumes([]))),
            (.delete(name: "vm", force: false), .failure(ControlError(code: "in-use", message: "vm has 2 connected clients"))),
        ]
        for (command, reply) in replies {
            #expect(try ControlReply(line: String(reply.line.dropLast()), answering: command) == reply)
        }
    }

    @Test func badRepliesAreIOErrors() throws {
        let cases: [(String, String)] = [
            (#"{"result":[]}"#, #"has no "ok""#),
            (#"{"ok":"yes","result":[]}"#, #"has no "ok""#),
            ("[]", "reply to list"),
            ("{", "malformed JSON"),
            (#"{"ok":true}"#, "reply to list"),
            (#"{"ok":true,"result":[{"name":"vm"}]}"#, #""result[0].kind" is missing"#),
            (#"{"ok":true,"result":[{"name":"vm","kind":"volume","size":-1}]}"#, "reply to list"),
        ]
        for (line, expected) in cases {
            do {
                _ = try ControlReply(line: line, answering: .list)
                Issue.record("accepted \(line)")
            } catch {
                #expect(error.code == "io", "\(line)")
                #expect(error.message.contains(expected), "\(line): \(error.message)")
            }
        }
        // An error object with parts missing is still a failure.
        #expect(try ControlReply(line: #"{"ok":false}"#, answering: .list) == .failure(ControlError(code: "io", message: "the server gave no reason")))
        #expect(
            try ControlReply(line: #"{"ok":false,"error":{"message":"m"}}"#, answering: .list)
                == .failure(ControlError(code: "io", message: "m")))
    }

    @Test func badRequestsNameTheProblem() {
        let cases: [(String, String)] = [
            ("[]", "a request is a JSON object"),
            ("5", "a request is a JSON object"),
            ("{}", #"the request has no "command" string"#),
            (#"{"command":5}"#, #"the request has no "command" string"#),
            (#"{"command":"explode"}"#, #"unknown command "explode""#),
            (#"{"command":"delete"}"#, #"delete needs "name" (a string)"#),
            (#"{"command":"delete","name":7}"#, #"delete needs "name" (a string)"#),
            (#"{"command":"delete","name":null}"#, #"delete needs "name" (a string)"#),
            (#"{"command":"grow","size":"big"}"#, #"grow needs "size" (a whole number)"#),
            (#"{"command":"volume-create","name":"v"}"#, #"volume-create needs "size" (a whole number)"#),
            (#"{"command":"volume-create","name":"v","size":-1}"#, #"volume-create needs "size" (a whole number)"#),
            (#"{"command":"volume-create","name":"v","size":1.5}"#, #"volume-create needs "size" (a whole number)"#),
            (#"{"command":"resize","name":"v","size":18446744073709551616}"#, #"resize needs "size" (a whole number)"#),
            (#"{"command":"resize","name":"v","size":1e400}"#, #"resize needs "size" (a whole number)"#),
            (#"{"command":"limit","pattern":"p","iops":-5,"bytes_per_second":0}"#, #"limit needs "iops" (a whole number)"#),
            (#"{"command":"rename","name":"a"}"#, #"rename needs "new_name" (a string)"#),
            (#"{"command":"delete","name":"v","force":1}"#, #""force" must be true or false"#),
            (#"{"command":"snapshot","name":"v@s","if_missing":"yes"}"#, #""if_missing" must be true or false"#),
            ("{not json", "malformed JSON"),
            (#"{"command":"hello"} x"#, "malformed JSON"),
            ("", "malformed JSON"),
        ]
        for (line, expected) in cases {
            do {
                _ = try ControlCommand(line: line)
                Issue.record("accepted \(line)")
            } catch {
                #expect(error.code == "invalid-request")
                #expect(error.message.contains(expected), "\(line): \(error.message)")
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

    @Test func offlineCommandsDoWhatTheySay() throws {
        let pool = try makePool()
        let commands = PoolCommands(pool: pool, served: nil)
        let created = try commands.perform(.createVolume(name: "vm", size: 1 << 20)).result(as: VolumeCreateResult.self)
        #expect(created.volume.size == 1 << 20)
        #expect(try commands.perform(.snapshot(name: "vm@a", ifMissing: false)).result(as: SnapshotCloneResult.self).created)
        #expect(try !commands.perform(.snapshot(name: "vm@a", ifMissing: true)).result(as: SnapshotCloneResult.self).created)
        #expect(try commands.perform(.clone(source: "vm@a", name: "c", ifMissing: false)).result(as: SnapshotCloneResult.self).volume.kind == "clone")
        let list = try commands.perform(.list).result(as: [VolumeSummary].self)
        #expect(list.map(\.name) == ["c", "vm", "vm@a"])
        #expect(list.map(\.parent) == ["vm@a", nil, "vm"])
        #expect(try commands.perform(.rename(from: "c", to: "d")).result(as: RenameResult.self).volume.name == "d")
        #expect(try commands.perform(.resize(name: "vm", size: 4096, force: false)).result(as: ResizeResult.self).volume.size == 4096)
        #expect(try commands.perform(.rollback(snapshot: "vm@a", force: false)).result(as: RollbackResult.self).volume.size == 1 << 20)
        #expect(try commands.perform(.delete(name: "d", force: false)).result(as: DeleteResult.self).deleted == "d")
        #expect(try commands.perform(.check).result(as: CheckResult.self).clean)
        let info = try commands.perform(.info).result(as: PoolInfoResult.self)
        #expect(!info.served)
        #expect(info.volumes.map(\.name) == ["vm", "vm@a"])
        #expect(try commands.perform(.hello).result(as: HelloResult.self).metrics == nil)
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
        #expect(try commands.perform(.resize(name: "vm", size: 2 << 20, force: false)).result(as: ResizeResult.self).disconnected == 0)
        #expect(served.closedDuringBody.isEmpty)
        let info = try commands.perform(.info).result(as: PoolInfoResult.self)
        #expect(info.connections == 3)
        #expect(info.volumes.map(\.connections) == [2, 1])
        #expect(try commands.perform(.rollback(snapshot: "vm@s", force: true)).result(as: RollbackResult.self).disconnected == 2)
        #expect(served.closedDuringBody == ["vm"])
        #expect(try commands.perform(.delete(name: "vm@s", force: true)).result(as: DeleteResult.self).disconnected == 1)
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
    /// Random and mutated input never crashes the decoder or the framer; it is refused
    /// with an error or decoded.
    @Test func randomAndMutatedRequestsAreRefusedCleanly() {
        var rng = SystemRandomNumberGenerator()
        let seeds = ControlMessageTests.commands.map { Array($0.line.utf8) }
        var refused = 0
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
            do {
                _ = try ControlCommand(bytes: bytes)
            } catch {
                #expect(error.code == "invalid-request")
                refused += 1
            }
            var framer = ControlLineFramer()
            framer.append(bytes + [0x0A])
            guard let line = try? framer.nextLine() else { continue }
            _ = try? ControlCommand(line: line)
            for command in [ControlCommand.list, .hello, .info, .check] { _ = try? ControlReply(line: line, answering: command) }
        }
        #expect(refused > 10_000)
    }

    func expectRefused(_ bytes: [UInt8], _ expected: String, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            _ = try ControlCommand(bytes: bytes)
            Issue.record("accepted", sourceLocation: sourceLocation)
        } catch {
            #expect(error.code == "invalid-request", sourceLocation: sourceLocation)
            #expect(error.message.contains(expected), "\(error.message)", sourceLocation: sourceLocation)
        }
        for command in [ControlCommand.list, .hello] {
            #expect(throws: ControlError.self, sourceLocation: sourceLocation) {
                try ControlReply(line: String(decoding: bytes, as: UTF8.self), answering: command)
            }
        }
    }

    /// Nesting far deeper than any stack allows, open or closed, at the top or inside a
    /// key that would otherwise be ignored.
    @Test func deepNestingIsRefused() throws {
        let depth = 100_000
        expectRefused(Array(repeating: UInt8(ascii: "["), count: depth), "malformed JSON")
        expectRefused(Array((String(repeating: "[", count: depth) + String(repeating: "]", count: depth)).utf8), "malformed JSON")
        let ignoredKey = #"{"command":"hello","x":"# + String(repeating: "[", count: depth) + String(repeating: "]", count: depth) + "}"
        expectRefused(Array(ignoredKey.utf8), "malformed JSON")
        let objects = #"{"command":"hello","x":"# + String(repeating: #"{"a":"#, count: depth) + "1" + String(repeating: "}", count: depth) + "}"
        expectRefused(Array(objects.utf8), "malformed JSON")
        // Nesting a request needs is fine.
        #expect(try ControlCommand(line: #"{"command":"hello","x":[[[{"a":[1]}]]]}"#) == .hello)
    }

    @Test func hugeNumbersAreRefused() throws {
        let numbers = [
            "1e400", "-1e400", "99999999999999999999999999999999999999", "18446744073709551616", String(repeating: "9", count: 100_000),
            "-1", "0.5", "-0.5e-7",
        ]
        for number in numbers {
            expectRefused(Array(#"{"command":"grow","size":\#(number)}"#.utf8), #"grow needs "size" (a whole number)"#)
        }
        #expect(try ControlCommand(line: #"{"command":"grow","size":18446744073709551615}"#) == .grow(size: UInt64.max))
    }

    @Test func invalidUTF8IsRefused() {
        let cases: [[UInt8]] = [
            [0xFF, 0xFE],
            Array(#"{"command":"delete","name":""#.utf8) + [0xC3] + Array(#""}"#.utf8),
            // In a key the decoder would skip.
            Array(#"{"command":"hello","x":""#.utf8) + [0xED, 0xA0, 0x80] + Array(#""}"#.utf8),
            Array(#"{"command":"hello"}"#.utf8) + [0x80],
        ]
        for bytes in cases { expectRefused(bytes, "a request is UTF-8 text") }
        // Escapes that spell no character are refused too.
        expectRefused(Array(#"{"command":"delete","name":"\ud834"}"#.utf8), #"delete needs "name" (a string)"#)
    }

    /// Lines as long as the framer lets through.
    @Test func oneMebibyteLinesAreHandled() throws {
        let filler = String(repeating: "a", count: ControlLineFramer.maxLineBytes - 64)
        let long = #"{"command":"delete","name":"\#(filler)"}"#
        #expect(long.utf8.count <= ControlLineFramer.maxLineBytes)
        #expect(try ControlCommand(line: long) == .delete(name: filler, force: false))
        expectRefused(Array(String(repeating: "x", count: ControlLineFramer.maxLineBytes).utf8), "malformed JSON")
        expectRefused(Array(String(repeating: "{", count: ControlLineFramer.maxLineBytes).utf8), "malformed JSON")
        expectRefused(Array(("[" + String(repeating: "1,", count: ControlLineFramer.maxLineBytes / 2 - 1) + "1]").utf8), "a request is a JSON object")
    }
}
