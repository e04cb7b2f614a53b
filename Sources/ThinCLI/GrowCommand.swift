import ArgumentParser
import ThinControl
import ThinPool

struct GrowCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "grow", abstract: "Grow the pool's data capacity (the file grows sparsely).")

    @OptionGroup var target: PoolArgument

    @Option(help: "New data capacity.")
    var size: ByteSize

    @OptionGroup var live: LiveOptions

    func run() throws {
        let info = try runPoolCommand(.grow(size: size.bytes), pool: target.pool, options: live)
        emit(info, live) {
            print("\(target.pool): \(formatBytes(info.number("total_bytes"))) of data, \(formatBytes(info.number("free_bytes"))) free")
        }
    }
}
