import ArgumentParser
import ThinControl
import ThinPool
import ThinSystem

struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Show the engine at work on a pool (created on first use): volume, snapshot, clone, tree.")

    @Argument(help: "Pool file (default: $THINBD_POOL or ~/.local/share/thinbd/default.pool).")
    var pool: String?

    static func defaultPoolPath() -> String {
        if let path = SystemInfo.environment("THINBD_POOL") { return path }
        let home = SystemInfo.environment("HOME") ?? "/tmp"
        return home + "/.local/share/thinbd/default.pool"
    }

    func run() throws {
        let path = pool ?? Self.defaultPoolPath()
        do {
            if !SystemInfo.fileExists(path) {
                if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
                    try SystemInfo.makeDirectories(String(path[..<slash]))
                }
                try Pool.create(path: path, geometry: PoolGeometry(dataSize: 10 << 30)).close()
                print("created pool \(path) (10 GiB of data, sparse)")
            }
        } catch {
            throw fail(error)
        }
        try withPool(path) { pool in
            let names = Set(pool.listVolumes().map(\.name))
            if !names.contains("base") {
                try pool.createVolume("base", size: 1 << 30)
                print("created volume base (1 GiB)")
            }
            let base = try pool.volumeID("base")
            let payload = [UInt8]("thinbd demo block written at generation \(pool.generation)\n".utf8)
            var block = [UInt8](repeating: 0, count: 64 << 10)
            block.replaceSubrange(0..<payload.count, with: payload)
            let slot = UInt64(pool.generation % 16) * (64 << 10)
            try block.withUnsafeBytes { try pool.write(base, at: slot, from: $0) }
            print("wrote 64 KiB to base at offset \(slot)")
            let snapshot = "base@gen\(pool.generation)"
            try pool.snapshot(snapshot)
            print("took snapshot \(snapshot)")
            let clone = "build-\(pool.generation)"
            try pool.clone(snapshot, as: clone)
            print("cloned \(snapshot) as \(clone)")
            let report = pool.check()
            print("check: \(report.isClean ? "clean" : "DAMAGE: \(report.damage)")")
            print("\nsnapshot tree:")
            print(TreeCommand.draw(PoolCommands(pool: pool, served: nil).list()), terminator: "")
            let info = pool.info()
            print("\npool: \(formatBytes(info.dataUsedBytes)) used of \(formatBytes(info.dataTotalBytes)), \(info.volumes.count) volumes and snapshots")
        }
    }
}
