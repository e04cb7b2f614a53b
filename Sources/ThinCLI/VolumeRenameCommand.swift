import ArgumentParser
import ThinPool

struct VolumeRenameCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rename",
        abstract: "Rename a volume (its snapshots follow) or a snapshot (VOL@OLD to VOL@NEW).")

    @OptionGroup var target: PoolArgument

    @Argument(help: "Current name.")
    var oldName: String

    @Argument(help: "New name.")
    var newName: String

    func run() throws {
        try withPool(target.pool) { try $0.rename(oldName, to: newName) }
        print("renamed \(oldName) to \(newName)")
    }
}
