import ArgumentParser
import ThinPool

struct VolumeResizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize",
        abstract: "Grow or shrink a volume; shrinking discards the data past the new end.")

    @OptionGroup var target: PoolArgument

    @Argument(help: "Volume name.")
    var name: String

    @Option(help: "New virtual size.")
    var size: ByteSize

    func run() throws {
        try withPool(target.pool) { try $0.resize(name, to: size.bytes) }
        print("resized \(name) to \(formatBytes(size.bytes))")
    }
}
