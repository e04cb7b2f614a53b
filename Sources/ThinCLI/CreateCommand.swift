import ArgumentParser
import ThinControl
import ThinPool

struct CreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a new, sparse pool file.",
        discussion: "SIZE is the data capacity. The file also holds a metadata region; both are sparse.")

    @OptionGroup var target: PoolArgument

    @Option(help: "Data capacity of the pool (e.g. 100G).")
    var size: ByteSize

    @Option(name: .customLong("block-size"), help: "Data block size: a power of two from 4K to 1M.")
    var blockSize = ByteSize(bytes: 64 << 10)

    @Option(name: .customLong("metadata-size"), help: "Metadata region size (default: enough for four times SIZE).")
    var metadataSize: ByteSize?

    @Flag(help: "Print the new pool's info as JSON (as 'info --json' does).")
    var json = false

    func validate() throws {
        let bs = blockSize.bytes
        guard bs >= 4096, bs <= 1 << 20, bs & (bs - 1) == 0 else {
            throw ValidationError("--block-size must be a power of two from 4K to 1M")
        }
        guard size.bytes >= bs * 16 else { throw ValidationError("--size must be at least 16 blocks (\(bs * 16) bytes)") }
    }

    func run() throws {
        let geometry = PoolGeometry(dataSize: size.bytes, blockSize: UInt32(blockSize.bytes), metadataSize: metadataSize?.bytes)
        do {
            let pool = try Pool.create(path: target.pool, geometry: geometry)
            let info = pool.info()
            let result = try PoolCommands(pool: pool, served: nil).run(.info)
            try pool.close()
            if json {
                print(ControlJSON.pretty(result))
                return
            }
            print("created \(target.pool): \(formatBytes(info.dataTotalBytes)) of data in \(formatBytes(info.blockSize)) blocks, \(formatBytes(info.metadataTotalBytes)) metadata")
        } catch {
            throw fail(error)
        }
    }
}
