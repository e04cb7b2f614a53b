import NBDProtocol
import NIOCore
import Testing
import ThinSystem

@testable import NBDServer

/// Mutated client streams through `NBDConnectionCore`, the request logic both
/// transports share, driven as a transport drives it: bytes in random pieces, steps run
/// and finished in random order, shutdowns and half-closes at random moments. Nothing
/// may trap, every request that started must finish (the in-flight count and payload
/// bytes return to zero), and every reply must be one the client can frame.
@Suite struct ConnectionCoreFuzzTests {
    private static let session = NBDSession(
        export: NBDExportDescription(name: "disk", size: 1 << 24, isReadOnly: false, description: ""),
        flags: [], structuredReplies: true,
        metaContexts: [NBDSelectedMetaContext(id: 1, name: NBDHandshake.allocationContext, kind: .allocation)])

    private static func seed(_ variant: Int) -> [UInt8] {
        var b = ByteBuffer()
        let commands: [(NBDCommand, NBDCommandFlags, UInt64, UInt32)] = [
            (.read, [], 0, 4096), (.write, [], 4096, 512), (.read, .dontFragment, 8192, 65536),
            (.write, .fua, 1 << 20, 70000), (.flush, [], 0, 0), (.trim, [], 0, 1 << 16),
            (.writeZeroes, .noHole, 8192, 8192), (.blockStatus, .requestOne, 0, 1 << 20), (.cache, [], 0, 4096),
            (.read, [], (1 << 24) - 100, 4096), (.disconnect, [], 0, 0),
        ]
        for (i, (command, flags, offset, length)) in commands.enumerated() where (i + variant) % 3 != 0 || command == .disconnect {
            let payload = command == .write ? ByteBuffer(repeating: UInt8(i), count: Int(length)) : nil
            b.writeNBDRequest(NBDRequest(
                header: NBDRequestHeader(flags: flags, command: command, cookie: UInt64(i), offset: offset, length: length),
                payload: payload))
        }
        return Array(b.readableBytesView)
    }

    private static func mutate(_ input: [UInt8], _ rng: inout SplitMix64) -> [UInt8] {
        var bytes = input
        for _ in 0...rng.below(4) {
            guard !bytes.isEmpty else { break }
            let at = rng.below(bytes.count)
            switch rng.below(5) {
            case 0: bytes[at] = UInt8(truncatingIfNeeded: rng.next())
            case 1: bytes[at] ^= 1 << UInt8(rng.below(8))
            case 2: bytes.removeSubrange(at..<min(bytes.count, at + 1 + rng.below(64)))
            case 3: bytes.insert(contentsOf: (0..<rng.below(32)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: at)
            default:
                // A length field (a request's last 4 header bytes) set to something odd.
                let odd: [UInt32] = [0, 1, 0xFFFF_FFFF, 32 << 20, (32 << 20) + 1, 16384]
                let value = odd[rng.below(odd.count)]
                for k in 0..<4 where at + k < bytes.count { bytes[at + k] = UInt8(truncatingIfNeeded: value >> (24 - 8 * k)) }
            }
        }
        return bytes
    }

    /// What is running: a step's outcome still to report.
    private enum Running {
        case read(NBDConnectionCore.PendingRead)
        case blocking(UInt64)
        case writes([GatheredWrite])
    }

    /// Frames `replies` as a client that negotiated structured replies would: READs
    /// answer in chunks, everything else may be a simple reply, which then carries no
    /// data. False when a reply does not frame.
    private static func framesCleanly(_ bytes: [UInt8]) -> Bool {
        var buffer = ByteBuffer(bytes: bytes)
        while buffer.readableBytes > 0 {
            guard let magic = buffer.readInteger(as: UInt32.self) else { return false }
            switch magic {
            case NBDMagic.simpleReply:
                guard buffer.readInteger(as: UInt32.self) != nil, buffer.readInteger(as: UInt64.self) != nil else { return false }
            case NBDMagic.structuredReply:
                guard buffer.readInteger(as: UInt16.self) != nil, buffer.readInteger(as: UInt16.self) != nil,
                    buffer.readInteger(as: UInt64.self) != nil, let length = buffer.readInteger(as: UInt32.self),
                    buffer.readSlice(length: Int(length)) != nil
                else { return false }
            default:
                return false
            }
        }
        return true
    }

    @Test func mutatedStreamsNeverTrapAndEveryRequestFinishes() {
        var rng = SplitMix64(seed: 0x7411_B0D5)
        for iteration in 0..<1500 {
            let input = Self.mutate(Self.seed(iteration % 3), &rng)
            var core = NBDConnectionCore(maxInFlight: 1 + rng.below(8), maxInFlightBytes: 1 << 20, allocator: ByteBufferAllocator())
            let rateLimit = rng.below(4) == 0 ? NBDRateLimit(.init(operationsPerSecond: 1_000_000)) : nil
            core.enterTransmission(session: Self.session, rateLimit: rateLimit)
            var running: [Running] = []
            var replies: [UInt8] = []
            var rest = ByteBuffer(bytes: input)
            var closed = false

            func finishOne(_ index: Int) -> NBDConnectionState.Actions {
                switch running.remove(at: index) {
                case .read(let read):
                    if rng.below(5) == 0 { return core.finishRead(read, .failure(NBDExportError(.io, "fuzzed failure"))) }
                    return core.finishRead(read, .success([NBDExtent(offset: read.request.offset, length: UInt64(read.request.length), isHole: rng.below(2) == 0)]))
                case .blocking(let cookie):
                    var reply = ByteBuffer()
                    NBDReplyEncoder.done(cookie: cookie, into: &reply)
                    return core.finishBlocking(cookie: cookie, .success(reply))
                case .writes(let writes):
                    return core.finishWrites(writes, .success(writes.map { _ in rng.below(4) == 0 ? NBDExportError(.noSpace, "full") : nil }))
                }
            }

            func pass() {
                while let step = core.nextStep(handshakeAcceptsMessages: false) {
                    switch step {
                    case .read(let request, _):
                        running.append(.read(NBDConnectionCore.PendingRead(request, allocator: core.allocator)))
                    case .blocking(_, let cookie, _):
                        running.append(.blocking(cookie))
                    case .handshake, .protocolError:
                        closed = true
                        core.closed()
                        return
                    }
                }
                if let (writes, _) = core.takeGatheredWrites() { running.append(.writes(writes)) }
                if core.endPass().contains(.close) { closed = true }
            }

            while !closed && (rest.readableBytes > 0 || !running.isEmpty) {
                switch rng.below(8) {
                case 0 where !running.isEmpty:
                    let actions = finishOne(rng.below(running.count))
                    if actions.contains(.parse) && core.passIsUseful { pass() }
                    if actions.contains(.close) { closed = true }
                case 1:
                    let actions = core.shutdownRequested()
                    if actions.contains(.parse) { pass() }
                    if actions.contains(.close) { closed = true }
                case 2 where rest.readableBytes == 0:
                    let actions = core.inputEnded()
                    if actions.contains(.parse) && core.passIsUseful { pass() }
                    if actions.contains(.close) { closed = true }
                default:
                    guard rest.readableBytes > 0 else { continue }
                    var piece = rest.readSlice(length: min(rest.readableBytes, 1 + rng.below(9000)))!
                    if core.receive(&piece) { pass() }
                }
                core.takeReplies { replies += Array($0.readableBytesView) }
                core.repliesFlushed()
            }
            // Whatever is left running still finishes (on a closed connection too), and
            // WRITEs a pass gathered before a protocol error ended it are handed back.
            if let (writes, _) = core.takeGatheredWrites() { running.append(.writes(writes)) }
            while !running.isEmpty { _ = finishOne(rng.below(running.count)) }
            core.takeReplies { replies += Array($0.readableBytesView) }
            #expect(core.state.inFlight == 0 && core.state.inFlightBytes == 0, "iteration \(iteration): requests never finished")
            #expect(Self.framesCleanly(replies), "iteration \(iteration): replies do not frame")
        }
    }
}

extension SplitMix64 {
    /// A number in 0..<n (0 when n is not positive).
    fileprivate mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }
}
