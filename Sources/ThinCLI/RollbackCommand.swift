import ArgumentParser
import ThinPool

struct RollbackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rollback", abstract: "Return volume VOLUME to the contents of its snapshot VOLUME@SNAPSHOT.")

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME@SNAPSHOT.")
    var name: String

    func run() throws {
        try withPool(target.pool) { try $0.rollback(name) }
        print("rolled \(name.split(separator: "@").first.map(String.init) ?? name) back to \(name)")
    }
}
