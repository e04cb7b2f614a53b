import ArgumentParser
import ThinControl
import ThinPool
import ThinTransfer

struct HydrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hydrate",
        abstract: "Copy every block an origin-backed clone still reads from its origin, then drop the origin.",
        discussion: """
            Runs while clients use the volume: each block is fetched and stored as a read would \
            store it. Through the server when the pool is served, 64 MiB of the volume per step, \
            so other commands are not held up. When it finishes the volume no longer needs its \
            origin, and 'volume list' shows none. Snapshots taken before keep their origin.
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "The origin-backed volume.")
    var name: String

    @Option(help: "Fetch at most this many bytes a second (e.g. 50M).")
    var rate: ByteSize?

    @OptionGroup(title: "TLS (an nbds:// origin, when the pool is not served)") var tls: TLSClientOptions
    @OptionGroup var live: LiveOptions

    func run() throws {
        let transfer = ImageTransfer(poolPath: target.pool, controlPath: live.control, tls: try tls.load())
        let result = try withProgress("hydrating \(name)", live) { progress in
            try transfer.hydrate(name: name, rate: rate?.bytes) { progress.update($0, of: $1) }
        }
        emit(result, live) {
            print("hydrated \(name): \(formatBytes(result.fetchedBytes)) fetched in \(Double(Int(result.seconds * 10)) / 10) s; it no longer needs its origin")
        }
    }
}
