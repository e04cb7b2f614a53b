import ArgumentParser
import ThinPool

struct TreeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tree", abstract: "Draw the snapshot tree: volumes, their snapshots and clones.")

    @OptionGroup var target: PoolArgument

    func run() throws {
        let volumes = try withPool(target.pool, readOnly: true) { $0.listVolumes() }
        print(Self.draw(volumes), terminator: "")
    }

    /// Roots are volumes with no (remaining) parent; children are sorted by creation.
    static func draw(_ volumes: [VolumeInfo]) -> String {
        let byName = Dictionary(uniqueKeysWithValues: volumes.map { ($0.name, $0) })
        var children: [String: [VolumeInfo]] = [:]
        var roots: [VolumeInfo] = []
        for volume in volumes {
            if let parent = volume.parent, byName[parent] != nil {
                children[parent, default: []].append(volume)
            } else {
                roots.append(volume)
            }
        }
        let order: (VolumeInfo, VolumeInfo) -> Bool = { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
        var out = ""
        func line(_ v: VolumeInfo) -> String {
            "\(v.name)  (\(v.kind.rawValue), \(formatBytes(v.size)), \(formatBytes(v.mappedBytes)) mapped)"
        }
        func visit(_ v: VolumeInfo, prefix: String, isLast: Bool, isRoot: Bool) {
            out += isRoot ? line(v) + "\n" : prefix + (isLast ? "└── " : "├── ") + line(v) + "\n"
            let kids = (children[v.name] ?? []).sorted(by: order)
            let childPrefix = isRoot ? "" : prefix + (isLast ? "    " : "│   ")
            for (i, kid) in kids.enumerated() {
                visit(kid, prefix: childPrefix, isLast: i == kids.count - 1, isRoot: false)
            }
        }
        for root in roots.sorted(by: order) { visit(root, prefix: "", isLast: true, isRoot: true) }
        if volumes.isEmpty { out = "(no volumes)\n" }
        return out
    }
}
