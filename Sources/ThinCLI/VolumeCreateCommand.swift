import ArgumentParser
import ThinControl
import ThinPool

struct VolumeCreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Create a thin volume (its size may exceed the pool).")

    @OptionGroup var target: PoolArgument

    @Argument(help: "Name of the new volume.")
    var name: String

    @Option(help: "Virtual size of the volume.")
    var size: ByteSize

    @OptionGroup var live: LiveOptions

    func run() throws {
        let result = try runPoolCommand(.createVolume(name: name, size: size.bytes), pool: target.pool, options: live, as: VolumeCreateResult.self)
        emit(result, live) {
            let volume = result.volume
            print("created volume \(volume.name) (\(formatBytes(volume.size)))")
        }
    }
}
