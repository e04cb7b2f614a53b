import ArgumentParser
import ThinControl
import ThinPool
import ThinSystem
import ThinTransfer

struct ReceiveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive",
        abstract: "Apply a stream from 'thinbd send': a new volume and its snapshot, or the next snapshot of one.",
        discussion: """
            A full stream makes volume NAME (default: the sender's volume name) and snapshot \
            NAME@SNAP. An incremental stream applies onto NAME's copy of its base, found by UUID, \
            and takes NAME@SNAP; NAME then holds the new image. The snapshot keeps the sender's \
            UUID, so the next incremental finds it. The receive is atomic: the stream goes to a \
            staging volume, NAME%receive, and only a complete, checked stream changes NAME. A \
            stream that fails (cut off, corrupt, wrong base) leaves nothing behind, unless \
            --resume is given: then what arrived whole is kept, and the same receive run again \
            with --resume continues from there. While the pool is served, the receive goes through \
            the server (control socket and NBD).
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "Volume to receive into (default: the sender's volume name).")
    var name: String?

    @Option(name: [.customShort("i"), .customLong("input")], help: ArgumentHelp("Read the stream from FILE, not standard input.", valueName: "FILE"))
    var input: String?

    @Flag(help: "Keep what arrived if the stream stops, and continue an interrupted receive of the same stream.")
    var resume = false

    @Flag(help: "Apply an incremental stream even though NAME was written after its copy of the base (those writes are lost).")
    var force = false

    @OptionGroup var live: LiveOptions

    @OptionGroup(title: "TLS (a server that requires TLS)") var tls: TLSClientOptions

    func validate() throws {
        if let name, VolumeName.splitSnapshot(name) != nil {
            throw ValidationError("NAME is a volume; the snapshot's name comes from the stream")
        }
        if input == nil && SystemInfo.isTerminal(0) {
            throw ValidationError("standard input is a terminal: pipe a stream from 'thinbd send', or pass -i FILE")
        }
    }

    func run() throws {
        let transfer = ImageTransfer(poolPath: target.pool, controlPath: live.control, tls: try tls.load())
        let stream: ByteStream
        if let input {
            do {
                stream = try ByteStream.reading(input)
            } catch {
                throw fail(ControlError(code: "io", message: "\(input): \(error.message)"), live)
            }
        } else {
            stream = ByteStream.standardInput()
        }
        let result = try withProgress("receiving", live) { progress in
            try transfer.receive(into: name, from: stream, resume: resume, force: force) { progress.update($0, of: $1) }
        }
        emit(result, live) {
            if result.discardedEarlier { print("discarded an earlier interrupted receive into \(result.volume)") }
            let resumed = result.resumedFrom > 0 ? ", resumed after \(formatBytes(result.resumedFrom))" : ""
            print("received \(result.snapshot.name) (\(result.incremental ? "incremental" : "full")\(resumed)): \(formatBytes(result.dataBytes)) of data, \(formatBytes(result.zeroBytes)) of zeros")
        }
    }
}
