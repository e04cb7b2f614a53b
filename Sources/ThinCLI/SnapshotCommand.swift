import ArgumentParser
import ThinControl
import ThinPool

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Take a read-only snapshot VOLUME@SNAPSHOT (constant time, whatever the volume's size).",
        discussion: """
            While the pool is served the server takes it: it holds every write that was answered \
            before and none answered after; writes pause for one commit.
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME@SNAPSHOT.")
    var name: String

    @Flag(help: "Succeed without creating when the snapshot exists; commands racing for the pool wait their turn (up to --wait seconds), so exactly one creates it.")
    var ifMissing = false

    @Option(help: "With --if-missing: seconds to wait for another command holding the pool.")
    var wait: Double = 60

    @OptionGroup var live: LiveOptions

    func validate() throws {
        guard name.contains("@") else { throw ValidationError("a snapshot is named VOLUME@SNAPSHOT") }
    }

    func run() throws {
        let result = try runPoolCommand(
            .snapshot(name: name, ifMissing: ifMissing), pool: target.pool, options: live, waitSeconds: ifMissing ? wait : 0,
            as: SnapshotCloneResult.self)
        emit(result, live) {
            print(result.created ? "created snapshot \(name)" : "snapshot \(name) exists already")
        }
    }
}
