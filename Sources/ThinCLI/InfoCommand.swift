import ArgumentParser
import ThinControl
import ThinPool

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info", abstract: "Show the pool's sizes, usage and volumes (live from its server when served).")

    @OptionGroup var target: PoolArgument
    @OptionGroup var live: LiveOptions

    func run() throws {
        let info = try runPoolCommand(.info, pool: target.pool, options: live, as: PoolInfoResult.self)
        emit(info, live) { print(Self.render(info)) }
    }

    static func render(_ info: PoolInfoResult) -> String {
        let (used, total, metadata, volumes) = (info.usedBytes, info.totalBytes, info.metadata, info.volumes)
        let kinds = Dictionary(grouping: volumes, by: \.kind).mapValues(\.count)
        let ephemeral = volumes.filter(\.ephemeral).count
        var text = """
            pool:        \(info.path)
            uuid:        \(info.uuid)
            block size:  \(formatBytes(info.blockSize))
            data:        \(usageBar(used: used, total: total)) \(percent(used, total)) used
                         \(formatBytes(used)) used, \(formatBytes(info.freeBytes)) free, \(formatBytes(total)) total
            metadata:    \(usageBar(used: metadata.usedBytes, total: metadata.totalBytes)) \(percent(metadata.usedBytes, metadata.totalBytes)) used
                         \(formatBytes(metadata.usedBytes)) used, \(formatBytes(metadata.freeBytes)) free, \(formatBytes(metadata.totalBytes)) total
            file:        \(formatBytes(info.fileBytes)) apparent\(info.allocatedFileBytes.map { ", \(formatBytes($0)) allocated" } ?? "")
            volumes:     \(volumes.count) (\(kinds["volume"] ?? 0) volumes, \(kinds["snapshot"] ?? 0) snapshots, \(kinds["clone"] ?? 0) clones\(ephemeral > 0 ? ", \(ephemeral) ephemeral" : ""))
            generation:  \(info.generation)
            """
        // Which volumes still need their origin, and how much of it is local already.
        for (index, volume) in volumes.filter({ $0.origin != nil && $0.kind != "snapshot" }).enumerated() {
            guard let origin = volume.origin else { continue }
            let local = min(volume.mappedBytes, origin.size)
            text += "\n\(index == 0 ? "origins:     " : "             ")\(volume.name) <- \(origin.address) (\(formatBytes(local)) of \(formatBytes(origin.size)) local)"
        }
        if info.served {
            text += "\nserved:      yes, \(info.connections) connection\(info.connections == 1 ? "" : "s")"
        }
        switch info.state {
        case "failed":
            text += "\nstate:       FAILED, serving reads only: \(info.failure ?? "damage found")"
            text += "\n             stop the server and run: thinbd check --repair \(info.path)"
        case "needs-check":
            text += "\nstate:       NEEDS CHECK (a server found damage): thinbd check --repair \(info.path)"
        default:
            break
        }
        return text
    }
}
