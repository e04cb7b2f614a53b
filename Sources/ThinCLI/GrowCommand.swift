import ArgumentParser
import ThinPool

struct GrowCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "grow", abstract: "Grow the pool's data capacity (the file grows sparsely).")

    @OptionGroup var target: PoolArgument

    @Option(help: "New data capacity.")
    var size: ByteSize

    func run() throws {
        let info = try withPool(target.pool) { pool in
            try pool.grow(to: size.bytes)
            return pool.info()
        }
        print("\(target.pool): \(formatBytes(info.dataTotalBytes)) of data, \(formatBytes(info.dataFreeBytes)) free")
    }
}
