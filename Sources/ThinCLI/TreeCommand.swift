import ArgumentParser
import ThinControl
import ThinPool

struct TreeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tree",
        abstract: "Draw the snapshot tree: volumes, their snapshots and clones, with sizes.",
        discussion: "Each line shows the virtual size and the space mapped (blocks shared along the tree count in each).")

    @OptionGroup var target: PoolArgument
    @OptionGroup var live: LiveOptions

    func run() throws {
        let list = try runPoolCommand(.list, pool: target.pool, options: live)
        let rows = VolumeRow.rows(list)
        emit(Self.nested(rows), live) { print(Self.draw(rows), terminator: "") }
    }

    /// Roots are volumes with no (remaining) parent; children are sorted by creation.
    static func children(_ volumes: [VolumeRow]) -> (roots: [VolumeRow], children: [String: [VolumeRow]]) {
        let names = Set(volumes.map(\.name))
        var children: [String: [VolumeRow]] = [:]
        var roots: [VolumeRow] = []
        for volume in volumes {
            if let parent = volume.parent, names.contains(parent) {
                children[parent, default: []].append(volume)
            } else {
                roots.append(volume)
            }
        }
        let order: (VolumeRow, VolumeRow) -> Bool = { ($0.created, $0.name) < ($1.created, $1.name) }
        return (roots.sorted(by: order), children.mapValues { $0.sorted(by: order) })
    }

    static func draw(_ volumes: [VolumeRow]) -> String {
        if volumes.isEmpty { return "(no volumes)\n" }
        let (roots, children) = children(volumes)
        var out = ""
        func line(_ v: VolumeRow) -> String {
            var details = [v.kind + (v.ephemeral ? ", ephemeral" : ""), formatBytes(v.size), "\(formatBytes(v.mappedBytes)) mapped"]
            if v.connections > 0 { details.append("\(v.connections) client\(v.connections == 1 ? "" : "s")") }
            return "\(v.name)  (\(details.joined(separator: ", ")))"
        }
        func visit(_ v: VolumeRow, prefix: String, isLast: Bool, isRoot: Bool) {
            out += isRoot ? line(v) + "\n" : prefix + (isLast ? "└── " : "├── ") + line(v) + "\n"
            let kids = children[v.name] ?? []
            let childPrefix = isRoot ? "" : prefix + (isLast ? "    " : "│   ")
            for (i, kid) in kids.enumerated() {
                visit(kid, prefix: childPrefix, isLast: i == kids.count - 1, isRoot: false)
            }
        }
        for root in roots { visit(root, prefix: "", isLast: true, isRoot: true) }
        return out
    }

    /// The tree as JSON: each volume object gains a "children" array.
    static func nested(_ volumes: [VolumeRow]) -> JSON {
        let (roots, children) = children(volumes)
        func node(_ v: VolumeRow) -> JSON {
            .object([
                ("name", .string(v.name)), ("kind", .string(v.kind)), ("size", .number(v.size)),
                ("mapped_bytes", .number(v.mappedBytes)), ("ephemeral", .bool(v.ephemeral)),
                ("connections", .number(v.connections)),
                ("children", .array((children[v.name] ?? []).map(node))),
            ])
        }
        return .array(roots.map(node))
    }
}
