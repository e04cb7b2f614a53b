import Foundation
import Testing
import TestSupport
@testable import ThinCLI
@testable import ThinControl
@testable import ThinServe

/// What `--json` prints beyond the control protocol's results: the tree, errors, and the
/// `serve --json` announcement; then the real executable's output.
@Suite struct JSONOutputTests {
    static func volume(_ name: String, kind: String, parent: String?, created: UInt64) -> VolumeSummary {
        VolumeSummary(
            name: name, kind: kind, size: 65536, mappedBytes: 4096, parent: parent, readOnly: kind == "snapshot", ephemeral: false,
            created: created, connections: 0)
    }

    static let volumes = [
        volume("vm", kind: "volume", parent: nil, created: 1),
        volume("vm@s", kind: "snapshot", parent: "vm", created: 2),
        volume("c", kind: "clone", parent: "vm@s", created: 3),
        volume("other", kind: "volume", parent: nil, created: 4),
    ]

    /// Each volume object of `list`, with its children nested under `children`.
    @Test func treeNodesAreVolumesWithChildren() throws {
        let tree = TreeCommand.nested(Self.volumes)
        #expect(tree.map(\.volume.name) == ["vm", "other"])
        #expect(tree[0].children.map(\.volume.name) == ["vm@s"])
        #expect(tree[0].children[0].children.map(\.volume.name) == ["c"])
        #expect(tree[1].children.isEmpty)
        #expect(
            ControlJSON.line(tree[1])
                == #"{"children":[],"connections":0,"created":4,"ephemeral":false,"kind":"volume","mapped_bytes":4096,"name":"other","origin":null,"parent":null,"read_only":false,"size":65536,"uuid":null}"#
        )
        #expect(ControlJSON.line(tree[0].children[0]).hasPrefix(#"{"children":[{"children":[],"connections":0,"created":3,"#))
        let decoded = try JSONDecoder().decode([VolumeTreeNode].self, from: Data(ControlJSON.pretty(tree).utf8))
        #expect(decoded == tree)
    }

    @Test func errorsPrintAsOneErrorObject() throws {
        let output = ErrorOutput(error: ControlError(code: "no-such-volume", message: "no volume \"x\""))
        #expect(
            ControlJSON.pretty(output) == """
                {
                  "error" : {
                    "code" : "no-such-volume",
                    "message" : "no volume \\"x\\""
                  }
                }
                """)
        #expect(try JSONDecoder().decode(ErrorOutput.self, from: Data(ControlJSON.pretty(output).utf8)) == output)
    }

    /// One line, keys sorted, null for a control socket or metrics it does not have.
    @Test func serveAnnouncementIsOneLine() throws {
        let bare = ServeAnnouncement(uris: ["nbd://127.0.0.1:10809"], control: nil, metrics: nil, pid: 7)
        #expect(ControlJSON.line(bare) == #"{"control":null,"metrics":null,"pid":7,"uris":["nbd://127.0.0.1:10809"]}"#)
        let full = ServeAnnouncement(
            uris: ["nbd+unix:///?socket=/run/t.sock"], control: "/p.control", metrics: "http://127.0.0.1:9100/metrics", pid: 8)
        #expect(
            ControlJSON.line(full)
                == #"{"control":"/p.control","metrics":"http://127.0.0.1:9100/metrics","pid":8,"uris":["nbd+unix:///?socket=/run/t.sock"]}"#)
        for announcement in [bare, full] {
            #expect(try JSONDecoder().decode(ServeAnnouncement.self, from: Data(ControlJSON.line(announcement).utf8)) == announcement)
        }
    }

    /// The executable: pretty, sorted, null kept, errors as `{"error": ...}` with status 1.
    @Test func theExecutablePrintsSortedPrettyJSON() throws {
        let dir = TemporaryDirectory()
        let pool = dir.path + "/p.pool"
        let created = try CLI.run(["create", pool, "--size", "64M", "--json"])
        #expect(created.status == 0)
        #expect(created.stdout.hasPrefix("{\n  \"allocated_file_bytes\" : "), "\(created.stdout)")
        #expect(created.stdout.contains("\n  \"volumes\" : [\n\n  ]\n}\n"), "\(created.stdout)")

        let volume = try CLI.run(["volume", "create", pool, "vm", "--size", "1G", "--json"])
        let fields = try #require(try JSONSerialization.jsonObject(with: Data(volume.stdout.utf8)) as? [String: [String: Any]])["volume"]
        let createdAt = fields?["created"] as? Int
        let uuid = try #require(fields?["uuid"] as? String)
        #expect(uuid.count == 36 && uuid.split(separator: "-").map(\.count) == [8, 4, 4, 4, 12], "\(uuid)")
        #expect(
            volume.stdout == """
                {
                  "volume" : {
                    "connections" : 0,
                    "created" : \(createdAt ?? -1),
                    "ephemeral" : false,
                    "kind" : "volume",
                    "mapped_bytes" : 0,
                    "name" : "vm",
                    "origin" : null,
                    "parent" : null,
                    "read_only" : false,
                    "size" : 1073741824,
                    "uuid" : "\(uuid)"
                  }
                }

                """)

        #expect(try CLI.run(["snapshot", pool, "vm@s"]).status == 0)
        #expect(try CLI.run(["clone", pool, "vm@s", "c"]).status == 0)
        let tree = try CLI.run(["tree", pool, "--json"])
        let roots = try #require(try JSONSerialization.jsonObject(with: Data(tree.stdout.utf8)) as? [[String: Any]])
        #expect(roots.map { $0["name"] as? String } == ["vm"])
        let snapshots = try #require(roots.first?["children"] as? [[String: Any]])
        #expect(snapshots.map { $0["name"] as? String } == ["vm@s"])
        #expect(snapshots.first?["read_only"] as? Bool == true)
        let clones = try #require(snapshots.first?["children"] as? [[String: Any]])
        #expect(clones.map { $0["name"] as? String } == ["c"])
        #expect(clones.first?["parent"] as? String == "vm@s")
        #expect((clones.first?["children"] as? [Any])?.isEmpty == true)

        let missing = try CLI.run(["volume", "delete", pool, "nope", "--json"])
        #expect(missing.status == 1)
        #expect(
            missing.stdout == """
                {
                  "error" : {
                    "code" : "no-such-volume",
                    "message" : "no such volume or snapshot: nope"
                  }
                }

                """)
        #expect(missing.stderr == "thinbd: error: no such volume or snapshot: nope\n")
    }
}
