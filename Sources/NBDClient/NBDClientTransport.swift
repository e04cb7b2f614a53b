import NBDProtocol
import NBDTLS
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import ThinSystem

/// The byte stream under a blocking NBD client connection.
protocol NBDClientTransport: AnyObject {
    /// Sends all of `bytes`. Blocks.
    func send(_ bytes: UnsafeRawBufferPointer) throws(NBDClientError)
    /// Receives at least one byte into `buffer`; 0 when the server closed. Blocks.
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws(NBDClientError) -> Int
    /// Runs the TLS handshake; every byte after it goes over TLS. Blocks.
    func startTLS(_ credentials: NBDTLSClientCredentials, hostName: String?) throws(NBDClientError)
    func close()
}

/// Plain text over a socket, with blocking system calls (the common, cheapest case).
final class SocketTransport: NBDClientTransport {
    private let connection: StreamConnection

    init(_ address: NBDEndpoint.Address, timeout: Int? = nil) throws(SystemError) {
        switch address {
        case .tcp(let host, let port): connection = try StreamConnection(host: host, port: port)
        case .unix(let path): connection = try StreamConnection(connectingTo: path)
        }
        if let timeout { connection.setTimeout(seconds: timeout) }
    }

    func send(_ bytes: UnsafeRawBufferPointer) throws(NBDClientError) {
        do throws(SystemError) {
            try connection.send(bytes)
        } catch {
            throw NBDClientError("NBD connection: \(error)")
        }
    }

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws(NBDClientError) -> Int {
        do throws(SystemError) {
            return try connection.receive(into: buffer)
        } catch {
            throw NBDClientError("NBD connection: \(error)")
        }
    }

    func startTLS(_ credentials: NBDTLSClientCredentials, hostName: String?) throws(NBDClientError) {
        throw NBDClientError("this connection was opened without TLS")
    }

    func close() {}
}

/// A connection on a swift-nio channel of its own (one event loop thread), for TLS:
/// swift-nio-ssl works on channels. Sends wait for the write; received bytes collect in
/// an inbox that `receive` waits on.
final class ChannelTransport: NBDClientTransport {
    /// What the channel delivered and has not been read yet.
    struct Inbox {
        var bytes = ByteBuffer()
        var tlsReady = false
        var failure: NBDClientError?
        var closed = false
    }

    /// A server that stops answering in the middle of the TLS handshake is given up on.
    static let handshakeTimeoutMilliseconds = 30_000

    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let channel: Channel
    private let inbox = WaitableValue(Inbox())

    init(_ address: NBDEndpoint.Address) throws(NBDClientError) {
        let inbox = self.inbox
        let bootstrap = ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(InboxHandler(inbox: inbox))
                }
            }
        do {
            switch address {
            case .tcp(let host, let port): channel = try bootstrap.connect(host: host, port: port).wait()
            case .unix(let path): channel = try bootstrap.connect(unixDomainSocketPath: path).wait()
            }
        } catch {
            try? group.syncShutdownGracefully()
            throw NBDClientError("cannot connect: \(error)")
        }
    }

    deinit {
        close()
    }

    func send(_ bytes: UnsafeRawBufferPointer) throws(NBDClientError) {
        let buffer = channel.allocator.buffer(bytes: bytes)
        do {
            try channel.writeAndFlush(buffer).wait()
        } catch {
            throw inbox.update { $0.failure } ?? NBDClientError("NBD connection: \(error)")
        }
    }

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws(NBDClientError) -> Int {
        let outcome = inbox.wait { inbox -> Result<Int, NBDClientError>? in
            if inbox.bytes.readableBytes > 0 {
                let count = min(buffer.count, inbox.bytes.readableBytes)
                inbox.bytes.readWithUnsafeReadableBytes { raw in
                    buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[0..<count]))
                    return count
                }
                return .success(count)
            }
            if let failure = inbox.failure { return .failure(failure) }
            return inbox.closed ? .success(0) : nil
        }
        return try outcome.get()
    }

    func startTLS(_ credentials: NBDTLSClientCredentials, hostName: String?) throws(NBDClientError) {
        let (channel, inbox) = (self.channel, self.inbox)
        do {
            // On the channel's loop, where bytes arrive: nothing can slip in between the
            // check and the handler. Bytes that came after the acknowledgement were sent in
            // plain text (by anyone on the way) and must never be read as if from TLS.
            try channel.eventLoop.submit {
                guard inbox.update({ $0.bytes.readableBytes }) == 0 else {
                    throw NBDClientError("the server sent data after acknowledging STARTTLS")
                }
                let handler = try credentials.makeHandler(hostName: hostName)
                try channel.pipeline.syncOperations.addHandler(handler, position: .first)
            }.wait()
        } catch let error as NBDClientError {
            throw error
        } catch let error as NBDTLSError {
            throw NBDClientError(error.description)
        } catch {
            throw NBDClientError("cannot start TLS: \(error)")
        }
        let outcome = inbox.wait(until: { inbox -> Result<Void, NBDClientError>? in
            if inbox.tlsReady { return .success(()) }
            if let failure = inbox.failure { return .failure(failure) }
            return inbox.closed ? .failure(NBDClientError("the server closed the connection during the TLS handshake")) : nil
        }, milliseconds: Self.handshakeTimeoutMilliseconds)
        guard let outcome else {
            close()
            throw NBDClientError("the TLS handshake did not finish within \(Self.handshakeTimeoutMilliseconds / 1000) s")
        }
        try outcome.get()
    }

    func close() {
        if channel.isActive { try? channel.close().wait() }
        try? group.syncShutdownGracefully()
    }

    /// Moves what the channel delivers into the inbox (on the channel's loop: it never waits).
    private final class InboxHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let inbox: WaitableValue<Inbox>

        init(inbox: WaitableValue<Inbox>) {
            self.inbox = inbox
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var bytes = unwrapInboundIn(data)
            inbox.update { $0.bytes.writeBuffer(&bytes) }
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let event = event as? TLSUserEvent, case .handshakeCompleted = event {
                inbox.update { $0.tlsReady = true }
            }
            context.fireUserInboundEventTriggered(event)
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            let failure: NBDClientError
            let text = "\(error)"
            if let error = error as? NIOSSLExtraError, error == .failedToValidateHostname {
                failure = NBDClientError("TLS: the server's certificate is not for this host name")
            } else if let reason = Self.reasons.first(where: { text.contains($0.key) })?.value {
                failure = NBDClientError("TLS handshake failed: \(reason) (\(text))")
            } else if let error = error as? NIOSSLError, case .handshakeFailed = error {
                failure = NBDClientError("TLS handshake failed: \(text)")
            } else {
                failure = NBDClientError("NBD connection: \(text)")
            }
            inbox.update { if $0.failure == nil { $0.failure = failure } }
            context.close(promise: nil)
        }

        /// BoringSSL's reasons for the common mistakes, said for a person.
        static let reasons: KeyValuePairs = [
            "CERTIFICATE_VERIFY_FAILED": "the server's certificate is not signed by the CA in ca-cert.pem, or has expired",
            "CERTIFICATE_REQUIRED": "the server wants a client certificate (client-cert.pem and client-key.pem)",
            "BAD_RECORD_MAC": "wrong pre-shared key",
            "UNKNOWN_PSK_IDENTITY": "the server does not know this PSK identity",
            "NO_SHARED_CIPHER": "no cipher in common: the server may want certificates, not a PSK (or the reverse)",
        ]

        func channelInactive(context: ChannelHandlerContext) {
            inbox.update { $0.closed = true }
            context.fireChannelInactive()
        }
    }
}
