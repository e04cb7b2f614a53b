import ArgumentParser
import ThinPool

struct VolumeCreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Create a thin volume (its size may exceed the pool).")

    @OptionGroup var target: PoolArgument

    @Argument(help: "Name of the new volume.")
    var name: String

    @Option(help: "Virtual size of the volume.")
    var size: ByteSize

    func run() throws {
        let volume = try withPool(target.pool) { try $0.createVolume(name, size: size.bytes) }
        print("created volume \(volume.name) (\(formatBytes(volume.size)))")
    }
}
