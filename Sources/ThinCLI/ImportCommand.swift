import ArgumentParser
import ThinControl
import ThinPool
import ThinTransfer

struct ImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Create a volume from a raw image file, a block device or an NBD export.",
        discussion: """
            Zero runs are not written, so they stay unmapped; holes of a sparse file are not even \
            read. While the pool is served, the volume is made through the server and the data goes \
            through its NBD socket. A failed import deletes the volume it made. For qcow2 and other \
            formats, serve the image with 'qemu-nbd -r -f qcow2 --socket S IMAGE' and import \
            'nbd+unix:///?socket=S', or convert it first with 'qemu-img convert -O raw'.
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "Name of the new volume.")
    var name: String

    @Argument(help: "A raw file or block device, or an NBD URI (nbd[s]://HOST[:PORT]/EXPORT, nbd[s]+unix:///EXPORT?socket=PATH).")
    var source: String

    @Option(help: "Volume size (default: the source's size); may exceed it, and the rest reads as zeros.")
    var size: ByteSize?

    @OptionGroup var live: LiveOptions

    @OptionGroup(title: "TLS (an nbds:// source, or a server that requires TLS)") var tls: TLSClientOptions

    func run() throws {
        let credentials = try tls.load()
        let transfer = ImageTransfer(poolPath: target.pool, controlPath: live.control, tls: credentials)
        let result = try withProgress("importing \(name)", live) { progress in
            try transfer.importImage(name: name, from: try ImageTransfer.openSource(source, tls: credentials), size: size?.bytes) {
                progress.update($0, of: $1)
            }
        }
        emit(result, live) {
            print("imported \(source) as \(name): \(formatBytes(result.bytesRead)), \(formatBytes(result.bytesWritten)) written, \(formatBytes(result.bytesRead - result.bytesWritten)) of zeros left unmapped")
        }
    }
}
