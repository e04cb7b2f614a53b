import ArgumentParser
import ThinPool

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Take a read-only snapshot VOLUME@SNAPSHOT (constant time, whatever the volume's size).")

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME@SNAPSHOT.")
    var name: String

    @Flag(help: "Succeed without creating when the snapshot exists; commands racing for the pool wait their turn (up to --wait seconds), so exactly one creates it.")
    var ifMissing = false

    @Option(help: "With --if-missing: seconds to wait for another command holding the pool.")
    var wait: Double = 60

    func validate() throws {
        guard name.contains("@") else { throw ValidationError("a snapshot is named VOLUME@SNAPSHOT") }
    }

    func run() throws {
        let created = try withPool(target.pool, waitingForLock: ifMissing ? wait : 0) {
            try $0.snapshot(name, ifMissing: ifMissing).created
        }
        print(created ? "created snapshot \(name)" : "snapshot \(name) exists already")
    }
}
