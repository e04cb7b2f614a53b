import NBDProtocol
import NBDTLS
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ThinSystem

/// An NBD server: listeners (TCP, Unix sockets, inherited sockets, stdio), connections,
/// and the thread pool that runs export operations.
///
/// Shutdown is graceful: listeners close, options in haggling get NBD_REP_ERR_SHUTDOWN,
/// requests already running finish, later requests get ESHUTDOWN, then connections close.
public final class NBDServer: @unchecked Sendable {
    public struct Configuration: Sendable {
        /// Requests one connection may have running at once.
        public var maxInFlightPerConnection = 64
        /// Payload bytes (read buffers, write data) one connection's running requests
        /// may hold; past it nothing more is read from that client until some finish.
        /// A connection's memory is bounded by this plus one request (32 MiB) plus the
        /// socket's outbound high-water mark.
        public var maxInFlightBytesPerConnection = 32 << 20
        /// Replies waiting in a connection's outbound buffer past which its input is
        /// no longer read (a client that stops reading replies gets back-pressure).
        public var outboundHighWaterMark = 4 << 20
        /// Threads that run export operations. They mostly wait for the disk, so there
        /// are enough of them to keep a queue depth of 32 busy.
        public var ioThreads = 32
        /// Event loop threads for sockets (and, with a loop queue, for reads).
        /// Connections are spread over them; each has its own disk queue.
        public var eventLoopThreads = System.coreCount
        /// Connections beyond this are closed as soon as they are accepted.
        public var maxConnections = 1024
        /// A connection that has not finished its handshake by then is closed.
        public var handshakeTimeout: TimeAmount = .seconds(10)
        /// Runs once on each event loop thread before it serves anything (thinbd marks
        /// the thread as one that must never block).
        public var eventLoopThreadSetup: (@Sendable () -> Void)?
        /// TLS (STARTTLS): the mode and the credentials; nil serves plain text only.
        public var tls: TLS?
        /// The longest an event loop polls for its next event (a request, a disk
        /// completion) before it sleeps, whenever nothing it waits for comes from
        /// another thread; zero sleeps at once. Buys queue-depth-1 clients lower latency
        /// where waking an idle CPU is slow, with up to one core's time while such a
        /// client runs (`IdlePollWindow` shortens the polls for clients that pause
        /// longer). Needs the provider's `makeIdlePoller`.
        public var idlePoll: TimeAmount = .microseconds(200)
        /// Which loop serves a plain-text connection once its handshake is done.
        public var transmission: Transmission = .channel

        public init() {}
    }

    /// Where requests are served after the handshake.
    public enum Transmission: String, Sendable, CaseIterable {
        // The raw values are what `serve --transmission` takes.
        /// swift-nio's channel pipeline, which also does the handshake and TLS.
        case channel = "nio"
        /// A lean loop per event loop (`LeanLoop`): after a plain-text NBD_OPT_GO the
        /// socket leaves swift-nio. TLS connections stay on the pipeline.
        case lean
    }

    /// How the server offers TLS, with what credentials.
    public struct TLS: Sendable {
        public var mode: NBDTLSMode
        public var credentials: NBDTLSServerCredentials

        public init(mode: NBDTLSMode, credentials: NBDTLSServerCredentials) {
            self.mode = mode
            self.credentials = credentials
        }
    }

    struct ShutdownEvent {}

    public let provider: NBDExportProvider
    public let configuration: Configuration
    let group: MultiThreadedEventLoopGroup
    let threadPool: NIOThreadPool
    /// Where connections run what may block.
    let blocking: BlockingWork
    private let logger: @Sendable (String) -> Void
    /// The server's registry, reachable only under its lock (held briefly, also on
    /// event loops: nothing in it blocks).
    private struct Registry {
        var listeners: [Channel] = []
        var connections: [ObjectIdentifier: ServedConnection] = [:]
        /// The export each connection in transmission uses.
        var exportNames: [ObjectIdentifier: String] = [:]
        var shuttingDown = false
        var refusedConnections = 0
        var loopIOs: [ObjectIdentifier: LoopIO] = [:]
    }
    private let registry = NIOLockedValueBox(Registry())
    private let idle: EventLoopPromise<Void>
    /// With `.lean` transmission: the loops plain connections are handed to, and when
    /// each has ended. Set once, in `init` (the loops need the server to exist).
    private var leanLoops: [LeanLoop] = []
    private var leanLoopsFinished: [EventLoopFuture<Void>] = []
    private let nextLeanLoop = NIOLockedValueBox(0)

    public convenience init(provider: NBDExportProvider, configuration: Configuration = Configuration(), log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.init(provider: provider, configuration: configuration, log: log, inlineBlockingWork: false)
    }

    /// `inlineBlockingWork`: for handler tests on an `EmbeddedChannel` only.
    init(provider: NBDExportProvider, configuration: Configuration, log: @escaping @Sendable (String) -> Void, inlineBlockingWork: Bool) {
        self.provider = provider
        self.configuration = configuration
        self.logger = log
        group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoopThreads))
        let setup = configuration.eventLoopThreadSetup
        for loop in group.makeIterator() {
            try? loop.submit {
                // The loops make and drop the per-request buffers (`ByteBufferAllocator.recycling`).
                RecycledMemory.keepFreedBlocksOnThisThread()
                setup?()
            }.wait()
        }
        threadPool = NIOThreadPool(numberOfThreads: configuration.ioThreads)
        threadPool.start()
        blocking = inlineBlockingWork ? .inline : .threadPool(threadPool)
        idle = group.next().makePromise()
        var loops: [LeanLoop] = []
        var finished: [EventLoopFuture<Void>] = []
        if configuration.transmission == .lean && !inlineBlockingWork {
            for index in 0..<max(1, configuration.eventLoopThreads) {
                let done = group.next().makePromise(of: Void.self)
                do {
                    let loop = try LeanLoop(server: self, index: index, finished: done)
                    try loop.start()
                    loops.append(loop)
                    finished.append(done.futureResult)
                } catch {
                    done.succeed(())
                    log("a lean transmission loop could not start (\(error)); its connections stay on swift-nio")
                }
            }
        }
        leanLoops = loops
        leanLoopsFinished = finished
    }

    func log(_ message: String) { logger(message) }

    /// The send buffer a Unix-socket connection asks for. The default (about 208 KiB)
    /// fills with less than one 1 MiB reply: the loop then waits for the client between
    /// the TLS records of every large read (measured: TLS reads over a Unix socket at
    /// 0.64x of plain text with it, about 1x with 4 MiB). The kernel caps it at
    /// net.core.wmem_max. TCP keeps its autotuning, which setting it would switch off.
    static let unixSendBufferBytes = 4 << 20

    private func childInitializer(_ channel: Channel) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture {
            if case .unixDomainSocket = channel.localAddress {
                try channel.syncOptions?.setOption(.socketOption(.so_sndbuf), value: SocketOptionValue(Self.unixSendBufferBytes))
            }
            let handler = NBDConnectionHandler(server: self, loopIO: loopIO(for: channel.eventLoop))
            try channel.pipeline.syncOperations.addHandler(handler)
        }
    }

    /// The loop's disk queue holder, made (and started) by the loop's first connection.
    private func loopIO(for eventLoop: EventLoop) -> LoopIO {
        let (blocking, provider, idlePoll) = (self.blocking, self.provider, configuration.idlePoll)
        let (loopIO, isNew) = registry.withLockedValue { registry -> (LoopIO, Bool) in
            if let existing = registry.loopIOs[ObjectIdentifier(eventLoop)] { return (existing, false) }
            let made = LoopIO(eventLoop: eventLoop, blocking: blocking, provider: provider, idlePollMaximum: idlePoll)
            registry.loopIOs[ObjectIdentifier(eventLoop)] = made
            return (made, true)
        }
        if isNew, let queue = provider.makeLoopQueue() { loopIO.start(queue, log: logger) }
        return loopIO
    }

    private var bootstrap: ServerBootstrap {
        ServerBootstrap(group: group)
            // Room for a burst of clients connecting at once (a CI host starting its jobs):
            // the kernel caps it at net.core.somaxconn.
            .serverChannelOption(.backlog, value: Int32(clamping: max(256, min(configuration.maxConnections, 4096))))
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            // Large writes arrive in few, large reads: each read that does not drain the
            // socket costs the client a wake-up before it can send more. 256 KiB holds
            // what a client's socket buffer holds (about 208 KiB by default).
            .childChannelOption(.maxMessagesPerRead, value: 16)
            // A client that shuts down its sending side (libnbd after NBD_CMD_DISC) still
            // gets the replies to what it sent; the handler closes once they are out.
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(
                .writeBufferWaterMark,
                value: ChannelOptions.Types.WriteBufferWaterMark(
                    low: configuration.outboundHighWaterMark / 2, high: configuration.outboundHighWaterMark))
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 256 << 10))
            .childChannelInitializer { [unowned self] channel in self.childInitializer(channel) }
    }

    private func addListener(_ channel: Channel) {
        registry.withLockedValue { $0.listeners.append(channel) }
    }

    /// Listens on TCP `host:port` (port 0 picks one); returns the bound address.
    @discardableResult
    public func listen(host: String, port: Int) throws -> SocketAddress {
        let channel = try bootstrap.bind(host: host, port: port).wait()
        addListener(channel)
        return channel.localAddress!
    }

    /// Listens on a Unix domain socket at `path` (a stale socket file is replaced).
    public func listen(unixSocket path: String) throws {
        let channel = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
        addListener(channel)
    }

    /// Serves an already bound and listening socket (systemd socket activation).
    public func listen(inheritedSocket descriptor: CInt) throws {
        let channel = try bootstrap.withBoundSocket(descriptor).wait()
        addListener(channel)
    }

    /// Serves exactly one connection on standard input and output (inetd style). The
    /// returned future completes when that connection closes.
    public func serveStandardIO() throws -> EventLoopFuture<Void> {
        let channel = try NIOPipeBootstrap(group: group)
            .channelInitializer { [unowned self] channel in self.childInitializer(channel) }
            .takingOwnershipOfDescriptors(input: 0, output: 1)
            .wait()
        return channel.closeFuture
    }

    // MARK: Connections

    /// Registers a new connection; false when it is over `maxConnections` (the caller
    /// closes it; it was never counted).
    func connectionOpened(_ channel: Channel) -> Bool {
        let maximum = configuration.maxConnections
        let (admitted, refuse, refusedSoFar) = registry.withLockedValue { registry -> (Bool, Bool, Int?) in
            guard registry.connections.count < maximum else {
                registry.refusedConnections += 1
                let refused = registry.refusedConnections
                return (false, false, refused == 1 || refused % 1000 == 0 ? refused : nil)
            }
            registry.connections[ObjectIdentifier(channel)] = .channel(channel)
            return (true, registry.shuttingDown, nil)
        }
        if let refusedSoFar {
            log("refusing connections: \(maximum) are open (--max-connections); \(refusedSoFar) refused so far")
        }
        if refuse { channel.pipeline.fireUserInboundEventTriggered(ShutdownEvent()) }
        return admitted
    }

    /// Counts an open connection under export `name`, before the provider opens it, so
    /// that a management command closing the export either sees the connection or is
    /// seen by the open. False when the connection has closed meanwhile.
    func connectionEnteredTransmission(_ channel: Channel, export name: String) -> Bool {
        registry.withLockedValue { registry in
            guard registry.connections[ObjectIdentifier(channel)] != nil else { return false }
            registry.exportNames[ObjectIdentifier(channel)] = name
            return true
        }
    }

    /// Undoes `connectionEnteredTransmission` when the open failed.
    func connectionLeftTransmission(_ channel: Channel) {
        registry.withLockedValue { $0.exportNames[ObjectIdentifier(channel)] = nil }
    }

    /// Answers a handshake's catalog query. Runs on the thread pool: the provider may
    /// block (the pool lock, creating an ephemeral clone).
    func answer(_ query: NBDHandshake.CatalogQuery, for channel: Channel) -> CatalogResult {
        switch query {
        case .describe(let name):
            return CatalogResult(answer: provider.describe(name).map { .found($0) } ?? .notFound)
        case .list:
            return CatalogResult(answer: .exports(provider.allExports()))
        case .metaContexts(let name, let queries, let listing):
            let contexts = provider.metaContexts(of: name, matching: queries, listing: listing)
            return CatalogResult(answer: contexts.map { .metaContexts($0) } ?? .notFound)
        case .open(let name):
            guard let description = provider.describe(name) else { return CatalogResult(answer: .notFound) }
            guard connectionEnteredTransmission(channel, export: description.name) else {
                return CatalogResult(answer: .refused("the connection closed", shuttingDown: false))
            }
            do {
                let export = try provider.open(description)
                return CatalogResult(answer: .found(description), export: export)
            } catch {
                connectionLeftTransmission(channel)
                return CatalogResult(
                    answer: .refused("\(description.name): \(error.message)", shuttingDown: error.code == .shutdown))
            }
        }
    }

    func connectionClosed(_ channel: Channel) {
        connectionClosed(ObjectIdentifier(channel))
    }

    func connectionClosed(_ id: ObjectIdentifier) {
        let nowIdle = registry.withLockedValue { registry -> Bool in
            registry.connections[id] = nil
            registry.exportNames[id] = nil
            return registry.shuttingDown && registry.connections.isEmpty
        }
        if nowIdle { idle.succeed(()) }
    }

    // MARK: Lean transmission

    /// The lean loop a plain connection on `eventLoop` goes to after its handshake; nil
    /// when connections stay on swift-nio.
    func leanLoop() -> LeanLoop? {
        guard !leanLoops.isEmpty else { return nil }
        let index = nextLeanLoop.withLockedValue { next -> Int in
            defer { next = (next + 1) % leanLoops.count }
            return next
        }
        return leanLoops[index]
    }

    /// Moves a connection from `channel` to `loop` (the caller dup'ed its socket,
    /// `descriptor`, and closes the channel once this returns true). The registry
    /// counts it as one connection throughout. False when the channel's connection
    /// is no longer registered or the loop has stopped: the caller keeps serving it.
    func handOff(
        _ channel: Channel, to loop: LeanLoop, descriptor: Int32, session: NBDSession, export: NBDExport, leftover: ByteBuffer
    ) -> Bool {
        // On the channel's own loop: `group.next()` here would step the group's
        // round-robin once per hand-off, in time with the accepts, and every new
        // connection would then land on the same swift-nio loop.
        let handle = LeanConnectionHandle(loop: loop, closed: channel.eventLoop.makePromise())
        let (moved, shuttingDown) = registry.withLockedValue { registry -> (Bool, Bool) in
            let old = ObjectIdentifier(channel)
            guard registry.connections[old] != nil else { return (false, false) }
            let new = ObjectIdentifier(handle)
            registry.connections[old] = nil
            registry.connections[new] = .lean(handle)
            registry.exportNames[new] = registry.exportNames.removeValue(forKey: old)
            return (true, registry.shuttingDown)
        }
        guard moved else {
            handle.closed.succeed(())
            return false
        }
        let handOff = LeanHandOff(descriptor: descriptor, session: session, export: export, leftover: leftover, handle: handle)
        if loop.execute({ loop.adopt(handOff) }) {
            // A shutdown that began meanwhile missed it (it asked the channel).
            if shuttingDown { handle.requestShutdown() }
            return true
        }
        // The loop stopped (the server is going away): nobody serves it.
        SocketIO.close(descriptor)
        release(export)
        connectionClosed(ObjectIdentifier(handle))
        handle.closed.succeed(())
        return true
    }

    /// Gives an export back when its connection is done with it. On the thread pool:
    /// closing may block (an ephemeral volume's bookkeeping).
    func release(_ export: NBDExport) {
        blocking.submit { export.close() }
    }

    public var connectionCount: Int { registry.withLockedValue { $0.connections.count } }

    /// Records that export `old` is now called `new` (and, for a volume, that its
    /// snapshots `old@S` are `new@S`), so that connections made under the old name are
    /// counted, and closed, under the new one.
    public func exportRenamed(from old: String, to new: String) {
        registry.withLockedValue { registry in
            for (id, name) in registry.exportNames {
                if name == old {
                    registry.exportNames[id] = new
                } else if !old.contains("@"), name.hasPrefix(old + "@") {
                    registry.exportNames[id] = new + name.dropFirst(old.count)
                }
            }
        }
    }

    /// Connections in transmission, per export name.
    public func connectionCounts() -> [String: Int] {
        registry.withLockedValue { $0.exportNames.values.reduce(into: [:]) { $0[$1, default: 0] += 1 } }
    }

    /// Closes the connections using exports whose names satisfy `matches`, the way
    /// shutdown closes them: running requests finish, queued ones get ESHUTDOWN. Waits
    /// up to `timeout` for them to go, then closes what is left. Returns how many there
    /// were. Blocks the caller (not an event loop). A caller that must keep clients
    /// away afterwards refuses them in its provider first.
    @discardableResult
    public func disconnect(exportsMatching matches: (String) -> Bool, timeout: TimeAmount = .seconds(10)) -> Int {
        let victims = registry.withLockedValue { registry -> [ServedConnection] in
            registry.exportNames.compactMap { id, name in matches(name) ? registry.connections[id] : nil }
        }
        for victim in victims { victim.requestShutdown() }
        let closed = EventLoopFuture.whenAllComplete(victims.map(\.closeFuture), on: group.next())
        let timer = group.next().scheduleTask(in: timeout) {
            for victim in victims { victim.close() }
        }
        _ = try? closed.wait()
        timer.cancel()
        return victims.count
    }

    /// Stops accepting, lets running requests finish, answers later ones with
    /// ESHUTDOWN and closes every connection; waits up to `timeout` for that, then
    /// closes what is left. Blocks the caller (not an event loop).
    public func shutdown(timeout: TimeAmount = .seconds(10)) {
        let (listening, open) = registry.withLockedValue { registry -> ([Channel], [ServedConnection]) in
            registry.shuttingDown = true
            let listening = registry.listeners
            registry.listeners = []
            return (listening, Array(registry.connections.values))
        }
        for channel in listening { try? channel.close().wait() }
        if open.isEmpty {
            idle.succeed(())
        } else {
            for connection in open { connection.requestShutdown() }
        }
        let loop = group.next()
        let timer = loop.scheduleTask(in: timeout) { [idle] in idle.succeed(()) }
        try? idle.futureResult.wait()
        timer.cancel()
        let remaining = registry.withLockedValue { Array($0.connections.values) }
        for connection in remaining { connection.close() }
        _ = try? EventLoopFuture.whenAllComplete(remaining.map(\.closeFuture), on: group.next()).wait()
        // Lean loops end once their connections are gone: their queues' reads finish
        // first (their replies go nowhere).
        for loop in leanLoops { loop.stop() }
        _ = try? EventLoopFuture.whenAllComplete(leanLoopsFinished, on: group.next()).wait()
        // Reads still on a loop queue finish (their replies go nowhere) before the
        // loops and the exports go away.
        for loopIO in registry.withLockedValue({ Array($0.loopIOs.values) }) {
            try? loopIO.eventLoop.submit { loopIO.close() }.wait()
        }
        try? threadPool.syncShutdownGracefully()
        try? group.syncShutdownGracefully()
    }
}

/// A connection the server counts: on a swift-nio channel, or handed to a lean loop.
enum ServedConnection: Sendable {
    case channel(Channel)
    case lean(LeanConnectionHandle)

    /// Running requests finish, later ones get ESHUTDOWN, then it closes.
    func requestShutdown() {
        switch self {
        case .channel(let channel): channel.pipeline.fireUserInboundEventTriggered(NBDServer.ShutdownEvent())
        case .lean(let handle): handle.requestShutdown()
        }
    }

    /// Closes it now.
    func close() {
        switch self {
        case .channel(let channel): channel.close(promise: nil)
        case .lean(let handle): handle.close()
        }
    }

    var closeFuture: EventLoopFuture<Void> {
        switch self {
        case .channel(let channel): channel.closeFuture
        case .lean(let handle): handle.closed.futureResult
        }
    }
}
