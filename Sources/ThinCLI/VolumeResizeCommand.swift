import ArgumentParser
import ThinControl
import ThinPool

struct VolumeResizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize",
        abstract: "Grow or shrink a volume; shrinking discards the data past the new end.",
        discussion: """
            Connected clients keep the size they were told until they reconnect. While the pool \
            is served, shrinking a volume with clients is refused unless --force.
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "Volume name.")
    var name: String

    @Option(help: "New virtual size.")
    var size: ByteSize

    @Flag(help: "When shrinking, disconnect the volume's clients first.")
    var force = false

    @OptionGroup var live: LiveOptions

    func run() throws {
        let result = try runPoolCommand(.resize(name: name, size: size.bytes, force: force), pool: target.pool, options: live, as: ResizeResult.self)
        emit(result, live) { print("resized \(name) to \(formatBytes(size.bytes))\(disconnectedNote(result.disconnected))") }
    }
}
