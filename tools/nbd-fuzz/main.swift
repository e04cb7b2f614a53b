// A fuzz loop over the server's decoders and handshake: mutated NBD client streams go
// through the same pure code the server runs (parser, handshake state machine, request
// validator, reply encoder); random bytes go through the client-side reply decoders.
// A crash (trap) fails the run; so does a parsed message that does not re-encode to
// the bytes it came from.
//
// Usage: nbd-fuzz [ITERATIONS] [SEED]      (tools/fuzz-nbd.sh builds it in release mode)
import NBDProtocol
import NBDServer
import NIOCore

struct Rng {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE5_E4B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }
}

struct Catalog: NBDExportCatalog {
    let exports = [
        NBDExportDescription(name: "disk", size: 1 << 30, isReadOnly: false, description: "thin volume", preferredBlockSize: 65536),
        NBDExportDescription(name: "disk@s", size: 1 << 20, isReadOnly: true, description: "snapshot"),
    ]
    func export(named name: String) -> NBDExportDescription? { exports.first { $0.name == (name.isEmpty ? "disk" : name) } }
    func allExports() -> [NBDExportDescription] { exports }
}

/// Valid client sessions to mutate.
func seeds() -> [[UInt8]] {
    var result: [[UInt8]] = []
    for variant in 0..<6 {
        var b = ByteBuffer()
        b.writeNBDClientFlags(variant == 5 ? [] : [.fixedNewstyle, .noZeroes])
        if variant % 2 == 0 { b.writeNBDOptionRequest(NBDOptionRequest(option: .structuredReply)) }
        var meta = ByteBuffer()
        meta.writeNBDMetaContextQuery(NBDMetaContextQuery(exportName: "disk", queries: ["base:allocation", "base:"]))
        b.writeNBDOptionRequest(NBDOptionRequest(option: variant == 1 ? .listMetaContext : .setMetaContext, payload: meta))
        b.writeNBDOptionRequest(NBDOptionRequest(option: .list))
        var query = ByteBuffer()
        query.writeNBDExportQuery(NBDExportQuery(name: variant == 3 ? "disk@s" : "disk", infoRequests: [.name, .description, .blockSize]))
        b.writeNBDOptionRequest(NBDOptionRequest(option: .info, payload: query))
        if variant == 4 {
            b.writeNBDOptionRequest(NBDOptionRequest(option: .exportName, payload: ByteBuffer(string: "disk")))
        } else {
            b.writeNBDOptionRequest(NBDOptionRequest(option: .go, payload: query))
        }
        let commands: [(NBDCommand, NBDCommandFlags, UInt64, UInt32)] = [
            (.read, [], 0, 4096), (.read, .dontFragment, 4096, 65536), (.write, .fua, 512, 1000), (.flush, [], 0, 0),
            (.trim, [], 0, 1 << 20), (.writeZeroes, [.noHole], 8192, 8192), (.writeZeroes, [.fastZero], 0, 1 << 20),
            (.blockStatus, .requestOne, 0, 1 << 30), (.cache, [], 0, 4096), (.disconnect, [], 0, 0),
        ]
        for (i, (command, flags, offset, length)) in commands.enumerated() {
            let payload = command == .write ? ByteBuffer(repeating: UInt8(i), count: Int(length)) : nil
            b.writeNBDRequest(NBDRequest(header: NBDRequestHeader(flags: flags, command: command, cookie: UInt64(i), offset: offset, length: length), payload: payload))
        }
        result.append(Array(b.readableBytesView))
    }
    return result
}

func mutate(_ input: [UInt8], _ rng: inout Rng) -> [UInt8] {
    var bytes = input
    for _ in 0..<(1 + rng.below(6)) {
        switch rng.below(8) {
        case 0 where !bytes.isEmpty:
            bytes[rng.below(bytes.count)] ^= UInt8(1 << rng.below(8))
        case 1 where !bytes.isEmpty:
            bytes[rng.below(bytes.count)] = UInt8(truncatingIfNeeded: rng.next())
        case 2:
            let at = rng.below(bytes.count + 1)
            bytes.insert(contentsOf: (0..<rng.below(16)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: at)
        case 3 where bytes.count > 1:
            let at = rng.below(bytes.count)
            bytes.removeSubrange(at..<min(bytes.count, at + 1 + rng.below(32)))
        case 4 where bytes.count > 4:
            // A length or count field set to an interesting value.
            let at = rng.below(bytes.count - 4)
            let values: [UInt32] = [0, 1, 0xFFFF, 0x1_0000, 0x7FFF_FFFF, 0xFFFF_FFFF, 4096, 33 << 20, 65 << 20]
            let v = values[rng.below(values.count)]
            for k in 0..<4 { bytes[at + k] = UInt8(truncatingIfNeeded: v >> (24 - 8 * k)) }
        case 5:
            bytes = Array(bytes.prefix(rng.below(bytes.count + 1)))
        case 6 where bytes.count > 8:
            let a = rng.below(bytes.count)
            let b = rng.below(bytes.count)
            let chunk = Array(bytes[min(a, b)..<max(a, b)])
            bytes.insert(contentsOf: chunk.prefix(256), at: rng.below(bytes.count))
        default:
            bytes.append(contentsOf: (0..<rng.below(64)).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
        }
    }
    return bytes
}

/// Runs a client stream through the server's logic in random-sized pieces.
func serve(_ input: [UInt8], _ rng: inout Rng) {
    var parser = NBDServerParser()
    var handshake = NBDHandshake()
    var session: NBDSession?
    var pending = ByteBuffer()
    var offset = 0
    let catalog = Catalog()
    while offset < input.count {
        let n = 1 + rng.below(64)
        pending.writeBytes(input[offset..<min(input.count, offset + n)])
        offset += n
        while true {
            let before = pending.readableBytes
            let message: NBDServerParser.Message?
            do {
                message = try parser.next(&pending)
            } catch {
                return
            }
            guard let message else { break }
            precondition(pending.readableBytes <= before, "parser produced bytes")
            switch message {
            case .option(let request):
                var again = ByteBuffer()
                again.writeNBDOptionRequest(request)
                precondition(again.readableBytes == 16 + request.payload.readableBytes)
            case .request(let request):
                var again = ByteBuffer()
                again.writeNBDRequest(request)
                var parsed = NBDServerParser()
                parsed.enterTransmission()
                precondition((try? parsed.next(&again)) == .request(request), "request did not round-trip")
            default:
                break
            }
            if let session {
                guard case .request(let request) = message else { continue }
                switch NBDRequestValidator.validate(request.header, session: session) {
                case .execute(.read(let off, let length, let df)):
                    var out = ByteBuffer()
                    let data = ByteBuffer(repeating: 0, count: Int(length))
                    NBDReplyEncoder.read(cookie: request.header.cookie, offset: off, data: data, extents: [NBDExtent(offset: off, length: UInt64(length), isHole: length % 2 == 0)], structured: session.structuredReplies, dontFragment: df, into: &out)
                case .execute(.blocking(.blockStatus(let off, let length, let one))):
                    var out = ByteBuffer()
                    NBDReplyEncoder.blockStatus(cookie: 1, contextID: session.allocationContextID ?? 1, offset: off, length: length, extents: [NBDStatusExtent(offset: off, length: UInt64(length), flags: 3)], onlyOne: one, into: &out)
                case .execute(.disconnect):
                    return
                case .reject(let error, let text):
                    var out = ByteBuffer()
                    NBDReplyEncoder.error(error, message: text, cookie: request.header.cookie, structured: session.structuredReplies, into: &out)
                default:
                    break
                }
            } else {
                for action in handshake.receive(message, catalog: catalog) {
                    switch action {
                    case .enterTransmission(let s):
                        session = s
                        parser.enterTransmission()
                    case .close:
                        return
                    case .send(let reply):
                        var out = ByteBuffer()
                        out.writeNBDOptionReply(reply)
                    case .sendExportName(let reply):
                        var out = ByteBuffer()
                        out.writeNBDExportNameReply(reply)
                    case .ask:
                        fatalError("receive(_:catalog:) answers every query")
                    case .startTLS:
                        // The fuzzer's handshake runs without TLS (mode off): never here.
                        return
                    }
                }
            }
        }
    }
}

/// Random bytes through the client-side decoders (what a fuzzed server would send).
func decodeReplies(_ input: [UInt8]) {
    var buffer = ByteBuffer(bytes: input)
    while (try? buffer.readNBDStructuredChunk()) != nil {}
    buffer = ByteBuffer(bytes: input)
    while (try? buffer.readNBDOptionReply()) != nil {}
    buffer = ByteBuffer(bytes: input)
    _ = try? buffer.readNBDGreeting()
    buffer = ByteBuffer(bytes: input)
    _ = try? buffer.readNBDExportQuery()
    buffer = ByteBuffer(bytes: input)
    _ = try? buffer.readNBDMetaContextQuery()
}

let arguments = CommandLine.arguments
let iterations = arguments.count > 1 ? Int(arguments[1]) ?? 1_000_000 : 1_000_000
var rng = Rng(state: arguments.count > 2 ? UInt64(arguments[2]) ?? 1 : 1)
let corpus = seeds()
var inputs = 0
var bytesFed = 0
for i in 0..<iterations {
    let input = i % 8 == 7
        ? (0..<rng.below(256)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        : mutate(corpus[rng.below(corpus.count)], &rng)
    serve(input, &rng)
    decodeReplies(input)
    inputs += 1
    bytesFed += input.count
    if inputs % 200_000 == 0 { print("\(inputs) inputs") }
}
print("nbd-fuzz: \(inputs) inputs (\(bytesFed) bytes) through the parser, handshake, validator and reply decoders: no crash, every message round-tripped")
