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
        let info = try runPoolCommand(.grow(size: size.bytes), pool: target.pool, options: live, as: PoolInfoResult.self)
        emit(info, live) {
            print("\(target.pool): \(formatBytes(info.totalBytes)) of data, \(formatBytes(info.freeBytes)) free")
        }
    }
}
