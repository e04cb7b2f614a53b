import ArgumentParser
import ThinControl
import ThinFormat
import ThinPool
import ThinSystem
import ThinTransfer

struct CloneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clone", abstract: "Create a writable volume from a volume or snapshot (constant time), or from an image elsewhere.",
        discussion: """
            SOURCE is a volume or snapshot of the pool, or an origin outside it: an NBD URI \
            (nbd[s]://HOST[:PORT]/EXPORT, nbd[s]+unix:///EXPORT?socket=PATH) or a raw file. A clone of \
            an origin reads each block from the origin the first time it is needed and keeps it; \
            writes, trims and zeroes stay local. The origin must stay the same image: its size, and \
            for a thinbd server the snapshot's UUID, are recorded and checked whenever it is reached.
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME or VOLUME@SNAPSHOT to clone, or an origin: an NBD URI or a raw file.")
    var source: String

    @Argument(help: "Name of the new volume.")
    var name: String

    @Flag(help: "Succeed without creating when NAME exists as a clone of SOURCE; commands racing for the pool wait their turn (up to --wait seconds), so exactly one creates it.")
    var ifMissing = false

    @Option(help: "With --if-missing: seconds to wait for another command holding the pool.")
    var wait: Double = 60

    @OptionGroup var live: LiveOptions

    @OptionGroup(title: "TLS (an nbds:// origin)") var tls: TLSClientOptions

    /// An origin is a URI or a path; a pool name never has '/' and a snapshot has '@'.
    var isOrigin: Bool { source.contains("://") || source.contains("/") }

    func run() throws {
        let command: ControlCommand
        if isOrigin {
            guard !ifMissing else { throw fail(ControlError(code: "invalid-argument", message: "--if-missing takes a volume or snapshot SOURCE"), live) }
            let origin: VolumeRecord.Origin
            do {
                origin = try OriginConnector.probe(source, tls: try tls.load(), workingDirectory: SystemInfo.workingDirectory())
            } catch let error as TransferError {
                throw fail(ControlError(code: "io", message: error.description), live)
            }
            command = .cloneOrigin(name: name, origin: origin)
        } else {
            command = .clone(source: source, name: name, ifMissing: ifMissing)
        }
        let result = try runPoolCommand(command, pool: target.pool, options: live, waitSeconds: ifMissing ? wait : 0, as: SnapshotCloneResult.self)
        emit(result, live) {
            print(result.created ? "created clone \(name) of \(source)" : "clone \(name) of \(source) exists already")
        }
    }
}
