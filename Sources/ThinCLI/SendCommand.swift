import ArgumentParser
import ThinControl
import ThinPool
import ThinSystem
import ThinTransfer

struct SendCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send",
        abstract: "Write a snapshot, or what changed since an earlier one, as a stream for 'thinbd receive'.",
        discussion: """
            The stream goes to standard output (or -o FILE): pipe it to 'thinbd receive' on another \
            pool, on this host or another ('thinbd send A vm@tue --from vm@mon | ssh runner thinbd \
            receive B'), or keep it in a file or an object store. With --from, only the blocks that \
            differ from that snapshot are sent, found by the walk of 'thinbd diff', so the cost \
            follows the change, not the image's size. Zero runs and trimmed ranges are marked, not \
            sent. Every record carries a checksum (format: docs/send-stream.md). While the pool is \
            served, the walk runs in the server and the data comes through its NBD socket. The \
            summary goes to standard error when the stream is on standard output.
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "The snapshot to send (VOLUME@SNAPSHOT).")
    var image: String

    @Option(name: .customLong("from"), help: ArgumentHelp(
        "Send only what differs from this earlier snapshot (VOLUME@SNAPSHOT), which the receiving pool must hold.",
        valueName: "SNAPSHOT"))
    var base: String?

    @Option(name: [.customShort("o"), .customLong("output")], help: ArgumentHelp("Write the stream to FILE.", valueName: "FILE"))
    var output: String?

    @Flag(help: "Replace FILE if it exists.")
    var force = false

    @OptionGroup var live: LiveOptions

    @OptionGroup(title: "TLS (a server that requires TLS)") var tls: TLSClientOptions

    func validate() throws {
        guard VolumeName.splitSnapshot(image) != nil else { throw ValidationError("send takes a snapshot, VOLUME@SNAPSHOT; take one with 'thinbd snapshot'") }
        if let base, VolumeName.splitSnapshot(base) == nil { throw ValidationError("--from takes a snapshot, VOLUME@SNAPSHOT") }
        if output == nil && SystemInfo.isTerminal(1) {
            throw ValidationError("standard output is a terminal: pipe the stream to 'thinbd receive', or pass -o FILE")
        }
    }

    func run() throws {
        let transfer = ImageTransfer(poolPath: target.pool, controlPath: live.control, tls: try tls.load())
        let stream: ByteStream
        if let output {
            do {
                stream = try ByteStream.creating(output, replacing: force)
            } catch {
                throw fail(ControlError(code: "io", message: error.code == .exists ? "\(output) exists; pass --force to replace it" : "\(output): \(error.message)"), live)
            }
        } else {
            stream = ByteStream.standardOutput()
        }
        let result = try withProgress("sending \(image)", live) { progress in
            try transfer.send(image: image, base: base, to: stream) { progress.update($0, of: $1) }
        }
        let summary = result.base.isEmpty
            ? "sent \(image): \(formatBytes(result.dataBytes)) of data, \(formatBytes(result.zeroBytes)) of zeros marked, a \(formatBytes(result.streamBytes)) stream"
            : "sent \(image) from \(result.base): \(formatBytes(result.dataBytes)) of changed data, \(formatBytes(result.zeroBytes)) of zeros marked, a \(formatBytes(result.streamBytes)) stream"
        if output == nil {
            SystemInfo.writeStandardError((live.json ? ControlJSON.pretty(result) : summary) + "\n")
        } else {
            emit(result, live) { print(summary) }
        }
    }
}
