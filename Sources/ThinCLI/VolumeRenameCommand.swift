import ArgumentParser
import ThinControl
import ThinPool

struct VolumeRenameCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rename",
        abstract: "Rename a volume (its snapshots follow) or a snapshot (VOL@OLD to VOL@NEW).",
        discussion: "Connected clients keep working; new connections use the new name.")

    @OptionGroup var target: PoolArgument

    @Argument(help: "Current name.")
    var oldName: String

    @Argument(help: "New name.")
    var newName: String

    @OptionGroup var live: LiveOptions

    func run() throws {
        let result = try runPoolCommand(.rename(from: oldName, to: newName), pool: target.pool, options: live, as: RenameResult.self)
        emit(result, live) { print("renamed \(oldName) to \(newName)") }
    }
}
