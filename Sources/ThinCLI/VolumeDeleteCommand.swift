import ArgumentParser
import ThinPool

struct VolumeDeleteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete",
        abstract: "Delete a volume or snapshot; blocks shared with others stay for them.")

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME or VOLUME@SNAPSHOT.")
    var name: String

    func run() throws {
        try withPool(target.pool) { try $0.delete(name) }
        print("deleted \(name)")
    }
}
