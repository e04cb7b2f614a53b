import ArgumentParser
import ThinControl
import ThinPool

struct VolumeDeleteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete",
        abstract: "Delete a volume or snapshot; blocks shared with others stay for them.",
        discussion: "While the pool is served, a volume with connected clients is refused unless --force.")

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME or VOLUME@SNAPSHOT.")
    var name: String

    @Flag(help: "Disconnect its clients first (their running requests finish; queued ones fail).")
    var force = false

    @OptionGroup var live: LiveOptions

    func run() throws {
        let result = try runPoolCommand(.delete(name: name, force: force), pool: target.pool, options: live, as: DeleteResult.self)
        emit(result, live) { print("deleted \(name)\(disconnectedNote(result.disconnected))") }
    }
}

/// ", after disconnecting N clients" when a --force closed connections.
func disconnectedNote(_ count: UInt64) -> String {
    count == 0 ? "" : " (disconnected \(count) client\(count == 1 ? "" : "s"))"
}
