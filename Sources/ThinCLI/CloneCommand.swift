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

    func run() throws {
        try withPool(target.pool) { _ = try $0.clone(source, as: name) }
        print("created clone \(name) of \(source)")
    }
}
