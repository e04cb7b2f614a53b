// Coverage-guided fuzzing (libFuzzer, `swiftc -sanitize=fuzzer`) of everything that
// decodes untrusted bytes without a pool around it: metadata block decoders and node
// checks, the NBD server's parser, handshake state machine and request validation (fed
// whole and one byte at a time), the client handshake, and the control socket's line
// framer and request decoder. The first input byte picks the target; the rest is
// its input. Built and run by tools/fuzz-libfuzzer.sh; only in the package when
// THINBD_FUZZ is set, so the regular build never compiles it.
import NBDProtocol
import NBDServer
import NIOCore
import ThinControl
import ThinFormat

/// libFuzzer's driver, called from the executable's entry point: SwiftPM links
/// executables with `main` renamed to `<product>_main`, so libFuzzer's own `main` is
/// not the one that runs.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

@_cdecl("thinbd_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> CInt {
    var count = argc
    var arguments = argv
    return LLVMFuzzerRunDriver(&count, &arguments) { data, size in
        guard let data else { return 0 }
        return fuzzOneInput(data, size)
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let input = UnsafeBufferPointer(start: data + 1, count: size - 1)
    switch data[0] % 7 {
    case 0: fuzzMetadataBlock(input, as: .mappingNode)
    case 1: fuzzMetadataBlock(input, as: .volumeRecord)
    case 2: fuzzSuperblock(input)
    case 3: fuzzServerSession(input, byteAtATime: false)
    case 4: fuzzServerSession(input, byteAtATime: true)
    case 5: fuzzClientHandshake(input)
    default: fuzzControlLines(input)
    }
    return 0
}

/// A 4 KiB block made of the input (zero-padded), sealed with a correct CRC so that the
/// decoders behind the checksum are reached, at the block number the input's first
/// bytes give.
func sealedBlock(_ input: UnsafeBufferPointer<UInt8>) -> (UnsafeMutableRawBufferPointer, UInt64) {
    let block = UnsafeMutableRawBufferPointer.allocate(byteCount: MetadataLayout.blockSize, alignment: 16)
    block.initializeMemory(as: UInt8.self, repeating: 0)
    for (i, byte) in input.prefix(MetadataLayout.blockSize).enumerated() { block[i] = byte }
    let number = block.le64(16)
    let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: block[4...]))
    block.setLE32(0, crc)
    return (block, number)
}

func fuzzMetadataBlock(_ input: UnsafeBufferPointer<UInt8>, as type: BlockType) {
    let (block, number) = sealedBlock(input)
    defer { block.deallocate() }
    let rawType = block.le16(8)
    guard let header = try? BlockHeader.validate(block, expectedType: BlockType(rawValue: rawType) ?? type, blockNumber: number, maxGeneration: .max) else { return }
    switch header.type {
    case .volumeRecord:
        _ = try? VolumeRecord.decode(block)
    case .mappingNode, .volumeTableNode, .spaceMapIndexNode:
        let node = NodeView(block)
        guard (try? node.validateShape()) != nil else { return }
        // A node that passed its shape check must answer every query without trapping.
        for probe in [0, 1, UInt64.max, block.le64(32)] {
            _ = node.lowerBound(probe)
            _ = node.childIndex(for: probe)
        }
        for i in 0..<node.count { _ = (node.key(i), node.value(i)) }
    default:
        break
    }
}

func fuzzSuperblock(_ input: UnsafeBufferPointer<UInt8>) {
    let (block, _) = sealedBlock(input)
    defer { block.deallocate() }
    for slot in MetadataLayout.superblockSlots {
        block.setLE64(16, slot)
        block.setLE32(0, CRC32C.checksum(UnsafeRawBufferPointer(rebasing: block[4...])))
        if let superblock = try? Superblock.decode(block, slot: slot) {
            _ = superblock.fileSize
        }
    }
}

/// A catalog with one read-write export and one read-only export.
struct FuzzCatalog: NBDExportCatalog {
    static let exports = [
        NBDExportDescription(name: "disk", size: 1 << 30, isReadOnly: false, description: "a disk"),
        NBDExportDescription(name: "disk@snap", size: 1 << 20, isReadOnly: true, description: ""),
    ]
    func export(named name: String) -> NBDExportDescription? {
        Self.exports.first { $0.name == name || (name.isEmpty && $0.name == "disk") }
    }
    func allExports() -> [NBDExportDescription] { Self.exports }
}

/// Client bytes into the server's parser and handshake, then transmission requests.
func fuzzServerSession(_ input: UnsafeBufferPointer<UInt8>, byteAtATime: Bool) {
    var parser = NBDServerParser()
    var handshake = NBDHandshake()
    var buffer = ByteBuffer()
    var open = true
    var session: NBDSession?
    func drain() {
        while open {
            let message: NBDServerParser.Message?
            do {
                message = try parser.next(&buffer)
            } catch {
                open = false
                return
            }
            guard let message else { return }
            if case .request(let request) = message {
                // Every request is validated against the negotiated session, as the server does.
                if let session { _ = NBDRequestValidator.validate(request.header, session: session) }
                continue
            }
            guard handshake.acceptsMessages else { continue }
            for action in handshake.receive(message, catalog: FuzzCatalog()) {
                switch action {
                case .enterTransmission(let negotiated):
                    session = negotiated
                    parser.enterTransmission()
                case .close: open = false
                default: break
                }
            }
        }
    }
    if byteAtATime {
        for byte in input where open {
            buffer.writeInteger(byte)
            drain()
        }
    } else {
        buffer.writeBytes(input)
        drain()
    }
}

/// Bytes on the control socket: framed into lines (a small limit, so the over-long path
/// is reached too), each line decoded as a request and as a reply to `info`.
func fuzzControlLines(_ input: UnsafeBufferPointer<UInt8>) {
    var framer = ControlLineFramer(limit: 4096)
    framer.append(input)
    while true {
        guard let line = try? framer.nextLine() else { return }
        _ = try? ControlCommand(line: line)
        _ = try? ControlReply(line: line, answering: .info)
    }
}

/// Server bytes into the client's handshake (the copy tools' client).
func fuzzClientHandshake(_ input: UnsafeBufferPointer<UInt8>) {
    var client = NBDClientHandshake(exportName: "disk")
    var buffer = ByteBuffer()
    buffer.writeBytes(input)
    _ = try? client.receive(&buffer)
}
