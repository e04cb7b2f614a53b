import FoundationEssentials
import Testing
@testable import ThinControl
import ThinPool
import ThinSystem

/// Sample results: every result type, with null and non-null optionals.
enum Samples {
    static let volume = VolumeSummary(
        name: "vm", kind: "volume", size: 1 << 30, mappedBytes: 65536, parent: nil, readOnly: false, ephemeral: false,
        created: 1_795_300_000, connections: 2, uuid: "6c8b61fd-7f77-4d85-9c8d-c00a4a0a1da8")
    static let snapshot = VolumeSummary(
        name: "vm@s", kind: "snapshot", size: 1 << 30, mappedBytes: 0, parent: "vm", readOnly: true, ephemeral: false,
        created: 1_795_300_001, connections: 0)
    static let clone = VolumeSummary(
        name: "build-1", kind: "clone", size: 1 << 30, mappedBytes: 4096, parent: "vm@s", readOnly: false, ephemeral: true,
        created: 1_795_300_002, connections: 1)
    static let volumeLine =
        #"{"connections":2,"created":1795300000,"ephemeral":false,"kind":"volume","mapped_bytes":65536,"name":"vm","origin":null,"parent":null,"read_only":false,"size":1073741824,"uuid":"6c8b61fd-7f77-4d85-9c8d-c00a4a0a1da8"}"#

    static func info(allocated: UInt64?) -> PoolInfoResult {
        PoolInfoResult(
            path: "/p", uuid: "u", engine: "libaio+O_DIRECT", served: true, blockSize: 65536, totalBytes: 1 << 30,
            usedBytes: 65536, freeBytes: (1 << 30) - 65536,
            metadata: .init(totalBytes: 16 << 20, usedBytes: 16384, freeBytes: (16 << 20) - 16384), fileBytes: 1_091_567_616,
            allocatedFileBytes: allocated, generation: 7, connections: 2, volumes: [volume], state: "ok", failure: nil)
    }

    static func hello(metrics: String?, file: (device: UInt64, inode: UInt64)? = nil) -> HelloResult {
        HelloResult(
            protocolVersion: 1, server: "thinbd 0.1.0", pool: "/var/lib/thinbd/default.pool", served: true, pid: 42,
            uris: ["nbd+unix:///?socket=/run/thinbd.sock"], metrics: metrics, poolDevice: file?.device, poolInode: file?.inode)
    }

    static let check = CheckResult(
        clean: false, damage: ["bad block 7"], stale: [], leakedBlocks: 3, repaired: false, volumesChecked: 2,
        metadataBlocksChecked: 9, blockMappings: 1, originBacked: ["build"])
    static let rule = ExportLimitRule(pattern: "build-*", operationsPerSecond: 1000, bytesPerSecond: 100 << 20)

    /// A result for every command (some twice, to cover null and empty values).
    static let replies: [(ControlCommand, ControlResult)] = [
        (.hello, .hello(hello(metrics: nil))),
        (.hello, .hello(hello(metrics: "http://127.0.0.1:9100/metrics", file: (2049, 131_077)))),
        (.info, .poolInfo(info(allocated: nil))),
        (.grow(size: 2 << 30), .poolInfo(info(allocated: 8192))),
        (.list, .volumes([volume, snapshot, clone])),
        (.list, .volumes([])),
        (.exports, .exports([ExportEntry(name: "vm", connections: 2), ExportEntry(name: "vm@s", connections: 0)])),
        (.createVolume(name: "vm", size: 1 << 30), .volumeCreated(VolumeCreateResult(volume: volume))),
        (.snapshot(name: "vm@s", ifMissing: true), .snapshotOrClone(SnapshotCloneResult(created: false, volume: snapshot))),
        (.clone(source: "vm@s", name: "build-1", ifMissing: false), .snapshotOrClone(SnapshotCloneResult(created: true, volume: clone))),
        (.delete(name: "vm@s", force: true), .deleted(DeleteResult(deleted: "vm@s", disconnected: 1))),
        (.rename(from: "old", to: "vm"), .renamed(RenameResult(volume: volume, renamedFrom: "old"))),
        (.resize(name: "vm", size: 1 << 30, force: true), .resized(ResizeResult(volume: volume, disconnected: 2))),
        (.rollback(snapshot: "vm@s", force: false), .rolledBack(RollbackResult(volume: volume, snapshot: "vm@s", disconnected: 0))),
        (.setLimit(rule), .limits([rule])),
        (.limits, .limits([])),
        (.check, .check(check)),
        (
            .diff(from: "vm@s", to: "vm"),
            .differences(
                DiffResult(
                    from: "vm@s", to: "vm", related: true, fromSize: 1 << 30, toSize: 1 << 30, changedBytes: 131072,
                    extents: [.init(offset: 0, length: 65536), .init(offset: 1 << 20, length: 65536)]))
        ),
        (.diff(from: "a", to: "b"), .differences(DiffResult(from: "a", to: "b", related: false, fromSize: 1, toSize: 2, changedBytes: 0, extents: []))),
    ]
}

func encodedLine(_ value: some Encodable) -> String { ControlJSON.line(value) }

func decoded<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
    try JSONDecoder().decode(type, from: Data(text.utf8))
}

/// The exact bytes the control protocol and `--json` produce: FoundationEssentials'
/// `JSONEncoder`, keys sorted, `/` unescaped, nil optionals written as `null`. Other
/// programs read these off the socket and out of `--json`; a change here is a change of
/// what they see.
@Suite struct WireFormatTests {
    @Test func requestLinesAreByteExact() {
        let expected: [(ControlCommand, String)] = [
            (.hello, #"{"command":"hello"}"#),
            (.info, #"{"command":"info"}"#),
            (.list, #"{"command":"list"}"#),
            (.check, #"{"command":"check"}"#),
            (.exports, #"{"command":"exports"}"#),
            (.limits, #"{"command":"limits"}"#),
            (.diff(from: "vm@a", to: "vm@b"), #"{"command":"diff","from":"vm@a","to":"vm@b"}"#),
            (.grow(size: 1 << 40), #"{"command":"grow","size":1099511627776}"#),
            (.createVolume(name: "vm", size: 10 << 30), #"{"command":"volume-create","name":"vm","size":10737418240}"#),
            (.delete(name: "vm@s", force: true), #"{"command":"delete","force":true,"name":"vm@s"}"#),
            (.rename(from: "a", to: "b"), #"{"command":"rename","name":"a","new_name":"b"}"#),
            (.resize(name: "vm", size: 4096, force: false), #"{"command":"resize","force":false,"name":"vm","size":4096}"#),
            (.snapshot(name: "vm@golden", ifMissing: true), #"{"command":"snapshot","if_missing":true,"name":"vm@golden"}"#),
            (
                .clone(source: "vm@golden", name: "build-1", ifMissing: false),
                #"{"command":"clone","if_missing":false,"name":"build-1","source":"vm@golden"}"#
            ),
            (.rollback(snapshot: "vm@golden", force: true), #"{"command":"rollback","force":true,"name":"vm@golden"}"#),
            (.setLimit(Samples.rule), #"{"bytes_per_second":104857600,"command":"limit","iops":1000,"pattern":"build-*"}"#),
            (
                .createVolume(name: "q\"\\\u{1}é𝄞/", size: UInt64.max),
                #"{"command":"volume-create","name":"q\"\\\u0001é𝄞/","size":18446744073709551615}"#
            ),
        ]
        for (command, line) in expected {
            #expect(command.line == line + "\n")
        }
    }

    @Test func replyLinesAreByteExact() {
        let expected: [(ControlReply, String)] = [
            (.success(.deleted(DeleteResult(deleted: "vm", disconnected: 2))), #"{"ok":true,"result":{"deleted":"vm","disconnected":2}}"#),
            (.success(.volumes([])), #"{"ok":true,"result":[]}"#),
            (
                .success(.limits([ExportLimitRule(pattern: "vm*", operationsPerSecond: 10, bytesPerSecond: 0)])),
                #"{"ok":true,"result":[{"bytes_per_second":0,"iops":10,"pattern":"vm*"}]}"#
            ),
            (
                .failure(ControlError(code: "in-use", message: "vm has 2 connected clients")),
                #"{"error":{"code":"in-use","message":"vm has 2 connected clients"},"ok":false}"#
            ),
        ]
        for (reply, line) in expected {
            #expect(reply.line == line + "\n")
        }
    }

    /// Optional values the contract documents as possibly null are written as `null`,
    /// never left out; present ones as values.
    @Test func resultsAreByteExactWithNullKept() {
        #expect(encodedLine(Samples.volume) == Samples.volumeLine)
        #expect(
            encodedLine(Samples.snapshot)
                == #"{"connections":0,"created":1795300001,"ephemeral":false,"kind":"snapshot","mapped_bytes":0,"name":"vm@s","origin":null,"parent":"vm","read_only":true,"size":1073741824,"uuid":null}"#
        )
        #expect(
            encodedLine(Samples.hello(metrics: nil))
                == #"{"metrics":null,"pid":42,"pool":"/var/lib/thinbd/default.pool","pool_device":null,"pool_inode":null,"protocol":1,"served":true,"server":"thinbd 0.1.0","uris":["nbd+unix:///?socket=/run/thinbd.sock"]}"#
        )
        #expect(encodedLine(Samples.hello(metrics: nil, file: (2049, 131_077))).contains(#""pool_device":2049,"pool_inode":131077,"#))
        #expect(encodedLine(Samples.hello(metrics: "http://h:1/metrics")).hasPrefix(#"{"metrics":"http://h:1/metrics","pid":42,"#))
        #expect(
            encodedLine(Samples.info(allocated: nil))
                == #"{"allocated_file_bytes":null,"block_size":65536,"connections":2,"engine":"libaio+O_DIRECT","failure":null,"file_bytes":1091567616,"free_bytes":1073676288,"generation":7,"metadata":{"free_bytes":16760832,"total_bytes":16777216,"used_bytes":16384},"path":"/p","served":true,"state":"ok","total_bytes":1073741824,"used_bytes":65536,"uuid":"u","volumes":["#
                + Samples.volumeLine + "]}")
        #expect(encodedLine(Samples.info(allocated: 8192)).hasPrefix(#"{"allocated_file_bytes":8192,"block_size":65536,"#))
        #expect(
            encodedLine(Samples.check)
                == #"{"block_mappings":1,"clean":false,"damage":["bad block 7"],"leaked_blocks":3,"metadata_blocks_checked":9,"origin_backed":["build"],"repaired":false,"stale":[],"volumes_checked":2}"#
        )
        #expect(encodedLine([ExportEntry(name: "vm", connections: 3)]) == #"[{"connections":3,"name":"vm"}]"#)
        #expect(encodedLine(RenameResult(volume: Samples.volume, renamedFrom: "old")) == #"{"renamed_from":"old","volume":"# + Samples.volumeLine + "}")
        #expect(
            encodedLine(RollbackResult(volume: Samples.volume, snapshot: "vm@s", disconnected: 1))
                == #"{"disconnected":1,"snapshot":"vm@s","volume":"# + Samples.volumeLine + "}")
        #expect(encodedLine(SnapshotCloneResult(created: true, volume: Samples.volume)) == #"{"created":true,"volume":"# + Samples.volumeLine + "}")
    }

    /// What `--json` prints: two spaces a level, `" : "` between key and value, and an
    /// empty array or object opened and closed on lines of their own.
    @Test func anOriginBackedVolumeCarriesItsOrigin() throws {
        var clone = Samples.clone
        clone.origin = OriginSummary(kind: "nbd", address: "nbd://golden.example/golden@v3", size: 1 << 30, uuid: nil)
        let line = encodedLine(clone)
        #expect(line.contains(#""origin":{"address":"nbd://golden.example/golden@v3","kind":"nbd","size":1073741824,"uuid":null}"#), "\(line)")
        #expect(try decoded(VolumeSummary.self, line) == clone)
    }

    @Test func prettyOutputIsByteExact() {
        #expect(
            ControlJSON.pretty(DeleteResult(deleted: "vm", disconnected: 2)) == """
                {
                  "deleted" : "vm",
                  "disconnected" : 2
                }
                """)
        #expect(
            ControlJSON.pretty(Samples.check) == """
                {
                  "block_mappings" : 1,
                  "clean" : false,
                  "damage" : [
                    "bad block 7"
                  ],
                  "leaked_blocks" : 3,
                  "metadata_blocks_checked" : 9,
                  "origin_backed" : [
                    "build"
                  ],
                  "repaired" : false,
                  "stale" : [

                  ],
                  "volumes_checked" : 2
                }
                """)
        #expect(
            ControlJSON.pretty(VolumeCreateResult(volume: Samples.volume)) == """
                {
                  "volume" : {
                    "connections" : 2,
                    "created" : 1795300000,
                    "ephemeral" : false,
                    "kind" : "volume",
                    "mapped_bytes" : 65536,
                    "name" : "vm",
                    "origin" : null,
                    "parent" : null,
                    "read_only" : false,
                    "size" : 1073741824,
                    "uuid" : "6c8b61fd-7f77-4d85-9c8d-c00a4a0a1da8"
                  }
                }
                """)
        #expect(ControlJSON.pretty([ExportLimitRule]()) == "[\n\n]")
    }

    /// `"`, `\` and control characters are escaped (backspace, form feed, newline, return
    /// and tab short, the rest as `\u00XX`); `/`, DEL and everything beyond ASCII (U+2028
    /// too) are written as they are, in UTF-8. Compact and pretty alike.
    @Test func escapingIsByteExact() {
        let text = "\u{8}\u{c}\u{1}\u{1f}\u{7f}/é𝄞\u{2028}\"\\\n\r\t"
        let expected = #""\b\f\u0001\u001f"# + "\u{7f}/é𝄞\u{2028}" + #"\"\\\n\r\t""#
        #expect(encodedLine([text]) == "[" + expected + "]")
        #expect(ControlJSON.pretty(DeleteResult(deleted: text, disconnected: 0)).contains("\"deleted\" : " + expected + ",\n"))
        #expect(Array(encodedLine(["é𝄞"]).utf8) == [0x5B, 0x22, 0xC3, 0xA9, 0xF0, 0x9D, 0x84, 0x9E, 0x22, 0x5D])
        #expect(encodedLine(["a/b"]) == #"["a/b"]"#)
    }

    /// Other writers' escapes (`\/`, `\b`, `\f`, upper-case hex, surrogate pairs) read
    /// back as the characters, and are written again in this protocol's own form.
    @Test func foreignEscapesReadAndAreRewrittenCanonically() throws {
        let command = try ControlCommand(line: #"{"command":"delete","name":"\/\b\f\u00E9\uD834\uDD1E\u0001 \u2028"}"#)
        #expect(command == .delete(name: "/\u{8}\u{c}é𝄞\u{1} \u{2028}", force: false))
        #expect(command.line == #"{"command":"delete","force":false,"name":"/\b\f"# + "é𝄞" + #"\u0001 "# + "\u{2028}\"}\n")
    }

    /// Every request survives encode and decode unchanged.
    @Test func everyRequestRoundTrips() throws {
        for command in ControlMessageTests.commands {
            #expect(try ControlCommand(line: String(command.line.dropLast())) == command)
            #expect(try decoded(ControlCommand.self, encodedLine(command)) == command)
        }
    }

    /// Every result type survives encode and decode unchanged, as a reply to its command
    /// and on its own; so does every error.
    @Test func everyResultRoundTrips() throws {
        for (command, result) in Samples.replies {
            let reply = ControlReply.success(result)
            #expect(try ControlReply(line: String(reply.line.dropLast()), answering: command) == reply, "\(command.name)")
            let pretty = ControlJSON.pretty(result)
            #expect(try ControlReply(line: #"{"ok":true,"result":"# + pretty + "}", answering: command) == reply)
        }
        try roundTrip(Samples.volume)
        try roundTrip(Samples.clone)
        try roundTrip(Samples.hello(metrics: nil))
        try roundTrip(Samples.hello(metrics: "http://127.0.0.1:9100/metrics"))
        try roundTrip(Samples.hello(metrics: nil, file: (2049, 131_077)))
        try roundTrip(Samples.info(allocated: nil))
        try roundTrip(Samples.info(allocated: 123))
        try roundTrip(Samples.info(allocated: 0).metadata)
        try roundTrip(Samples.check)
        try roundTrip(Samples.rule)
        try roundTrip(ExportEntry(name: "a", connections: 1))
        try roundTrip(VolumeCreateResult(volume: Samples.volume))
        try roundTrip(SnapshotCloneResult(created: false, volume: Samples.snapshot))
        try roundTrip(DeleteResult(deleted: "x", disconnected: 3))
        try roundTrip(RenameResult(volume: Samples.clone, renamedFrom: "y"))
        try roundTrip(ResizeResult(volume: Samples.volume, disconnected: 0))
        try roundTrip(RollbackResult(volume: Samples.volume, snapshot: "vm@s", disconnected: 4))
        let error = ControlError(code: "no-such-volume", message: "no volume \"x\"")
        try roundTrip(error)
        for command in [ControlCommand.hello, .list, .delete(name: "x", force: false)] {
            #expect(try ControlReply(line: String(ControlReply.failure(error).line.dropLast()), answering: command) == .failure(error))
        }
    }

    func roundTrip<T: Codable & Equatable>(_ value: T, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(try decoded(T.self, encodedLine(value)) == value, sourceLocation: sourceLocation)
        #expect(try decoded(T.self, ControlJSON.pretty(value)) == value, sourceLocation: sourceLocation)
    }

    /// Keys may come in any order, with white space, and with keys this version does not
    /// know (a newer client's optional ones).
    @Test func requestsDecodeWithKeysInAnyOrderAndUnknownKeys() throws {
        let cases: [(String, ControlCommand)] = [
            (#"{"name":"vm@s","force":true,"command":"delete"}"#, .delete(name: "vm@s", force: true)),
            (#" { "size" : 4096 , "command" : "resize" , "name" : "vm" } "#, .resize(name: "vm", size: 4096, force: false)),
            (#"{"if_missing":true,"name":"b","source":"a@s","command":"clone","comment":"ci","retries":[1,{"x":null}]}"#,
             .clone(source: "a@s", name: "b", ifMissing: true)),
            (#"{"iops":5,"pattern":"p*","bytes_per_second":0,"command":"limit","burst":9}"#,
             .setLimit(ExportLimitRule(pattern: "p*", operationsPerSecond: 5, bytesPerSecond: 0))),
            (#"{"new_name":"b","name":"a","command":"rename","force":"ignored: rename takes no flag"}"#, .rename(from: "a", to: "b")),
            (#"{"version":2,"command":"hello"}"#, .hello),
            (#"{"force":null,"name":"v","command":"delete"}"#, .delete(name: "v", force: false)),
        ]
        for (line, command) in cases {
            #expect(try ControlCommand(line: line) == command, "\(line)")
        }
    }

    /// Results from another server may leave out optional keys or have null for them, and
    /// may carry keys this version does not know.
    @Test func optionalResultFieldsReadFromNullOrMissing() throws {
        let noParent = #"{"connections":2,"created":1795300000,"ephemeral":false,"kind":"volume","mapped_bytes":65536,"name":"vm","read_only":false,"size":1073741824,"uuid":"6c8b61fd-7f77-4d85-9c8d-c00a4a0a1da8","future":[1]}"#
        #expect(try decoded(VolumeSummary.self, noParent) == Samples.volume)
        let noUUID = noParent.replacing(#""uuid":"6c8b61fd-7f77-4d85-9c8d-c00a4a0a1da8","#, with: "")
        #expect(try decoded(VolumeSummary.self, noUUID).uuid == nil)
        #expect(try decoded(VolumeSummary.self, Samples.volumeLine) == Samples.volume)
        let withParent = Samples.volumeLine.replacing(#""parent":null"#, with: #""parent":"base""#)
        #expect(try decoded(VolumeSummary.self, withParent).parent == "base")
        let hello = #"{"pid":42,"pool":"/var/lib/thinbd/default.pool","protocol":1,"served":true,"server":"thinbd 0.1.0","uris":["nbd+unix:///?socket=/run/thinbd.sock"]}"#
        #expect(try decoded(HelloResult.self, hello) == Samples.hello(metrics: nil))
        let info = encodedLine(Samples.info(allocated: nil)).replacing(#""allocated_file_bytes":null,"#, with: "")
        #expect(!info.contains("allocated"))
        #expect(try decoded(PoolInfoResult.self, info) == Samples.info(allocated: nil))
        // A required key is still required.
        #expect(throws: DecodingError.self) { try decoded(VolumeSummary.self, #"{"name":"vm"}"#) }
    }

    /// A reply is read as the result type of the command it answers.
    @Test func repliesAreReadAsTheirCommandsResult() throws {
        let line = String(ControlReply.success(.volumes([Samples.volume])).line.dropLast())
        let reply = try ControlReply(line: line, answering: .list)
        #expect(try reply.result(as: [VolumeSummary].self) == [Samples.volume])
        #expect(throws: ControlError.self) { try reply.result(as: HelloResult.self) }
        // The same bytes as the reply to `info` do not fit: an io error naming the place.
        do {
            _ = try ControlReply(line: line, answering: .info)
            Issue.record("a list read as info")
        } catch {
            #expect(error.code == "io")
            #expect(error.message.contains("reply to info"), "\(error.message)")
        }
        do {
            _ = try ControlReply(line: #"{"ok":true,"result":{"created":true,"volume":{"name":"x"}}}"#, answering: .snapshot(name: "x@s", ifMissing: false))
            Issue.record("a volume without its keys was read")
        } catch {
            #expect(error.code == "io")
            #expect(error.message.contains("\"result.volume.") && error.message.contains("is missing"), "\(error.message)")
        }
    }
}

/// The keys of an object, whatever they hold.
struct KeySet: Decodable {
    var keys: Set<String>

    struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: Decoder) throws {
        keys = Set(try decoder.container(keyedBy: AnyKey.self).allKeys.map(\.stringValue))
    }
}

func keys(_ result: ControlResult) throws -> Set<String> { try decoded(KeySet.self, encodedLine(result)).keys }

func elementKeys(_ result: ControlResult) throws -> [Set<String>] { try decoded([KeySet].self, encodedLine(result)).map(\.keys) }

/// Results computed on a pool carry exactly the keys docs/control-api.md lists.
@Suite struct ResultKeyTests {
    static let volumeKeys: Set = ["name", "kind", "size", "mapped_bytes", "parent", "read_only", "ephemeral", "created", "connections", "uuid", "origin"]

    @Test func everyResultHasItsDocumentedKeys() throws {
        let pool = try Pool.create(
            on: MemoryDevice(size: 0), geometry: PoolGeometry(dataSize: 4 << 20, blockSize: 4096, metadataSize: 4 << 20))
        let served = FakeServedExports(["vm": 1])
        let commands = PoolCommands(pool: pool, served: served)

        let created = try commands.run(.createVolume(name: "vm", size: 1 << 20))
        #expect(try keys(created) == ["volume"])
        guard case .volumeCreated(let createResult) = created else { throw ControlError(code: "test", message: "\(created)") }
        #expect(try elementKeys(.volumes([createResult.volume])) == [Self.volumeKeys])
        #expect(
            encodedLine(createResult.volume)
                == #"{"connections":1,"created":\#(createResult.volume.created),"ephemeral":false,"kind":"volume","mapped_bytes":0,"name":"vm","origin":null,"parent":null,"read_only":false,"size":1048576,"uuid":"\#(createResult.volume.uuid ?? "none")"}"#
        )
        // A new volume has a UUID, a fresh one each time.
        #expect(createResult.volume.uuid?.count == 36)

        #expect(try keys(commands.run(.hello)) == ["protocol", "server", "pool", "served", "pid", "uris", "metrics", "pool_device", "pool_inode"])
        #expect(encodedLine(try commands.run(.hello)).contains(#""metrics":null"#))
        let info = try commands.run(.info)
        #expect(
            try keys(info) == [
                "path", "uuid", "engine", "served", "block_size", "total_bytes", "used_bytes", "free_bytes", "metadata",
                "file_bytes", "allocated_file_bytes", "generation", "connections", "volumes", "state", "failure",
            ])
        guard case .poolInfo(let poolInfo) = info else { throw ControlError(code: "test", message: "\(info)") }
        #expect(try decoded(KeySet.self, encodedLine(poolInfo.metadata)).keys == ["total_bytes", "used_bytes", "free_bytes"])
        #expect(try elementKeys(.volumes(poolInfo.volumes)) == [Self.volumeKeys])
        #expect(try elementKeys(commands.run(.list)) == [Self.volumeKeys])

        #expect(try keys(commands.run(.snapshot(name: "vm@s", ifMissing: false))) == ["created", "volume"])
        #expect(try keys(commands.run(.clone(source: "vm@s", name: "c", ifMissing: false))) == ["created", "volume"])
        #expect(try keys(commands.run(.rename(from: "c", to: "d"))) == ["volume", "renamed_from"])
        #expect(try keys(commands.run(.resize(name: "vm", size: 2 << 20, force: false))) == ["volume", "disconnected"])
        #expect(try keys(commands.run(.rollback(snapshot: "vm@s", force: true))) == ["volume", "snapshot", "disconnected"])
        #expect(try keys(commands.run(.delete(name: "d", force: false))) == ["deleted", "disconnected"])
        #expect(try elementKeys(commands.run(.exports)).first == ["name", "connections"])
        let rule = ExportLimitRule(pattern: "vm*", operationsPerSecond: 10, bytesPerSecond: 0)
        #expect(encodedLine(try commands.run(.setLimit(rule))) == #"[{"bytes_per_second":0,"iops":10,"pattern":"vm*"}]"#)
        #expect(try elementKeys(commands.run(.limits)) == [["pattern", "iops", "bytes_per_second"]])
        _ = try commands.run(.snapshot(name: "vm@t", ifMissing: false))
        let diff = try commands.run(.diff(from: "vm@t", to: "vm"))
        #expect(try keys(diff) == ["from", "to", "related", "from_size", "to_size", "changed_bytes", "extents"])
        #expect(encodedLine(diff) == #"{"changed_bytes":0,"extents":[],"from":"vm@t","from_size":1048576,"related":true,"to":"vm","to_size":1048576}"#)
        #expect(
            try keys(commands.run(.check)) == [
                "clean", "damage", "stale", "leaked_blocks", "repaired", "volumes_checked", "metadata_blocks_checked",
                "block_mappings", "origin_backed",
            ])
    }
}
