import Testing
import ThinControl
import ThinPool
import ThinSystem

/// The exact bytes the control protocol and `--json` produce today. Any change to how
/// JSON is written or read (a new renderer, an encoder library) must keep these: the
/// compact form is what other programs read off the socket, the pretty form is what
/// scripts and tests grep (`"served": true`), and key order follows docs/control-api.md.
@Suite struct WireFormatTests {
    @Test func requestLinesAreByteExact() {
        let expected: [(ControlCommand, String)] = [
            (.hello, #"{"command":"hello"}"#),
            (.info, #"{"command":"info"}"#),
            (.list, #"{"command":"list"}"#),
            (.check, #"{"command":"check"}"#),
            (.exports, #"{"command":"exports"}"#),
            (.limits, #"{"command":"limits"}"#),
            (.grow(size: 1 << 40), #"{"command":"grow","size":1099511627776}"#),
            (.createVolume(name: "vm", size: 10 << 30), #"{"command":"volume-create","name":"vm","size":10737418240}"#),
            (.delete(name: "vm@s", force: true), #"{"command":"delete","name":"vm@s","force":true}"#),
            (.rename(from: "a", to: "b"), #"{"command":"rename","name":"a","new_name":"b"}"#),
            (.resize(name: "vm", size: 4096, force: false), #"{"command":"resize","name":"vm","size":4096,"force":false}"#),
            (.snapshot(name: "vm@golden", ifMissing: true), #"{"command":"snapshot","name":"vm@golden","if_missing":true}"#),
            (
                .clone(source: "vm@golden", name: "build-1", ifMissing: false),
                #"{"command":"clone","source":"vm@golden","name":"build-1","if_missing":false}"#
            ),
            (.rollback(snapshot: "vm@golden", force: true), #"{"command":"rollback","name":"vm@golden","force":true}"#),
            (
                .setLimit(ExportLimitRule(pattern: "build-*", operationsPerSecond: 1000, bytesPerSecond: 100 << 20)),
                #"{"command":"limit","pattern":"build-*","iops":1000,"bytes_per_second":104857600}"#
            ),
            (.createVolume(name: "q\"\\\u{1}é𝄞", size: UInt64.max), #"{"command":"volume-create","name":"q\"\\\u0001é𝄞","size":18446744073709551615}"#),
        ]
        for (command, line) in expected {
            #expect(command.line == line + "\n")
        }
    }

    @Test func replyLinesAreByteExact() {
        let expected: [(ControlReply, String)] = [
            (.success(.object([("created", .bool(true))])), #"{"ok":true,"result":{"created":true}}"#),
            (.success(.null), #"{"ok":true,"result":null}"#),
            (.success(.array([])), #"{"ok":true,"result":[]}"#),
            (.success(.object([])), #"{"ok":true,"result":{}}"#),
            (
                .failure(ControlError(code: "in-use", message: "vm has 2 connected clients")),
                #"{"ok":false,"error":{"code":"in-use","message":"vm has 2 connected clients"}}"#
            ),
        ]
        for (reply, line) in expected {
            #expect(reply.line == line + "\n")
        }
    }

    /// Nested objects and arrays, empty ones, null, in an order that is not sorted.
    static let result = JSON.object([
        ("path", .string("/p")), ("served", .bool(true)),
        ("metadata", .object([("total_bytes", .number(1)), ("free_bytes", .number(0))])),
        ("allocated_file_bytes", .null),
        ("volumes", .array([.object([("name", .string("vm")), ("parent", .null)])])),
        ("damage", .array([])), ("empty", .object([])), ("uris", .array([.string("a"), .string("b")])),
    ])

    @Test func compactRenderingIsByteExact() {
        #expect(
            Self.result.rendered(pretty: false)
                == #"{"path":"/p","served":true,"metadata":{"total_bytes":1,"free_bytes":0},"allocated_file_bytes":null,"volumes":[{"name":"vm","parent":null}],"damage":[],"empty":{},"uris":["a","b"]}"#
        )
    }

    @Test func prettyRenderingIsByteExact() {
        #expect(
            Self.result.rendered() == """
                {
                  "path": "/p",
                  "served": true,
                  "metadata": {
                    "total_bytes": 1,
                    "free_bytes": 0
                  },
                  "allocated_file_bytes": null,
                  "volumes": [
                    {
                      "name": "vm",
                      "parent": null
                    }
                  ],
                  "damage": [],
                  "empty": {},
                  "uris": [
                    "a",
                    "b"
                  ]
                }
                """)
        // What the CLI prints on failure with --json.
        let error = ControlError(code: "no-such-volume", message: "no volume \"x\"")
        #expect(
            JSON.object([("error", error.json)]).rendered() == """
                {
                  "error": {
                    "code": "no-such-volume",
                    "message": "no volume \\"x\\""
                  }
                }
                """)
        #expect(JSON.array([.number(1), .array([])]).rendered() == "[\n  1,\n  []\n]")
        #expect(JSON.string("s").rendered() == #""s""#)
    }

    /// Only `"`, `\`, and control characters are escaped (`\n`, `\r`, `\t` short, the
    /// rest as lower-case `\u00XX`, including backspace and form feed); `/`, DEL and
    /// everything beyond ASCII (U+2028 too) are written as they are, in UTF-8.
    @Test func escapingIsByteExact() {
        let text = "\u{8}\u{c}\u{1}\u{1f}\u{7f}/é𝄞\u{2028}\"\\\n\r\t"
        let expected = #""\u0008\u000c\u0001\u001f"# + "\u{7f}/é𝄞\u{2028}" + #"\"\\\n\r\t""#
        #expect(JSON.string(text).rendered(pretty: false) == expected)
        #expect(JSON.string(text).rendered() == expected)
        #expect(Array(JSON.string("é𝄞").rendered().utf8) == [0x22, 0xC3, 0xA9, 0xF0, 0x9D, 0x84, 0x9E, 0x22])
    }

    /// Other writers' escapes (`\/`, `\b`, `\f`, upper-case hex, surrogate pairs) read
    /// back as the characters, and are written again in this protocol's own form.
    @Test func foreignEscapesReadAndAreRewrittenCanonically() throws {
        let value = try JSON.parse(#"{"s":"\/\b\f\u00E9\uD834\uDD1E\u0001 \u2028"}"#)
        #expect(value == .object([("s", .string("/\u{8}\u{c}é𝄞\u{1} \u{2028}"))]))
        #expect(value.rendered(pretty: false) == #"{"s":"/\u0008\u000c"# + "é𝄞" + #"\u0001 "# + "\u{2028}\"}")
    }

    /// A reply read off the socket keeps its key order, so the CLI prints a served
    /// result exactly as it prints the same result computed offline.
    @Test func parsedRepliesKeepKeyOrder() throws {
        let line = ControlReply.success(Self.result).line
        let reply = try ControlReply(line: String(line.dropLast()))
        #expect(reply.line == line)
        guard case .success(let result) = reply else {
            Issue.record("not a success")
            return
        }
        #expect(result.rendered() == Self.result.rendered())
        #expect(keys(result) == ["path", "served", "metadata", "allocated_file_bytes", "volumes", "damage", "empty", "uris"])
    }
}

private func keys(_ json: JSON?) -> [String] {
    guard case .object(let fields) = json else { return [] }
    return fields.map(\.0)
}

/// Results carry their keys in the order docs/control-api.md lists them.
@Suite struct ResultKeyOrderTests {
    static let volumeKeys = ["name", "kind", "size", "mapped_bytes", "parent", "read_only", "ephemeral", "created", "connections"]

    func ok(_ reply: ControlReply) throws -> JSON {
        guard case .success(let json) = reply else { throw ControlError(code: "test", message: "\(reply)") }
        return json
    }

    @Test func everyResultHasItsDocumentedKeyOrder() throws {
        let pool = try Pool.create(
            on: MemoryDevice(size: 0), geometry: PoolGeometry(dataSize: 4 << 20, blockSize: 4096, metadataSize: 4 << 20))
        let served = FakeServedExports(["vm": 1])
        let commands = PoolCommands(pool: pool, served: served)

        let created = try ok(commands.perform(.createVolume(name: "vm", size: 1 << 20)))
        #expect(keys(created) == ["volume"])
        #expect(keys(created["volume"]) == Self.volumeKeys)
        let createdAt = created["volume"]?["created"]?.numberValue ?? 0
        #expect(
            created["volume"]?.rendered(pretty: false)
                == #"{"name":"vm","kind":"volume","size":1048576,"mapped_bytes":0,"parent":null,"read_only":false,"ephemeral":false,"created":\#(createdAt),"connections":1}"#
        )

        let hello = try ok(commands.perform(.hello))
        #expect(keys(hello) == ["protocol", "server", "pool", "served", "pid", "uris", "metrics"])

        let info = try ok(commands.perform(.info))
        #expect(
            keys(info) == [
                "path", "uuid", "engine", "served", "block_size", "total_bytes", "used_bytes", "free_bytes", "metadata",
                "file_bytes", "allocated_file_bytes", "generation", "connections", "volumes",
            ])
        #expect(keys(info["metadata"]) == ["total_bytes", "used_bytes", "free_bytes"])
        #expect(info["volumes"]?.arrayValue?.map(keys) == [Self.volumeKeys])
        #expect(try ok(commands.perform(.list)).arrayValue?.map(keys) == [Self.volumeKeys])

        #expect(keys(try ok(commands.perform(.snapshot(name: "vm@s", ifMissing: false)))) == ["created", "volume"])
        #expect(keys(try ok(commands.perform(.clone(source: "vm@s", name: "c", ifMissing: false)))) == ["created", "volume"])
        #expect(keys(try ok(commands.perform(.rename(from: "c", to: "d")))) == ["volume", "renamed_from"])
        #expect(keys(try ok(commands.perform(.resize(name: "vm", size: 2 << 20, force: false)))) == ["volume", "disconnected"])
        #expect(keys(try ok(commands.perform(.rollback(snapshot: "vm@s", force: true)))) == ["volume", "snapshot", "disconnected"])
        #expect(keys(try ok(commands.perform(.delete(name: "d", force: false)))) == ["deleted", "disconnected"])
        #expect(try ok(commands.perform(.exports)).arrayValue?.map(keys).first == ["name", "connections"])
        let rule = ExportLimitRule(pattern: "vm*", operationsPerSecond: 10, bytesPerSecond: 0)
        #expect(
            try ok(commands.perform(.setLimit(rule))).rendered(pretty: false) == #"[{"pattern":"vm*","iops":10,"bytes_per_second":0}]"#)
        #expect(try ok(commands.perform(.limits)).arrayValue?.map(keys) == [["pattern", "iops", "bytes_per_second"]])
        #expect(
            keys(try ok(commands.perform(.check))) == [
                "clean", "damage", "stale", "leaked_blocks", "repaired", "volumes_checked", "metadata_blocks_checked",
                "block_mappings",
            ])
    }
}
