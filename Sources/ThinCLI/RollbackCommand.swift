import ArgumentParser
import ThinControl
import ThinPool

struct RollbackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rollback",
        abstract: "Return volume VOLUME to the contents of its snapshot VOLUME@SNAPSHOT.",
        discussion: "While the pool is served, a volume with connected clients is refused unless --force.")

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME@SNAPSHOT.")
    var name: String

    @Flag(help: "Disconnect the volume's clients first (their cached view of the disk would be wrong).")
    var force = false

    @OptionGroup var live: LiveOptions

    func run() throws {
        let result = try runPoolCommand(.rollback(snapshot: name, force: force), pool: target.pool, options: live, as: RollbackResult.self)
        emit(result, live) {
            print("rolled \(result.volume.name) back to \(name)\(disconnectedNote(result.disconnected))")
        }
    }
}
