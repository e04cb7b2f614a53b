import ArgumentParser
import Logging
import NBDProtocol
import NBDTLS
import ThinControl
import ThinPool
import ThinServe
import ThinTransfer
import ThinSystem

extension CacheMode: ExpressibleByArgument {}
extension NBDTLSMode: ExpressibleByArgument {}
extension TransmissionLoop: ExpressibleByArgument {}

struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve every volume and snapshot of a pool over NBD.",
        discussion: """
            Each volume is a writable export named after it; each snapshot VOL@SNAP a read-only one. \
            With neither --socket nor --listen it listens on 127.0.0.1:10809. Under systemd socket \
            activation (LISTEN_PID/LISTEN_FDS) it serves the passed sockets. SIGINT/SIGTERM finish \
            the requests in flight, commit and exit 0.
            """)

    @OptionGroup var target: PoolArgument
    @OptionGroup(title: "TLS to origins (clones made with 'thinbd clone POOL nbds://...')") var originTLS: OriginTLSOptions

    @Option(name: .customLong("socket"), help: "Listen on a Unix domain socket (repeatable).")
    var sockets: [String] = []

    @Option(name: .customLong("listen"), help: "Listen on HOST:PORT (repeatable; [::1]:PORT for IPv6).")
    var listens: [String] = []

    @Option(help: "none: O_DIRECT through libaio (default where possible); writeback: the page cache.")
    var cache: CacheMode?

    @Option(name: .customLong("metadata-cache"), help: "Metadata kept in memory (default 64M); bounds the server's memory, not the pool's size.")
    var metadataCache: ByteSize?

    @Option(help: "Threads that run requests (default 32); they mostly wait for the disk.")
    var threads: Int?

    @Option(help: "Event loop threads (default: one per core), each with its own disk queue. With --transmission lean (the default) there are this many swift-nio loops for accepts, handshakes and TLS, and as many lean loops that serve requests.")
    var loops: Int?

    @Option(help: ArgumentHelp(
        "PATTERN=IOPS[,BYTES/s]: exports matching PATTERN share a token bucket of IOPS requests and BYTES per second (0: unlimited); the last matching rule wins; changed live with thinbd limit (repeatable).",
        valueName: "RULE"))
    var limit: [String] = []

    @Option(name: .customLong("idle-poll"), help: ArgumentHelp(
        "Microseconds an event loop keeps polling for its next request or disk completion before it sleeps (default 200; 0: sleep at once). Lowers queue-depth-1 latency where waking an idle CPU is slow (virtual machines), for up to one core's time while such a client runs; the poll shortens by itself for clients that pause longer.",
        valueName: "MICROSECONDS"))
    var idlePoll: Int = 200

    @Option(help: ArgumentHelp(
        "Which loop serves requests after a plain-text handshake: lean (default; the server's own loop per event loop, fewer instructions per request) or nio (swift-nio's channel pipeline, which also does every handshake). TLS connections always use nio.",
        valueName: "LOOP"))
    var transmission: TransmissionLoop = .lean

    @Option(name: .customLong("max-connections"), help: "Connections served at once (default 1024); more are closed as soon as they are accepted.")
    var maxConnections: Int = 1024

    @Option(name: .customLong("handshake-timeout"), help: "Seconds a client has to finish the NBD handshake (default 10); slower ones are dropped.")
    var handshakeTimeout: Double = 10

    @Flag(name: .customLong("read-only"), help: "Serve every export read-only.")
    var readOnly = false

    @Flag(help: "Serve a pool flagged for a check (a server found damage in it) read-write anyway; without it such a pool must be repaired with 'thinbd check --repair' first, or served --read-only.")
    var force = false

    @Option(name: .customLong("default-export"), help: "The export an empty export name selects.")
    var defaultExport: String?

    @Option(name: .customLong("run"), help: "Run COMMAND with $uri set, then stop and exit with its status.")
    var runCommand: String?

    @Flag(help: "Serve one connection on standard input and output.")
    var stdio = false

    @Option(help: ArgumentHelp(
        "PATTERN=SOURCE: an export name matching PATTERN (* and ?) is made on first use, as a writable clone of SOURCE (VOL or VOL@SNAP) or, with SOURCE blank:SIZE, an empty volume. All its connections share it; it is deleted after the last closes (repeatable).",
        valueName: "PATTERN=SOURCE"))
    var ephemeral: [String] = []

    @Flag(name: .customLong("ephemeral-keep"), help: "Keep ephemeral volumes after use, as ordinary volumes.")
    var ephemeralKeep = false

    @Option(name: .customLong("ephemeral-grace"), help: "Seconds an ephemeral volume outlives its last connection (default 5), for reconnects.")
    var ephemeralGrace: Double = 5

    @Option(name: .customLong("no-flush"), help: ArgumentHelp(
        "Exports matching PATTERN ('*' for all) answer FLUSH and FUA at once: fastest scratch disks, no durability for their data (the pool stays consistent). Unsafe for data you keep (repeatable).",
        valueName: "PATTERN"))
    var noFlush: [String] = []

    @Option(help: ArgumentHelp(
        "Control socket the CLI and CI systems use to manage the pool while it is served (default: POOL.control beside the pool; see docs/control-api.md).",
        valueName: "PATH"))
    var control: String?

    @Flag(name: .customLong("no-control"), help: "No control socket: other thinbd commands cannot reach this server.")
    var noControl = false

    @Option(help: ArgumentHelp("Serve Prometheus metrics at http://HOST:PORT/metrics (per export bytes, requests, errors, latency, connections; pool space, commits, copy-on-write). A bare PORT listens on 127.0.0.1.", valueName: "[HOST:]PORT"))
    var metrics: String?

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical (default info; debug shows connections).")
    var logLevel: String = "info"

    @Option(name: .customLong("low-water"), help: "Warn when more than PERCENT of the data space is used (default 90).")
    var lowWater: Int = 90

    @Option(help: ArgumentHelp("Grow the pool by STEP when it passes the low-water mark or a write finds it full (needs --autogrow-max).", valueName: "STEP"))
    var autogrow: ByteSize?

    @Option(name: .customLong("autogrow-max"), help: ArgumentHelp("The data capacity --autogrow stops at.", valueName: "SIZE"))
    var autogrowMax: ByteSize?

    @Option(help: ArgumentHelp(
        "off (default), on (clients may upgrade with STARTTLS) or require (every option but STARTTLS is refused until TLS is up; nbds:// URIs).",
        valueName: "MODE"))
    var tls: NBDTLSMode = .off

    @Option(name: .customLong("tls-certificates"), help: ArgumentHelp(
        "Directory with ca-cert.pem, server-cert.pem and server-key.pem (and ca-crl.pem, checked when present), as qemu-nbd and nbdkit take them.",
        valueName: "DIR"))
    var tlsCertificates: String?

    @Option(name: .customLong("tls-psk"), help: ArgumentHelp("Pre-shared keys in psktool's format (IDENTITY:HEXKEY lines) instead of certificates.", valueName: "FILE"))
    var tlsPSK: String?

    @Flag(name: .customLong("tls-verify-peer"), help: "Clients must present a certificate signed by ca-cert.pem (with --tls-certificates).")
    var tlsVerifyPeer = false

    @Flag(help: "Announce the server as one JSON line on standard output ({\"control\", \"metrics\", \"pid\", \"uris\"}) instead of its URIs.")
    var json = false

    func validate() throws {
        if let metrics, ServeOptions.parseMetricsAddress(metrics) == nil {
            throw ValidationError("--metrics \(metrics): expected PORT (on 127.0.0.1) or HOST:PORT")
        }
        if Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError("--log-level must be one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if !(1...100).contains(lowWater) { throw ValidationError("--low-water must be a percentage from 1 to 100") }
        if (autogrow == nil) != (autogrowMax == nil) { throw ValidationError("--autogrow STEP and --autogrow-max SIZE go together") }
        if let autogrow, autogrow.bytes < 1 << 20 || autogrow.bytes > 1 << 50 { throw ValidationError("--autogrow must be between 1M and 1P") }
        if let autogrowMax, autogrowMax.bytes > 1 << 60 { throw ValidationError("--autogrow-max must be at most 1E") }
        if readOnly && autogrow != nil { throw ValidationError("--autogrow needs a writable pool; it cannot be combined with --read-only") }
        if noControl && control != nil { throw ValidationError("--control and --no-control contradict each other") }
        for text in listens where ServeOptions.parseListen(text) == nil {
            throw ValidationError("--listen \(text): expected HOST:PORT")
        }
        if let threads, !(1...1024).contains(threads) {
            throw ValidationError("--threads must be between 1 and 1024")
        }
        for rule in limit where ExportLimitRule.parse(rule) == nil {
            throw ValidationError("--limit \(rule): expected PATTERN=IOPS[,BYTES/s], for example 'build-*=1000,100M'")
        }
        if let loops, !(1...256).contains(loops) {
            throw ValidationError("--loops must be between 1 and 256")
        }
        if !(0...100_000).contains(idlePoll) {
            throw ValidationError("--idle-poll must be between 0 and 100000 microseconds")
        }
        if !(1...1_000_000).contains(maxConnections) {
            throw ValidationError("--max-connections must be between 1 and 1000000")
        }
        if !(handshakeTimeout > 0 && handshakeTimeout <= 3600) {
            throw ValidationError("--handshake-timeout must be more than 0 and at most 3600 seconds")
        }
        if let metadataCache, metadataCache.bytes < 1 << 20 {
            throw ValidationError("--metadata-cache must be at least 1M")
        }
        for rule in ephemeral where Self.parseEphemeral(rule) == nil {
            throw ValidationError("--ephemeral \(rule): expected PATTERN=VOLUME, PATTERN=VOLUME@SNAPSHOT or PATTERN=blank:SIZE")
        }
        if !(0...3600).contains(ephemeralGrace) {
            throw ValidationError("--ephemeral-grace must be between 0 and 3600 seconds")
        }
        if readOnly && !ephemeral.isEmpty {
            throw ValidationError("--ephemeral needs a writable pool; it cannot be combined with --read-only")
        }
        if tlsCertificates != nil && tlsPSK != nil {
            throw ValidationError("--tls-certificates and --tls-psk are alternatives; give one")
        }
        if tlsVerifyPeer && tlsCertificates == nil {
            throw ValidationError("--tls-verify-peer checks client certificates against the CA of --tls-certificates DIR")
        }
        if tls != .off && tlsCertificates == nil && tlsPSK == nil {
            throw ValidationError("--tls \(tls.rawValue) needs --tls-certificates DIR or --tls-psk FILE")
        }
        if tls == .off && (tlsCertificates != nil || tlsPSK != nil) {
            throw ValidationError("TLS credentials were given but --tls is off: add --tls on or --tls require")
        }
        if stdio && (!sockets.isEmpty || !listens.isEmpty || runCommand != nil) {
            throw ValidationError("--stdio serves one connection on stdin/stdout; it cannot be combined with --socket, --listen or --run")
        }
    }

    static func parseEphemeral(_ text: String) -> EphemeralRule? {
        guard let equals = text.firstIndex(of: "="), equals != text.startIndex else { return nil }
        let pattern = String(text[..<equals])
        let source = String(text[text.index(after: equals)...])
        guard !source.isEmpty, !pattern.contains("@") else { return nil }
        if source.hasPrefix("blank:") {
            guard let size = ByteSize(argument: String(source.dropFirst(6))), size.bytes > 0 else { return nil }
            return EphemeralRule(pattern: pattern, source: .blank(size.bytes))
        }
        return EphemeralRule(pattern: pattern, source: .clone(source))
    }

    func run() throws {
        var options = ServeOptions(poolPath: target.pool)
        options.unixSockets = sockets
        options.listenAddresses = listens
        options.cache = cache
        options.readOnly = readOnly
        options.force = force
        options.defaultExport = defaultExport
        options.runCommand = runCommand
        options.stdio = stdio
        options.metadataCacheBytes = metadataCache?.bytes
        options.threads = threads
        options.loops = loops
        options.limits = limit.compactMap(ExportLimitRule.parse)
        options.maxConnections = maxConnections
        options.idlePollMicroseconds = idlePoll
        options.transmission = transmission
        options.handshakeTimeoutMilliseconds = Int(handshakeTimeout * 1000)
        options.ephemeralRules = ephemeral.compactMap(Self.parseEphemeral)
        options.keepEphemeral = ephemeralKeep
        options.ephemeralGraceMilliseconds = Int(ephemeralGrace * 1000)
        options.noFlushPatterns = noFlush
        options.controlSocket = control
        options.controlDisabled = noControl
        options.metricsAddress = metrics
        options.json = json
        options.tlsMode = tls
        options.originOpener = OriginConnector(tls: try originTLS.load())
        options.tlsSource = tlsCertificates.map { .certificates(directory: $0) } ?? tlsPSK.map { .psk(file: $0) }
        options.tlsVerifyPeer = tlsVerifyPeer
        options.lowWaterPercent = lowWater
        options.autoGrowStep = autogrow?.bytes
        options.autoGrowMaximum = autogrowMax?.bytes
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            // Written by a thread of its own: a stalled reader of standard error never
            // stalls the server.
            var handler = StreamLogHandler(label: label, stream: BackgroundStandardError())
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "thinbd")
        let status: Int32
        do {
            defer { BackgroundStandardError.flush() }
            status = try ServeRunner.run(options, logger: logger)
        } catch {
            throw fail(error)
        }
        if status != 0 { throw ExitCode(status) }
    }
}
