import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
import ThinSystem

/// The lean transmission path takes a connection from swift-nio by duplicating its
/// socket and closing the channel. That works only because swift-nio's close
/// unregisters the socket and closes its own descriptor without shutting the socket
/// down, which is how it behaves, not a documented promise: this pins it on the
/// swift-nio in Package.resolved.
@Suite struct SocketHandOffTests {
    /// Duplicates the socket at the first read, closes the channel, and hands over the
    /// duplicate.
    private final class DuplicateThenClose: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let duplicate: EventLoopPromise<Int32>

        init(_ duplicate: EventLoopPromise<Int32>) { self.duplicate = duplicate }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            do {
                let copy = try context.pipeline.syncOperations.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) {
                    try SocketIO.duplicateNonBlocking($0)
                }
                guard let copy else { throw ChannelError.operationUnsupported }
                duplicate.succeed(copy)
            } catch {
                duplicate.fail(error)
            }
            context.close(promise: nil)
        }
    }

    /// Collects what the client receives, and whether its connection ended.
    private final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let received = NIOLockedValueBox<[UInt8]>([])
        let ended = NIOLockedValueBox(false)

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = unwrapInboundIn(data)
            received.withLockedValue { $0 += Array(bytes.readableBytesView) }
        }

        func channelInactive(context: ChannelHandlerContext) {
            ended.withLockedValue { $0 = true }
        }
    }

    @Test func aDuplicatedSocketServesOnAfterItsChannelCloses() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let duplicate = group.next().makePromise(of: Int32.self)
        let listener = try ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(DuplicateThenClose(duplicate))
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? listener.close().wait() }
        let collector = Collector()
        let client = try ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(collector) }
            }
            .connect(to: listener.localAddress!).wait()
        defer { try? client.close().wait() }

        try client.writeAndFlush(ByteBuffer(bytes: [1, 2, 3])).wait()
        let descriptor = try duplicate.futureResult.wait()
        defer { SocketIO.close(descriptor) }

        // The channel closed its descriptor; the client's connection is still up, and
        // bytes it sends now arrive on the duplicate.
        try client.writeAndFlush(ByteBuffer(bytes: [7, 8, 9])).wait()
        var arrived: [UInt8] = []
        var memory = [UInt8](repeating: 0, count: 64)
        for _ in 0..<500 where arrived.count < 3 {
            let outcome = memory.withUnsafeMutableBytes { SocketIO.read(descriptor, into: $0) }
            switch outcome {
            case .bytes(let count): arrived += memory[0..<count]
            case .wouldBlock: usleep(2_000)
            case .endOfFile, .failed: Issue.record("the duplicate lost the connection: \(outcome)")
            }
            if case .endOfFile = outcome { break }
        }
        #expect(arrived.suffix(3) == [7, 8, 9])

        // And what is sent on the duplicate reaches the client.
        let writer = VectoredWriter()
        let reply: [UInt8] = [42, 43]
        let sent = reply.withUnsafeBytes { bytes -> VectoredWriter.WriteResult in
            writer.append(bytes)
            return writer.write(to: descriptor)
        }
        #expect(sent == .wrote(2))
        for _ in 0..<500 where collector.received.withLockedValue({ $0.count }) < 2 { usleep(2_000) }
        #expect(collector.received.withLockedValue { $0 } == reply)
        #expect(!collector.ended.withLockedValue { $0 }, "the client's connection must not have ended")
    }
}
