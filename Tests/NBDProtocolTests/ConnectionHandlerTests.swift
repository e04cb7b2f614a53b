import Foundation
import NBDProtocol
import NIOCore
import NIOEmbedded
import Testing

@testable import NBDServer

/// A 1 MiB in-memory export named "disk", counting opens and closes.
final class MemoryExports: NBDExportProvider, @unchecked Sendable {
    let lock = NSLock()
    var bytes = [UInt8](repeating: 0, count: 1 << 20)
    var opens = 0
    var closes = 0
    /// When set, `open` fails with it (an export being changed, a full pool).
    var refusal: NBDExportError?

    var description: NBDExportDescription {
        NBDExportDescription(name: "disk", size: UInt64(bytes.count), isReadOnly: false, description: "memory")
    }

    /// How many connections' batches each `writeBatches` call carried.
    var batchCalls: [Int] = []

    func writeBatches(_ batches: [NBDWriteBatch]) -> [[NBDExportError?]] {
        lock.withLock { batchCalls.append(batches.count) }
        return batches.map { $0.export.writeBatch($0.writes) }
    }

    func describe(_ name: String) -> NBDExportDescription? { name == "disk" ? description : nil }
    func allExports() -> [NBDExportDescription] { [description] }

    func open(_ description: NBDExportDescription) throws(NBDExportError) -> NBDExport {
        let refused = lock.withLock { () -> NBDExportError? in
            if let refusal { return refusal }
            opens += 1
            return nil
        }
        if let refused { throw refused }
        return MemoryExport(exports: self)
    }
}

final class MemoryExport: NBDExport, @unchecked Sendable {
    let exports: MemoryExports
    init(exports: MemoryExports) { self.exports = exports }

    var exportDescription: NBDExportDescription { exports.description }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(NBDExportError) -> [NBDExtent] {
        exports.lock.withLock {
            exports.bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
        }
        return [NBDExtent(offset: offset, length: UInt64(buffer.count), isHole: false)]
    }

    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws(NBDExportError) {
        exports.lock.withLock { exports.bytes.replaceSubrange(Int(offset)..<Int(offset) + buffer.count, with: buffer) }
    }

    func writeZeroes(at offset: UInt64, length: UInt64, mayTrim: Bool, fua: Bool) throws(NBDExportError) {
        exports.lock.withLock { exports.bytes.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length))) }
    }

    func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(NBDExportError) {}
    func flush() throws(NBDExportError) {}
    func extents(at offset: UInt64, length: UInt64) throws(NBDExportError) -> [NBDExtent] {
        [NBDExtent(offset: offset, length: length, isHole: false)]
    }
    func close() { exports.lock.withLock { exports.closes += 1 } }
}

/// The connection handler driven through an `EmbeddedChannel`, with its off-loop work
/// run inline: every byte in and out is checked, deterministically.
@Suite struct ConnectionHandlerTests {
    final class Harness {
        let exports = MemoryExports()
        let server: NBDServer
        var channels: [EmbeddedChannel] = []
        let logLines = NSLockedLines()

        init(configure: (inout NBDServer.Configuration) -> Void = { _ in }) {
            var configuration = NBDServer.Configuration()
            configuration.eventLoopThreads = 1
            configuration.ioThreads = 1
            configure(&configuration)
            let lines = logLines
            server = NBDServer(provider: exports, configuration: configuration, log: { lines.append($0) }, inlineBlockingWork: true)
        }

        deinit { server.shutdown(timeout: .milliseconds(10)) }

        /// One loop and its I/O for every connection, as on one server loop.
        let loop = EmbeddedEventLoop()
        lazy var loopIO = LoopIO(eventLoop: loop, blocking: .inline, provider: exports)

        /// A connected channel with the handler; the greeting is consumed when `greet`.
        func connect(greet: Bool = true) throws -> EmbeddedChannel {
            let channel = EmbeddedChannel(loop: loop)
            let handler = NBDConnectionHandler(server: server, loopIO: loopIO)
            try channel.pipeline.syncOperations.addHandler(handler)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
            channels.append(channel)
            if greet {
                var greeting = try output(channel)
                #expect(try greeting.readNBDGreeting() == NBDHandshake.serverFlags)
            }
            return channel
        }

        /// Everything the handler wrote so far, as one buffer.
        func output(_ channel: EmbeddedChannel) throws -> ByteBuffer {
            var all = ByteBuffer()
            while var part = try channel.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&part) }
            return all
        }

        /// Feeds bytes to a connection; with `endRound`, the loop round ends (work queued
        /// for it, such as the round's writes, runs).
        func send(_ channel: EmbeddedChannel, endRound: Bool = true, _ fill: (inout ByteBuffer) -> Void) throws {
            var buffer = ByteBuffer()
            fill(&buffer)
            try channel.writeInbound(buffer)
            if endRound { loop.run() }
        }

        /// Client flags, then GO for "disk"; returns the option replies.
        func negotiate(_ channel: EmbeddedChannel) throws -> [NBDOptionReply] {
            try send(channel) {
                $0.writeNBDClientFlags([.fixedNewstyle, .noZeroes])
                $0.writeNBDOptionRequest(NBDOptionRequest(option: .go, payload: query("disk")))
            }
            return try optionReplies(channel)
        }

        func optionReplies(_ channel: EmbeddedChannel) throws -> [NBDOptionReply] {
            var out = try output(channel)
            var replies: [NBDOptionReply] = []
            while let reply = try out.readNBDOptionReply() { replies.append(reply) }
            return replies
        }

        func query(_ name: String) -> ByteBuffer {
            var payload = ByteBuffer()
            payload.writeNBDExportQuery(NBDExportQuery(name: name, infoRequests: []))
            return payload
        }

        func request(_ command: NBDCommand, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0, payload: [UInt8]? = nil) -> NBDRequest {
            NBDRequest(
                header: NBDRequestHeader(command: command, cookie: cookie, offset: offset, length: length),
                payload: payload.map { ByteBuffer(bytes: $0) })
        }

        /// Simple reply headers (and, for reads, their data of `readLength` bytes).
        func replies(_ channel: EmbeddedChannel, readLength: Int = 0) throws -> [(NBDSimpleReplyHeader, [UInt8])] {
            var out = try output(channel)
            var result: [(NBDSimpleReplyHeader, [UInt8])] = []
            while let header = try out.readNBDSimpleReplyHeader() {
                let data = header.error == .none && readLength > 0 ? out.readBytes(length: readLength) ?? [] : []
                result.append((header, data))
            }
            return result
        }
    }

    @Test func aWholeSessionWritesReadsAndDisconnects() throws {
        let harness = Harness()
        let channel = try harness.connect()
        let replies = try harness.negotiate(channel)
        #expect(replies.map(\.type) == [.info, .info, .ack])
        #expect(harness.exports.opens == 1)
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try harness.send(channel) {
            $0.writeNBDRequest(harness.request(.write, cookie: 1, offset: 8192, length: 4096, payload: data))
            $0.writeNBDRequest(harness.request(.flush, cookie: 2))
        }
        let written = try harness.replies(channel)
        #expect(written.map(\.0.cookie).sorted() == [1, 2])
        #expect(written.allSatisfy { $0.0.error == .none })
        try harness.send(channel) { $0.writeNBDRequest(harness.request(.read, cookie: 3, offset: 8192, length: 4096)) }
        let read = try harness.replies(channel, readLength: 4096)
        #expect(read.count == 1 && read[0].0.cookie == 3 && read[0].1 == data)
        // Out of range: an error reply, the connection stays.
        try harness.send(channel) { $0.writeNBDRequest(harness.request(.read, cookie: 4, offset: 1 << 20, length: 512)) }
        #expect(try harness.replies(channel).map(\.0.error) == [.invalid])
        try harness.send(channel) { $0.writeNBDRequest(harness.request(.disconnect, cookie: 5)) }
        #expect(!channel.isActive, "DISC closes once idle")
        #expect(harness.exports.closes == 1, "the export is given back")
        #expect(harness.server.connectionCount == 0)
    }

    @Test func writesOfOneLoopRoundLeaveAsOneBatch() throws {
        let harness = Harness()
        let first = try harness.connect()
        let second = try harness.connect()
        _ = try harness.negotiate(first)
        _ = try harness.negotiate(second)
        harness.exports.batchCalls = []
        // Both connections' writes arrive before the loop round ends.
        try harness.send(first, endRound: false) {
            $0.writeNBDRequest(harness.request(.write, cookie: 1, offset: 0, length: 512, payload: [UInt8](repeating: 1, count: 512)))
        }
        try harness.send(second, endRound: false) {
            $0.writeNBDRequest(harness.request(.write, cookie: 2, offset: 4096, length: 512, payload: [UInt8](repeating: 2, count: 512)))
        }
        harness.loop.run()
        #expect(harness.exports.batchCalls == [2], "one hand-off for both connections")
        #expect(try harness.replies(first).map(\.0.cookie) == [1])
        #expect(try harness.replies(second).map(\.0.cookie) == [2])
        #expect(harness.exports.bytes[0] == 1 && harness.exports.bytes[4096] == 2)
    }

    @Test func theRepliesOfARoundLeaveAsOneBufferEachOnce() throws {
        let harness = Harness()
        let channel = try harness.connect()
        _ = try harness.negotiate(channel)
        // Four writes, a rejected read and a read of what was written, all in one round.
        let data = [UInt8](repeating: 3, count: 512)
        try harness.send(channel) {
            for cookie in UInt64(1)...4 {
                $0.writeNBDRequest(harness.request(.write, cookie: cookie, offset: cookie * 512, length: 512, payload: data))
            }
            $0.writeNBDRequest(harness.request(.read, cookie: 5, offset: 1 << 20, length: 512))
        }
        var buffers = 0
        var all = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) {
            buffers += 1
            all.writeBuffer(&part)
        }
        var cookies: [UInt64] = []
        while let header = try all.readNBDSimpleReplyHeader() { cookies.append(header.cookie) }
        #expect(cookies.sorted() == [1, 2, 3, 4, 5], "every reply, each once")
        #expect(all.readableBytes == 0)
        #expect(buffers <= 2, "the error of the pass and the writes' round, not one buffer per reply (\(buffers))")
        // A read's header and its data stay together, whatever was batched around it.
        try harness.send(channel) {
            $0.writeNBDRequest(harness.request(.write, cookie: 6, offset: 0, length: 512, payload: data))
            $0.writeNBDRequest(harness.request(.read, cookie: 7, offset: 512, length: 512))
        }
        var out = try harness.output(channel)
        var seen: [UInt64] = []
        while let header = try out.readNBDSimpleReplyHeader() {
            seen.append(header.cookie)
            if header.cookie == 7 { #expect(out.readBytes(length: 512) == data, "the data right after its header") }
        }
        #expect(seen.sorted() == [6, 7] && out.readableBytes == 0)
        // A read alone: its header is in front of its data, one buffer for both.
        try harness.send(channel) { $0.writeNBDRequest(harness.request(.read, cookie: 8, offset: 512, length: 512)) }
        var alone: [ByteBuffer] = []
        while let part = try channel.readOutbound(as: ByteBuffer.self) { alone.append(part) }
        #expect(alone.count == 1 && alone.first?.readableBytes == 16 + 512)
        if var reply = alone.first {
            #expect(try reply.readNBDSimpleReplyHeader()?.cookie == 8)
            #expect(reply.readBytes(length: 512) == data)
        }
    }

    @Test(arguments: [1, 7, 29, 4099, 20000, 70000])
    func requestsSplitAcrossReadsAtAnyBoundaryAllRun(chunk: Int) throws {
        let harness = Harness()
        let channel = try harness.connect()
        _ = try harness.negotiate(channel)
        // Small writes (parsed whole) and large ones (assembled as they arrive), as one
        // byte stream cut into reads of `chunk` bytes.
        let sizes = [512, 4096, 24576, 100, 65536, 4096]
        var stream = ByteBuffer()
        var offset: UInt64 = 0
        var expected = [UInt8](repeating: 0, count: 1 << 20)
        for (i, size) in sizes.enumerated() {
            let data = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i &* 7 &+ 1) }
            stream.writeNBDRequest(harness.request(.write, cookie: UInt64(i + 1), offset: offset, length: UInt32(size), payload: data))
            expected.replaceSubrange(Int(offset)..<Int(offset) + size, with: data)
            offset += UInt64(size + 1000)
        }
        while stream.readableBytes > 0 {
            var part = stream.readSlice(length: min(chunk, stream.readableBytes))!
            try harness.send(channel) { $0.writeBuffer(&part) }
        }
        let replies = try harness.replies(channel)
        #expect(replies.map(\.0.cookie).sorted() == Array(UInt64(1)...UInt64(sizes.count)))
        #expect(replies.allSatisfy { $0.0.error == .none })
        #expect(harness.exports.bytes == expected)
        // Still in step: a read after them all is answered with what they wrote.
        try harness.send(channel) { $0.writeNBDRequest(harness.request(.read, cookie: 100, offset: 2512, length: 512)) }
        let read = try harness.replies(channel, readLength: 512)
        #expect(read.count == 1 && read[0].0.cookie == 100 && read[0].1 == Array(expected[2512..<3024]))
        #expect(expected[2512..<3024].contains { $0 != 0 }, "the range read back holds the second write's data")
    }

    @Test func aPassKeepsNoHoldOnTheReceiveBuffer() throws {
        let harness = Harness()
        let channel = try harness.connect()
        _ = try harness.negotiate(channel)
        /// Whether the handler still holds `buffer`'s storage: a write to a shared
        /// storage copies it first, and the bytes then move.
        func isHeldElsewhere(_ buffer: inout ByteBuffer) -> Bool {
            let before = buffer.withUnsafeReadableBytes { $0.baseAddress }
            buffer.setInteger(UInt8(0), at: buffer.readerIndex)
            return buffer.withUnsafeReadableBytes { $0.baseAddress } != before
        }
        let data = [UInt8](repeating: 5, count: 512)
        var whole = ByteBuffer()
        whole.writeNBDRequest(harness.request(.write, cookie: 1, offset: 0, length: 512, payload: data))
        try channel.writeInbound(whole)
        harness.loop.run()
        // The channel reuses its pooled receive buffer only when nothing else holds it.
        #expect(!isHeldElsewhere(&whole), "a receive buffer parsed to its end is let go")
        // One request and the first half of the next: only the half stays, copied.
        var next = ByteBuffer()
        next.writeNBDRequest(harness.request(.write, cookie: 2, offset: 4096, length: 512, payload: data))
        next.writeNBDRequest(harness.request(.write, cookie: 3, offset: 8192, length: 512, payload: data))
        let cut = next.readableBytes - 300
        // Buffers of their own, as the channel's reads are.
        var first = ByteBuffer(bytes: next.getBytes(at: 0, length: cut)!)
        let rest = ByteBuffer(bytes: next.getBytes(at: cut, length: 300)!)
        try channel.writeInbound(first)
        harness.loop.run()
        #expect(!isHeldElsewhere(&first), "the unparsed tail is kept in a buffer of its own")
        try channel.writeInbound(rest)
        harness.loop.run()
        #expect(try harness.replies(channel).map(\.0.cookie).sorted() == [1, 2, 3])
        #expect(harness.exports.bytes[4096] == 5 && harness.exports.bytes[8192 + 511] == 5)
        // A read that holds only part of a message, in a buffer with room to spare (as
        // the channel's are): the part is copied out, not kept in the channel's buffer.
        var later = ByteBuffer()
        later.writeNBDRequest(harness.request(.write, cookie: 4, offset: 12288, length: 512, payload: data))
        var fragment = ByteBuffer()
        fragment.reserveCapacity(8192)
        fragment.writeBytes(later.getBytes(at: 0, length: 300)!)
        try channel.writeInbound(fragment)
        harness.loop.run()
        #expect(!isHeldElsewhere(&fragment), "a partial message is not kept in the receive buffer")
        try channel.writeInbound(ByteBuffer(bytes: later.getBytes(at: 300, length: later.readableBytes - 300)!))
        harness.loop.run()
        #expect(try harness.replies(channel).map(\.0.cookie) == [4])
        #expect(harness.exports.bytes[12288 + 511] == 5)
    }

    @Test func aRefusedOpenIsAnErrorAndTheClientMayTryAgain() throws {
        let harness = Harness()
        harness.exports.refusal = NBDExportError(.shutdown, "disk is being changed by a management command")
        let channel = try harness.connect()
        let refused = try harness.negotiate(channel)
        #expect(refused.map(\.type) == [.errShutdown])
        #expect(channel.isActive)
        #expect(harness.server.connectionCounts().isEmpty, "a refused open is not counted as a client of the export")
        harness.exports.refusal = nil
        try harness.send(channel) { $0.writeNBDOptionRequest(NBDOptionRequest(option: .go, payload: harness.query("disk"))) }
        #expect(try harness.optionReplies(channel).map(\.type) == [.info, .info, .ack])
        #expect(harness.server.connectionCounts() == ["disk": 1])
    }

    @Test func optionsThatArriveTogetherAreAnsweredInOrder() throws {
        let harness = Harness()
        let channel = try harness.connect()
        try harness.send(channel) {
            $0.writeNBDClientFlags([.fixedNewstyle, .noZeroes])
            $0.writeNBDOptionRequest(NBDOptionRequest(option: .list, payload: ByteBuffer()))
            $0.writeNBDOptionRequest(NBDOptionRequest(option: .info, payload: harness.query("nope")))
            $0.writeNBDOptionRequest(NBDOptionRequest(option: .go, payload: harness.query("disk")))
        }
        let replies = try harness.optionReplies(channel)
        #expect(replies.map(\.option) == [.list, .list, .info, .go, .go, .go])
        #expect(replies.map(\.type) == [.server, .ack, .errUnknown, .info, .info, .ack])
    }

    @Test func aClientThatNeverFinishesTheHandshakeIsDropped() throws {
        let harness = Harness { $0.handshakeTimeout = .seconds(3) }
        let channel = try harness.connect()
        try harness.send(channel) { $0.writeNBDClientFlags([.fixedNewstyle]) }
        harness.loop.advanceTime(by: .seconds(2))
        #expect(channel.isActive)
        harness.loop.advanceTime(by: .seconds(2))
        #expect(!channel.isActive, "the handshake timeout closes it")
        #expect(harness.server.connectionCount == 0)
        #expect(harness.logLines.contains("no handshake within"))

        // One that finishes in time stays past the timeout.
        let served = try harness.connect()
        _ = try harness.negotiate(served)
        harness.loop.advanceTime(by: .seconds(10))
        #expect(served.isActive)
    }

    @Test func connectionsPastTheLimitAreClosedAtOnce() throws {
        let harness = Harness { $0.maxConnections = 2 }
        let first = try harness.connect()
        let second = try harness.connect()
        let third = try harness.connect(greet: false)
        #expect(first.isActive && second.isActive)
        #expect(!third.isActive)
        #expect(try harness.output(third).readableBytes == 0, "no greeting for a refused connection")
        #expect(harness.server.connectionCount == 2)
        #expect(harness.logLines.contains("--max-connections"))
        try first.close().wait()
        let fourth = try harness.connect()
        #expect(fourth.isActive, "room again after one closed")
    }

    @Test func aClientThatStopsReadingRepliesStopsBeingRead() throws {
        let harness = Harness()
        let channel = try harness.connect()
        _ = try harness.negotiate(channel)
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        try harness.send(channel) { $0.writeNBDRequest(harness.request(.read, cookie: 9, offset: 0, length: 4096)) }
        #expect(try harness.replies(channel).isEmpty, "nothing is parsed while the client does not read")
        channel.isWritable = true
        channel.pipeline.fireChannelWritabilityChanged()
        let replies = try harness.replies(channel, readLength: 4096)
        #expect(replies.map(\.0.cookie) == [9])
    }

    @Test func shutdownAnswersArrivedRequestsAndCloses() throws {
        let harness = Harness()
        let channel = try harness.connect()
        _ = try harness.negotiate(channel)
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        try harness.send(channel) {
            $0.writeNBDRequest(harness.request(.read, cookie: 1, offset: 0, length: 512))
            $0.writeNBDRequest(harness.request(.flush, cookie: 2))
        }
        // Still not writable: the arrived requests are answered with ESHUTDOWN anyway.
        channel.pipeline.fireUserInboundEventTriggered(NBDServer.ShutdownEvent())
        let replies = try harness.replies(channel)
        #expect(replies.map(\.0.error) == [.shutdown, .shutdown])
        #expect(!channel.isActive)
        #expect(harness.exports.closes == 1)
    }
}

/// Log lines collected from the server, thread-safe.
final class NSLockedLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.withLock { lines.append(line) } }
    func contains(_ text: String) -> Bool { lock.withLock { lines.contains { $0.contains(text) } } }
}
