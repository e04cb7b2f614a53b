import ArgumentParser
import ThinControl
import ThinPool

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info", abstract: "Show the pool's sizes, usage and volumes (live from its server when served).")

    @OptionGroup var target: PoolArgument
    @OptionGroup var live: LiveOptions

    func run() throws {
        let info = try runPoolCommand(.info, pool: target.pool, options: live)
        emit(info, live) { print(Self.render(info)) }
    }

    static func render(_ info: JSON) -> String {
        let used = info.number("used_bytes")
        let total = info.number("total_bytes")
        let metadata = info["metadata"] ?? .null
        let volumes = VolumeRow.rows(info["volumes"])
        let kinds = Dictionary(grouping: volumes, by: \.kind).mapValues(\.count)
        let ephemeral = volumes.filter(\.ephemeral).count
        let allocated = info["allocated_file_bytes"]?.numberValue
        var text = """
            pool:        \(info.string("path"))
            uuid:        \(info.string("uuid"))
            block size:  \(formatBytes(info.number("block_size")))
            data:        \(usageBar(used: used, total: total)) \(percent(used, total)) used
                         \(formatBytes(used)) used, \(formatBytes(info.number("free_bytes"))) free, \(formatBytes(total)) total
            metadata:    \(usageBar(used: metadata.number("used_bytes"), total: metadata.number("total_bytes"))) \(percent(metadata.number("used_bytes"), metadata.number("total_bytes"))) used
                         \(formatBytes(metadata.number("used_bytes"))) used, \(formatBytes(metadata.number("free_bytes"))) free, \(formatBytes(metadata.number("total_bytes"))) total
            file:        \(formatBytes(info.number("file_bytes"))) apparent\(allocated.map { ", \(formatBytes($0)) allocated" } ?? "")
            volumes:     \(volumes.count) (\(kinds["volume"] ?? 0) volumes, \(kinds["snapshot"] ?? 0) snapshots, \(kinds["clone"] ?? 0) clones\(ephemeral > 0 ? ", \(ephemeral) ephemeral" : ""))
            generation:  \(info.number("generation"))
            """
        if info["served"]?.boolValue == true {
            text += "\nserved:      yes, \(info.number("connections")) connection\(info.number("connections") == 1 ? "" : "s")"
        }
        return text
    }
}
