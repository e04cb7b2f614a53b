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
        let volumes = try runPoolCommand(.list, pool: target.pool, options: live, as: [VolumeSummary].self)
        emit(Self.nested(volumes), live) { print(Self.draw(volumes), terminator: "") }
    }

    /// Roots are volumes with no (remaining) parent; children are sorted by creation.
    static func children(_ volumes: [VolumeSummary]) -> (roots: [VolumeSummary], children: [String: [VolumeSummary]]) {
        let names = Set(volumes.map(\.name))
        var children: [String: [VolumeSummary]] = [:]
        var roots: [VolumeSummary] = []
        for volume in volumes {
            if let parent = volume.parent, names.contains(parent) {
                children[parent, default: []].append(volume)
            } else {
                roots.append(volume)
            }
        }
        let order: (VolumeSummary, VolumeSummary) -> Bool = { ($0.created, $0.name) < ($1.created, $1.name) }
        return (roots.sorted(by: order), children.mapValues { $0.sorted(by: order) })
    }

    static func draw(_ volumes: [VolumeSummary]) -> String {
        if volumes.isEmpty { return "(no volumes)\n" }
        let (roots, children) = children(volumes)
        var out = ""
        func line(_ v: VolumeSummary) -> String {
            var details = [v.kind + (v.ephemeral ? ", ephemeral" : ""), formatBytes(v.size), "\(formatBytes(v.mappedBytes)) mapped"]
            if v.connections > 0 { details.append("\(v.connections) client\(v.connections == 1 ? "" : "s")") }
            return "\(v.name)  (\(details.joined(separator: ", ")))"
        }
        func visit(_ v: VolumeSummary, prefix: String, isLast: Bool, isRoot: Bool) {
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

    /// The tree for --json: the roots, each volume with its children.
    static func nested(_ volumes: [VolumeSummary]) -> [VolumeTreeNode] {
        let (roots, children) = children(volumes)
        func node(_ v: VolumeSummary) -> VolumeTreeNode { VolumeTreeNode(volume: v, children: (children[v.name] ?? []).map(node)) }
        return roots.map(node)
    }
}

/// A volume of `tree --json`: the volume object of `list` with a `children` array (the
/// snapshots and clones made from it).
struct VolumeTreeNode: Codable, Equatable {
    var volume: VolumeSummary
    var children: [VolumeTreeNode]

    enum CodingKeys: String, CodingKey {
        case children
    }

    init(volume: VolumeSummary, children: [VolumeTreeNode]) {
        self.volume = volume
        self.children = children
    }

    /// The volume's keys and `children`, in one object.
    func encode(to encoder: Encoder) throws {
        try volume.encode(to: encoder)
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(children, forKey: .children)
    }

    init(from decoder: Decoder) throws {
        volume = try VolumeSummary(from: decoder)
        children = try decoder.container(keyedBy: CodingKeys.self).decode([VolumeTreeNode].self, forKey: .children)
    }
}
