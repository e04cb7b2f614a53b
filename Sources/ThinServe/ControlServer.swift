import Dispatch
import NBDServer
import NIOCore
import NIOPosix
import ThinControl
import ThinPool
import ThinSystem

/// The live side of `ServedExports`: connection counts from the NBD server, and
/// closing exports through the provider (no new connections) and the server (existing
/// ones).
final class ServedPool: ServedExports {
    let server: NBDServer
    let provider: PoolExportProvider
    let serverURIs: [String]
    let metricsURL: String?

    init(server: NBDServer, provider: PoolExportProvider, serverURIs: [String], metricsURL: String?) {
        self.server = server
        self.provider = provider
        self.serverURIs = serverURIs
        self.metricsURL = metricsURL
    }

    func connectionCounts() -> [String: Int] { server.connectionCounts() }

    func setLimit(_ rule: ExportLimitRule) -> [ExportLimitRule] { provider.limits.set(rule) }

    func limits() -> [ExportLimitRule] { provider.limits.rules }

    func renamed(from old: String, to new: String) { server.exportRenamed(from: old, to: new) }

    func whileClosed(_ names: [String], disconnect: Bool, _ body: () throws(ControlError) -> Void) throws(ControlError) -> Int {
        provider.close(names)
        defer { provider.reopen(names) }
        let counts = server.connectionCounts()
        let connected = names.reduce(0) { $0 + (counts[$1] ?? 0) }
        var disconnected = 0
        if connected > 0 {
            guard disconnect else {
                throw ControlError(
                    code: "in-use",
                    message: "\(names.joined(separator: ", ")) has \(connected) connected client\(connected == 1 ? "" : "s"); disconnect \(connected == 1 ? "it" : "them") first, or pass --force to disconnect \(connected == 1 ? "it" : "them")")
            }
            disconnected = server.disconnect(exportsMatching: { names.contains($0) })
        }
        try body()
        return disconnected
    }
}

/// The control socket of `thinbd serve` (docs/control-api.md): a Unix stream socket
/// taking one JSON request per line and answering each with one JSON line, in order.
/// Commands run one at a time, off the event loop, so a slow one (a check, a
/// disconnect) delays the next command but never NBD traffic.
final class ControlServer: @unchecked Sendable {
    let path: String
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let queue = DispatchQueue(label: "thinbd.control")
    private var channel: Channel?
    private let connections = ConnectionSet()

    /// Listens at `path` (owner-only permissions). Refuses when another server answers
    /// there; a stale socket file (nobody listening) is replaced.
    init(path: String, commands: PoolCommands, log: @escaping @Sendable (String) -> Void) throws {
        self.path = path
        if let problem = ControlEndpoint.unsafePlace(path) {
            try? group.syncShutdownGracefully()
            throw ServeError(description: "control socket \(path): \(problem)")
        }
        if (try? StreamConnection(connectingTo: path)) != nil {
            try? group.syncShutdownGracefully()
            throw ServeError(description: "control socket \(path): another server answers there")
        }
        let queue = self.queue
        let connections = self.connections
        // Bound under another name and renamed once it listens and is owner-only.
        let staged = SystemInfo.socketStagingPath(for: path)
        do {
            // Made owner-only from the start (0600), not only after the chmod below.
            channel = try SystemInfo.withCreationMask(0o177) {
                try ServerBootstrap(group: group)
                    .serverChannelOption(.backlog, value: 64)
                    // A client may send its requests and shut down its side (`printf ... |
                    // socat`): the replies still go out before the connection closes.
                    .childChannelOption(.allowRemoteHalfClosure, value: true)
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            connections.insert(channel)
                            try channel.pipeline.syncOperations.addHandler(
                                ControlConnectionHandler(commands: commands, queue: queue, log: log))
                        }
                    }
                    .bind(unixDomainSocketPath: staged ?? path, cleanupExistingSocketFile: true)
                    .wait()
            }
            try SystemInfo.setPermissions(staged ?? path, mode: 0o600)
            if let staged { try SystemInfo.publishSocket(staged, at: path) }
        } catch {
            try? channel?.close().wait()
            if let staged { SystemInfo.removeFile(staged) }
            try? group.syncShutdownGracefully()
            throw ServeError(description: "control socket \(path): \(error)")
        }
    }

    /// Stops listening, closes the connections, waits for a command in progress (and
    /// those already queued), and removes the socket file.
    func stop() {
        try? channel?.close().wait()
        for connection in connections.all() { try? connection.close().wait() }
        queue.sync {}
        try? group.syncShutdownGracefully()
        SystemInfo.removeFile(path)
    }
}

/// The control connections open now, so that stopping can close them.
final class ConnectionSet: @unchecked Sendable {
    private let channels = LockedValue<[ObjectIdentifier: Channel]>([:])

    func insert(_ channel: Channel) {
        channels.withLockedValue { $0[ObjectIdentifier(channel)] = channel }
        channel.closeFuture.whenComplete { [weak self] _ in
            self?.channels.withLockedValue { $0[ObjectIdentifier(channel)] = nil }
        }
    }

    func all() -> [Channel] { channels.withLockedValue { Array($0.values) } }
}

final class ControlConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let commands: PoolCommands
    private let queue: DispatchQueue
    private let log: @Sendable (String) -> Void
    private var framer = ControlLineFramer()
    private var failed = false

    init(commands: PoolCommands, queue: DispatchQueue, log: @escaping @Sendable (String) -> Void) {
        self.commands = commands
        self.queue = queue
        self.log = log
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        let bytes = unwrapInboundIn(data)
        framer.append(bytes.readableBytesView)
        let channel = context.channel
        while true {
            let line: String?
            do throws(ControlError) {
                line = try framer.nextLine()
            } catch {
                // The stream cannot be resynchronized: answer after the replies already
                // owed, then hang up.
                failed = true
                finish(channel, with: .failure(error))
                return
            }
            guard let line else { return }
            if line.allSatisfy({ $0 == " " || $0 == "\t" }) { continue }
            let commands = self.commands
            let log = self.log
            queue.async {
                let reply: ControlReply
                do throws(ControlError) {
                    let command = try ControlCommand(line: line)
                    reply = commands.perform(command)
                    if command.modifiesPool, case .success = reply { log("control: \(command.name) \(Self.subject(of: command))done") }
                } catch {
                    reply = .failure(error)
                }
                channel.eventLoop.execute { Self.send(reply, on: channel) }
            }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            // The client is done sending: close once every reply it is owed has gone.
            if !failed { finish(context.channel, with: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// Queues, behind the commands already queued, a last reply (if any) and the close.
    private func finish(_ channel: Channel, with last: ControlReply?) {
        queue.async {
            channel.eventLoop.execute {
                if let last { Self.send(last, on: channel) }
                // Writes complete in order: once this empty one has, every reply is out.
                channel.writeAndFlush(channel.allocator.buffer(capacity: 0)).whenComplete { _ in channel.close(promise: nil) }
            }
        }
    }

    private static func send(_ reply: ControlReply, on channel: Channel) {
        var buffer = channel.allocator.buffer(capacity: 256)
        buffer.writeString(reply.line)
        channel.writeAndFlush(buffer, promise: nil)
    }

    private static func subject(of command: ControlCommand) -> String {
        command.subjects.map { $0 + " " }.joined()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
