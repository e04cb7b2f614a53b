import ArgumentParser
import ThinPool

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Take a read-only snapshot VOLUME@SNAPSHOT (constant time, whatever the volume's size).")

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME@SNAPSHOT.")
    var name: String

    func validate() throws {
        guard name.contains("@") else { throw ValidationError("a snapshot is named VOLUME@SNAPSHOT") }
    }

    func run() throws {
        try withPool(target.pool) { _ = try $0.snapshot(name) }
        print("created snapshot \(name)")
    }
}
