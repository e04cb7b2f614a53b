import Dispatch
import Logging
import class Prometheus.PrometheusCollectorRegistry
import NBDProtocol
import NBDServer
import NBDTLS
import NIOCore
import ThinControl
import ThinPool
import ThinSystem

/// Everything `thinbd serve` takes.
public struct ServeOptions: Sendable {
    public var poolPath: String
    public var unixSockets: [String] = []
    /// `HOST:PORT`, `[V6]:PORT`.
    public var listenAddresses: [String] = []
    public var cache: CacheMode?
    public var readOnly = false
    /// Open a pool flagged for a check read-write anyway (`--force`).
    public var force = false
    public var defaultExport: String?
    public var runCommand: String?
    public var stdio = false
    public var commitIntervalMilliseconds = 1000
    /// Threads that run export operations (nil: the server's default).
    public var threads: Int?
    /// `--loops`: event loop threads (nil: one per core).
    public var loops: Int?
    /// `--max-connections`.
    public var maxConnections = 1024
    /// `--limit`: per-export rate limits.
    public var limits: [ExportLimitRule] = []
    /// `--handshake-timeout`.
    public var handshakeTimeoutMilliseconds = 10_000
    /// `--idle-poll`: how long a loop polls for its next event before sleeping.
    public var idlePollMicroseconds = 200
    /// `--transmission`: which loop serves requests after a plain-text handshake. The
    /// lean loop, unlike `NBDServer.Configuration`'s own default (the channel), which
    /// in-process users of the library keep.
    public var transmission: TransmissionLoop = .lean
    /// Metadata cache size in bytes (clean 4 KiB blocks kept); nil keeps the default (64 MiB).
    public var metadataCacheBytes: UInt64?
    /// `--ephemeral`: export names made on first use.
    public var ephemeralRules: [EphemeralRule] = []
    /// `--ephemeral-keep`: ephemeral volumes stay (as ordinary volumes) after use.
    public var keepEphemeral = false
    /// How long an ephemeral volume outlives its last connection (reconnects keep it).
    public var ephemeralGraceMilliseconds = 5000
    /// `--no-flush`: export-name patterns whose FLUSH and FUA return at once.
    public var noFlushPatterns: [String] = []
    /// `--control PATH`; nil puts the control socket beside the pool (`POOL.control`).
    public var controlSocket: String?
    /// `--no-control`: no control socket (the CLI then cannot reach this server).
    public var controlDisabled = false
    /// `--metrics HOST:PORT`: serve Prometheus metrics there.
    public var metricsAddress: String?
    /// `--low-water PERCENT`: warn (and set a metric) when more of the data space is used.
    public var lowWaterPercent = 90
    /// `--autogrow STEP --autogrow-max SIZE`.
    public var autoGrowStep: UInt64?
    public var autoGrowMaximum: UInt64?
    /// `--json`: announce the server as one JSON line on standard output instead of URIs.
    public var json = false
    /// `--tls off|on|require`.
    public var tlsMode: NBDTLSMode = .off
    /// How origin-backed volumes reach their origins (nil: their unfetched blocks fail).
    public var originOpener: OriginOpener?
    /// `--tls-certificates DIR` or `--tls-psk FILE`.
    public var tlsSource: NBDTLSSource?
    /// `--tls-verify-peer`: clients need a certificate signed by the CA.
    public var tlsVerifyPeer = false

    public init(poolPath: String) { self.poolPath = poolPath }

    /// Whether a listen address is reachable from this host only.
    public static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host.hasPrefix("127.")
    }

    public static let defaultHost = "127.0.0.1"
    public static let defaultPort = 10809

    /// The metrics endpoint's address: `HOST:PORT`, or a bare `PORT` on loopback.
    public static func parseMetricsAddress(_ text: String) -> (host: String, port: Int)? {
        if let port = Int(text), (0...65535).contains(port) { return (defaultHost, port) }
        return parseListen(text)
    }

    /// Splits `HOST:PORT` (the host may be a bracketed IPv6 address).
    public static func parseListen(_ text: String) -> (host: String, port: Int)? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        var host = String(text[..<colon])
        guard let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host.isEmpty { return nil }
        return (host, port)
    }
}

/// Errors that stop `serve` before it serves.
public struct ServeError: Error, CustomStringConvertible {
    public var description: String
}

/// Runs the NBD server on a pool until SIGINT/SIGTERM (or the end of `--run`'s command,
/// or of the `--stdio` connection); returns the process exit status.
///
/// The server is an ordered set of services: the pool, the auto-committer, the
/// ephemeral reaper, the NBD listeners, the space monitor, the metrics endpoint and
/// the control socket. Each is set up in that order (a failure stops the ones already
/// up, in reverse, and reports the error), then a swift-service-lifecycle
/// `ServiceGroup` runs them and, on shutdown, stops them in reverse order from one
/// place: the control socket first, the pool's final commit last.
public enum ServeRunner {
    public static func run(_ options: ServeOptions, logger: Logger) throws -> Int32 {
        // Before any thread exists: only the signal thread may take SIGINT/SIGTERM.
        Signals.blockTermination()
        let log: @Sendable (String) -> Void = { logger.info("\($0)") }
        if let name = options.defaultExport, name.isEmpty { throw ServeError(description: "--default-export needs a name") }
        let services = ServeServices()
        do {
            return try serve(options, services: services, logger: logger, log: log)
        } catch {
            // Whatever was set up stops, in reverse order; the pool commits and closes last.
            services.stopAll()
            if let serveError = error as? ServeError { throw serveError }
            throw ServeError(description: "\(error)")
        }
    }

    /// Loads the TLS credentials (reads files: at start, never on a loop).
    static func tlsConfiguration(_ options: ServeOptions) throws -> NBDServer.TLS? {
        guard options.tlsMode != .off else {
            if options.tlsSource != nil || options.tlsVerifyPeer {
                throw ServeError(description: "TLS credentials were given but --tls is off: add --tls on or --tls require")
            }
            return nil
        }
        guard let source = options.tlsSource else {
            throw ServeError(description: "--tls \(options.tlsMode.rawValue) needs --tls-certificates DIR or --tls-psk FILE")
        }
        do {
            return NBDServer.TLS(
                mode: options.tlsMode, credentials: try NBDTLSServerCredentials.load(source, verifyPeer: options.tlsVerifyPeer))
        } catch {
            throw ServeError(description: error.description)
        }
    }

    private static func serve(
        _ options: ServeOptions, services: ServeServices, logger: Logger, log: @escaping @Sendable (String) -> Void
    ) throws -> Int32 {
        // Credentials first: a bad certificate fails the start before the pool is opened.
        let tls = try tlsConfiguration(options)
        let pool: Pool
        do {
            pool = try Pool.open(path: options.poolPath, readOnly: options.readOnly, cache: options.cache, force: options.force)
        } catch {
            throw ServeError(description: error.description)
        }
        if let opener = options.originOpener { pool.setOriginOpener(opener) }
        pool.onOriginChange { event in
            if let problem = event.problem {
                log("\(problem); reads of blocks not fetched yet fail with EIO until \(event.locator) answers with the image recorded")
            } else {
                log("origin \(event.locator) answers again")
            }
        }
        var backedByOrigins = false
        for volume in pool.listVolumes() where volume.kind != .snapshot {
            guard let origin = volume.origin else { continue }
            log("\(volume.name) is backed by origin \(origin.locator) (\(formatBytes(origin.size)))")
            backedByOrigins = true
        }
        // Checked now, so that an origin that is down or another image is in the log at
        // start; off the start-up path, since an unreachable host waits out a timeout.
        if backedByOrigins { DispatchQueue.global().async { pool.probeOrigins() } }
        // Once, on whichever thread met the damage (it may be a loop: the log is queued).
        pool.onFailure { failure in
            switch failure.kind {
            case .damage:
                log("pool damaged, serving reads only and committing nothing more: \(failure.reason); stop the server and run thinbd check --repair \(options.poolPath)")
            case .commitFailed:
                log("\(failure.reason); serving reads only and committing nothing more (what that commit held may be lost); restart the server to serve the last commit")
            }
        }
        if pool.needsCheck {
            log("warning: \(options.poolPath) is flagged for a check (a server found damage in it); run thinbd check --repair")
        }
        let poolClosed = ClosedBox()
        services.add("pool") {
            do {
                try pool.close()
            } catch {
                logger.error("closing the pool failed: \(error)")
                poolClosed.failed()
            }
        }
        if let bytes = options.metadataCacheBytes {
            pool.metadataCacheBlocks = Int(min(bytes / 4096, UInt64(Int.max)))
        }
        if let name = options.defaultExport, (try? pool.volumeInfo(name)) == nil {
            throw ServeError(description: "--default-export \(name): no such volume or snapshot")
        }
        var metricsHost: (host: String, port: Int)?
        if let address = options.metricsAddress {
            guard let parsed = ServeOptions.parseMetricsAddress(address) else {
                throw ServeError(description: "--metrics \(address): expected PORT or HOST:PORT")
            }
            if !ServeOptions.isLoopback(parsed.host) {
                log("notice: metrics at \(address) can be read from other hosts (export names, sizes, traffic)")
            }
            metricsHost = parsed
        }

        let committer = AutoCommitter(pool: pool, milliseconds: options.commitIntervalMilliseconds) { error in
            logger.error("commit failed: \(error)")
        }
        services.add("auto-committer") { committer.stop() }

        if !options.readOnly { EphemeralVolumes.removeLeftovers(of: pool, log: log) }
        let ephemeral = options.ephemeralRules.isEmpty ? nil : EphemeralVolumes(
            pool: pool, rules: options.ephemeralRules, keep: options.keepEphemeral,
            graceMilliseconds: options.ephemeralGraceMilliseconds, log: log)
        if let ephemeral { services.add("ephemeral reaper") { ephemeral.stop() } }

        let provider = PoolExportProvider(
            pool: pool, readOnly: options.readOnly, defaultExport: options.defaultExport, ephemeral: ephemeral,
            noFlushPatterns: options.noFlushPatterns, limits: options.limits)
        var metrics: ServeMetrics?
        var registry: PrometheusCollectorRegistry?
        if metricsHost != nil {
            registry = ServeMetrics.bootstrapPrometheus()
            let made = ServeMetrics(pool: pool)
            metrics = made
            provider.metrics = made
            if let ephemeral { ephemeral.deleted = { made.forget($0) } }
        }
        provider.debugLog = { logger.debug("\($0)") }
        if let step = options.autoGrowStep, let maximum = options.autoGrowMaximum, !options.readOnly {
            pool.autoGrow = AutoGrowPolicy(step: step, maximum: maximum) { [metrics] size in
                metrics?.grew()
                logger.notice("autogrow: pool \(options.poolPath) grew to \(formatBytes(size))")
            }
        }

        var configuration = NBDServer.Configuration()
        configuration.tls = tls
        if let threads = options.threads { configuration.ioThreads = threads }
        if let loops = options.loops { configuration.eventLoopThreads = loops }
        configuration.maxConnections = options.maxConnections
        configuration.handshakeTimeout = .milliseconds(Int64(options.handshakeTimeoutMilliseconds))
        configuration.idlePoll = .microseconds(Int64(options.idlePollMicroseconds))
        configuration.transmission = options.transmission
        // Debug builds stop at any call that could block a loop (docs/architecture.md).
        configuration.eventLoopThreadSetup = { NonBlockingThread.markCurrent() }
        SystemInfo.raiseOpenFileLimit()
        if !SystemInfo.keepFreedBuffersMapped() { log("the allocator refused its thresholds: large requests may run slower") }
        let server = NBDServer(provider: provider, configuration: configuration, log: log)
        // Unix sockets renamed into place (publishSocket): their listeners know them by
        // the staging name, so the path is removed here, as a socket's own path would be.
        let publishedSockets = LockedValue([String]())
        services.add("NBD listeners") {
            server.shutdown()
            for path in publishedSockets.withLockedValue({ $0 }) { SystemInfo.removeFile(path) }
        }
        let stop = StopRequest()
        var uris: [String] = []
        var baseURIs: [String] = []
        // The URIs announced: nbds:// when plain text is refused.
        let requireTLS = options.tlsMode == .require
        do {
            if options.stdio {
                let finished = try server.serveStandardIO()
                finished.whenComplete { _ in stop.request() }
            } else {
                for fd in SystemInfo.socketActivationDescriptors() {
                    try server.listen(inheritedSocket: fd)
                    uris.append("(socket activation fd \(fd))")
                }
                for path in options.unixSockets {
                    // Bound under another name and renamed once it listens: a client that
                    // waits for the path to appear is never refused.
                    if let staged = SystemInfo.socketStagingPath(for: path) {
                        try server.listen(unixSocket: staged)
                        try SystemInfo.publishSocket(staged, at: path)
                        publishedSockets.withLockedValue { $0.append(path) }
                    } else {
                        try server.listen(unixSocket: path)
                    }
                    uris.append(NBDURI.unix(socket: path, export: options.defaultExport, tls: requireTLS))
                    baseURIs.append(NBDURI.unix(socket: path, export: nil, tls: requireTLS))
                }
                var addresses = options.listenAddresses
                if addresses.isEmpty && options.unixSockets.isEmpty && uris.isEmpty {
                    addresses = ["\(ServeOptions.defaultHost):\(ServeOptions.defaultPort)"]
                }
                for text in addresses {
                    guard let (host, port) = ServeOptions.parseListen(text) else {
                        throw ServeError(description: "--listen \(text): expected HOST:PORT")
                    }
                    if options.tlsMode != .require && !ServeOptions.isLoopback(host) {
                        log("warning: listening on \(text), which other hosts can reach, without --tls require: anyone who can connect reads and writes every export, in plain text")
                    }
                    let bound = try server.listen(host: host, port: port)
                    uris.append(NBDURI.tcp(host: host, port: bound.port ?? port, export: options.defaultExport, tls: requireTLS))
                    baseURIs.append(NBDURI.tcp(host: host, port: bound.port ?? port, export: nil, tls: requireTLS))
                }
            }
        } catch let error as ServeError {
            throw error
        } catch {
            throw ServeError(description: "could not listen: \(error)")
        }

        if !options.readOnly {
            let monitor = SpaceMonitor(
                pool: pool, lowWaterPercent: options.lowWaterPercent, autoGrow: pool.autoGrow != nil, metrics: metrics,
                logger: logger)
            services.add("space monitor") { monitor.stop() }
        }

        var metricsEndpoint: MetricsEndpoint?
        if let (host, port) = metricsHost, let registry, let metrics {
            let endpoint = try MetricsEndpoint(host: host, port: port, registry: registry) { metrics.samplePool() }
            metricsEndpoint = endpoint
            services.add("metrics endpoint") { endpoint.stop() }
        }

        var control: ControlServer?
        if !options.controlDisabled {
            let path = options.controlSocket ?? ControlEndpoint.defaultPath(forPool: options.poolPath)
            do {
                let made = try ControlServer(
                    path: path, commands: PoolCommands(pool: pool, served: ServedPool(
                        server: server, provider: provider, serverURIs: baseURIs,
                        metricsURL: metricsEndpoint?.url)), log: log)
                control = made
                services.add("control socket") { made.stop() }
            } catch {
                // The default place may be unwritable or too long a path; serving
                // matters more, the CLI will say it cannot reach the server.
                if options.controlSocket != nil { throw error }
                logger.warning("no control socket (\(error)); pass --control PATH to choose another place")
            }
        }

        if !options.stdio {
            announce(options, uris: uris, control: control, metricsURL: metricsEndpoint?.url)
            let exports = provider.allExports().map(\.name)
            log("serving \(exports.count) export\(exports.count == 1 ? "" : "s") from \(options.poolPath) (\(pool.engineName)); pid \(SystemInfo.processID)\(control.map { "; control socket \($0.path)" } ?? "")\(metricsEndpoint.map { "; metrics at \($0.url)" } ?? "")")
        }

        let exitStatus = ExitStatusBox()
        if let command = options.runCommand {
            let uri = uris.first { $0.hasPrefix("nbd+unix") } ?? uris.first { $0.hasPrefix("nbd") } ?? ""
            let child: ChildProcess
            do {
                child = try ChildProcess.shell(command, environment: ["uri": uri, "THINBD_URI": uri])
            } catch {
                throw ServeError(description: "--run: \(error)")
            }
            Thread.detach {
                exitStatus.set(child.wait())
                stop.request()
            }
        }
        Signals.onTermination { number in
            log("signal \(number): shutting down")
            stop.request()
        }

        services.run(until: stop, logger: logger)
        if poolClosed.hasFailed { return 1 }
        return exitStatus.get() ?? 0
    }

    /// The URIs served, or with `--json` one line for programs.
    private static func announce(_ options: ServeOptions, uris: [String], control: ControlServer?, metricsURL: String?) {
        if options.json {
            let announcement = ServeAnnouncement(
                uris: uris.filter { $0.hasPrefix("nbd") }, control: control?.path, metrics: metricsURL,
                pid: UInt64(SystemInfo.processID))
            print(ControlJSON.line(announcement))
        } else {
            for uri in uris where uri.hasPrefix("nbd") { print(uri) }
        }
        SystemInfo.flushStandardOutput()
    }
}

/// What `serve --json` prints once it listens: one line for programs.
public struct ServeAnnouncement: Codable, Sendable, Equatable {
    /// The NBD URIs it serves.
    public var uris: [String]
    /// Its control socket (null with `--no-control`).
    @Nullable public var control: String?
    /// The `--metrics` URL (null without).
    @Nullable public var metrics: String?
    public var pid: UInt64
}

final class ExitStatusBox: @unchecked Sendable {
    private let lock = Lock()
    private var value: Int32?
    func set(_ status: Int32) { lock.withLock { value = status } }
    func get() -> Int32? { lock.withLock { value } }
}

enum Thread {
    /// Runs `body` on a new background thread.
    static func detach(_ body: @escaping @Sendable () -> Void) {
        DispatchQueue.global().async(execute: body)
    }
}

/// `serve --transmission`: which loop serves requests after a plain-text handshake
/// (`nio` or `lean`), for callers that do not import NBDServer.
public typealias TransmissionLoop = NBDServer.Transmission
