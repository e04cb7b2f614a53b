import ArgumentParser
import ThinPool

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info", abstract: "Show the pool's sizes, usage and volumes.")

    @OptionGroup var target: PoolArgument

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let info = try withPool(target.pool, readOnly: true) { $0.info() }
        if json {
            print(Self.json(info).rendered())
            return
        }
        let kinds = Dictionary(grouping: info.volumes, by: \.kind).mapValues(\.count)
        print("""
            pool:        \(info.path)
            uuid:        \(info.uuidString)
            block size:  \(formatBytes(info.blockSize))
            data:        \(usageBar(used: info.dataUsedBytes, total: info.dataTotalBytes)) \(percent(info.dataUsedBytes, info.dataTotalBytes)) used
                         \(formatBytes(info.dataUsedBytes)) used, \(formatBytes(info.dataFreeBytes)) free, \(formatBytes(info.dataTotalBytes)) total
            metadata:    \(usageBar(used: info.metadataUsedBytes, total: info.metadataTotalBytes)) \(percent(info.metadataUsedBytes, info.metadataTotalBytes)) used
                         \(formatBytes(info.metadataUsedBytes)) used, \(formatBytes(info.metadataFreeBytes)) free, \(formatBytes(info.metadataTotalBytes)) total
            file:        \(formatBytes(info.fileBytes)) apparent\(info.allocatedFileBytes.map { ", \(formatBytes($0)) allocated" } ?? "")
            volumes:     \(info.volumes.count) (\(kinds[.volume] ?? 0) volumes, \(kinds[.snapshot] ?? 0) snapshots, \(kinds[.clone] ?? 0) clones)
            generation:  \(info.generation)
            """)
    }

    static func json(_ info: PoolInfo) -> JSON {
        .object([
            ("path", .string(info.path)),
            ("uuid", .string(info.uuidString)),
            ("block_size", .number(info.blockSize)),
            ("total_bytes", .number(info.dataTotalBytes)),
            ("used_bytes", .number(info.dataUsedBytes)),
            ("free_bytes", .number(info.dataFreeBytes)),
            ("metadata", .object([
                ("total_bytes", .number(info.metadataTotalBytes)),
                ("used_bytes", .number(info.metadataUsedBytes)),
                ("free_bytes", .number(info.metadataFreeBytes)),
            ])),
            ("file_bytes", .number(info.fileBytes)),
            ("allocated_file_bytes", info.allocatedFileBytes.map { .number($0) } ?? .null),
            ("generation", .number(info.generation)),
            ("volumes", .array(info.volumes.map(volumeJSON))),
        ])
    }
}
