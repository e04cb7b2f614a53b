import ArgumentParser
import ThinControl
import ThinPool
import ThinTransfer

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Copy a volume or snapshot to a sparse raw file.",
        discussion: """
            Unmapped space and zero runs become holes. While the pool is served, the data comes \
            through the server's NBD socket, from a snapshot taken for the export (and deleted \
            after it), so a volume that clients are writing is exported as one point in time. For \
            qcow2, convert the export with 'qemu-img convert -O qcow2 nbd+unix:///VOL@SNAP?socket=S out.qcow2'.
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "VOLUME or VOLUME@SNAPSHOT.")
    var name: String

    @Argument(help: "The raw file to write.")
    var destination: String

    @Flag(help: "Replace DESTINATION if it exists.")
    var force = false

    @OptionGroup var live: LiveOptions

    @OptionGroup(title: "TLS (a server that requires TLS)") var tls: TLSClientOptions

    func run() throws {
        let transfer = ImageTransfer(poolPath: target.pool, controlPath: live.control, tls: try tls.load())
        let result = try withProgress("exporting \(name)", live) { progress in
            try transfer.exportImage(name: name, to: destination, replacing: force) { progress.update($0, of: $1) }
        }
        emit(result, live) {
            print("exported \(name) to \(destination): \(formatBytes(result.bytes)), \(formatBytes(result.bytesWritten)) of data, the rest holes")
        }
    }
}
