import ArgumentParser
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

    func run() throws {
        let created = try withPool(target.pool, waitingForLock: ifMissing ? wait : 0) {
            try $0.clone(source, as: name, ifMissing: ifMissing).created
        }
        print(created ? "created clone \(name) of \(source)" : "clone \(name) of \(source) exists already")
    }
}
