import ArgumentParser
import ThinControl
import ThinPool

struct CloneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clone", abstract: "Create a writable volume from a volume or snapshot (constant time).")

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME or VOLUME@SNAPSHOT to clone.")
    var source: String

    @Argument(help: "Name of the new volume.")
    var name: String

    @Flag(help: "Succeed without creating when NAME exists as a clone of SOURCE; commands racing for the pool wait their turn (up to --wait seconds), so exactly one creates it.")
    var ifMissing = false

    @Option(help: "With --if-missing: seconds to wait for another command holding the pool.")
    var wait: Double = 60

    @OptionGroup var live: LiveOptions

    func run() throws {
        let result = try runPoolCommand(
            .clone(source: source, name: name, ifMissing: ifMissing), pool: target.pool, options: live,
            waitSeconds: ifMissing ? wait : 0, as: SnapshotCloneResult.self)
        emit(result, live) {
            print(result.created ? "created clone \(name) of \(source)" : "clone \(name) of \(source) exists already")
        }
    }
}
