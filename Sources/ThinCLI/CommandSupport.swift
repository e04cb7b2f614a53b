import ArgumentParser
import NBDTLS
import ThinControl
import ThinPool
import ThinSystem

/// The pool file argument every command takes first.
struct PoolArgument: ParsableArguments {
    @Argument(help: "Path of the pool file.")
    var pool: String
}

/// How a pool command reaches the pool, and how it prints.
struct LiveOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "Control socket of the server that serves the pool (default: POOL.control, where 'thinbd serve' puts it). Without a server there, the command opens the pool itself.",
        valueName: "PATH"))
    var control: String?

    @Flag(help: "Print the result as JSON (the control protocol's result object).")
    var json = false
}

/// TLS credentials for an NBD client (`import` and `export` with nbds:// URIs, or a
/// server that requires TLS), as qemu-img and libnbd take them.
struct TLSClientOptions: ParsableArguments {
    @Option(name: .customLong("tls-certificates"), help: ArgumentHelp(
        "Directory with ca-cert.pem (the server's CA) and, for servers that check clients, client-cert.pem and client-key.pem.",
        valueName: "DIR"))
    var certificates: String?

    @Option(name: .customLong("tls-psk"), help: ArgumentHelp("Pre-shared keys in psktool's format (IDENTITY:HEXKEY lines).", valueName: "FILE"))
    var psk: String?

    @Option(name: .customLong("tls-username"), help: ArgumentHelp("The PSK identity to use (default: the file's first).", valueName: "NAME"))
    var username: String?

    func validate() throws { try Self.validate(certificates, psk, username, prefix: "--tls") }

    /// The credentials, loaded (reads the files); nil without TLS options.
    func load() throws -> NBDTLSClientCredentials? { try Self.load(certificates, psk, username) }

    static func validate(_ certificates: String?, _ psk: String?, _ username: String?, prefix: String) throws {
        if certificates != nil && psk != nil { throw ValidationError("\(prefix)-certificates and \(prefix)-psk are alternatives; give one") }
        if username != nil && psk == nil { throw ValidationError("\(prefix)-username names a key of \(prefix)-psk FILE") }
    }

    static func load(_ certificates: String?, _ psk: String?, _ username: String?) throws -> NBDTLSClientCredentials? {
        do {
            if let certificates { return try NBDTLSClientCredentials.load(.certificates(directory: certificates)) }
            if let psk { return try NBDTLSClientCredentials.load(.psk(file: psk), username: username) }
            return nil
        } catch {
            throw fail(error)
        }
    }
}

/// How `serve` reaches `nbds://` origins of origin-backed volumes (the client side of
/// TLS, apart from the server's own `--tls-*`).
struct OriginTLSOptions: ParsableArguments {
    @Option(name: .customLong("origin-tls-certificates"), help: ArgumentHelp(
        "For nbds:// origins: directory with ca-cert.pem and, if the origin checks clients, client-cert.pem and client-key.pem.",
        valueName: "DIR"))
    var certificates: String?

    @Option(name: .customLong("origin-tls-psk"), help: ArgumentHelp("For nbds:// origins: pre-shared keys (IDENTITY:HEXKEY lines).", valueName: "FILE"))
    var psk: String?

    @Option(name: .customLong("origin-tls-username"), help: ArgumentHelp("The PSK identity for origins (default: the file's first).", valueName: "NAME"))
    var username: String?

    func validate() throws { try TLSClientOptions.validate(certificates, psk, username, prefix: "--origin-tls") }

    func load() throws -> NBDTLSClientCredentials? { try TLSClientOptions.load(certificates, psk, username) }
}

/// Runs `command` on the pool, through its server when one serves it, else offline
/// (see `PoolCommandClient`); returns the result, of the type the command returns (see
/// `ControlCommand.decodeResult`), or fails the command with the error (as
/// `{"error": ...}` on standard output too with --json).
func runPoolCommand<Value>(
    _ command: ControlCommand, pool: String, options: LiveOptions, waitSeconds: Double = 0, as type: Value.Type = Value.self
) throws -> Value {
    try runPoolCommandReportingServer(command, pool: pool, options: options, waitSeconds: waitSeconds, as: type).result
}

/// `runPoolCommand`, also saying whether a server answered.
func runPoolCommandReportingServer<Value>(
    _ command: ControlCommand, pool: String, options: LiveOptions, waitSeconds: Double = 0, as _: Value.Type = Value.self
) throws -> (result: Value, served: Bool) {
    let client = PoolCommandClient(poolPath: pool, controlPath: options.control, waitSeconds: waitSeconds)
    let (reply, served) = client.run(command)
    do throws(ControlError) {
        return (try reply.result(), served)
    } catch {
        throw fail(error, options)
    }
}

/// What `--json` prints on failure.
struct ErrorOutput: Codable, Equatable {
    var error: ControlError
}

/// Fails the command with `error`: one line on standard error, and with --json also
/// `{"error": {"code", "message"}}` on standard output.
func fail(_ error: ControlError, _ options: LiveOptions, code: Int32 = 1) -> ExitCode {
    if options.json { print(ControlJSON.pretty(ErrorOutput(error: error))) }
    return fail(error, code: code)
}

/// Runs a copy with a progress bar (on a terminal); a failure ends the command.
func withProgress<T>(_ label: String, _ options: LiveOptions, _ body: (ProgressBar) throws -> T) throws -> T {
    let progress = ProgressBar(label)
    do {
        let result = try body(progress)
        progress.finish()
        return result
    } catch {
        progress.finish()  // the error goes on a line of its own
        throw fail(ControlError(code: "io", message: "\(error)"), options)
    }
}

/// Prints `result` as JSON with --json, else runs `human`.
func emit(_ result: some Encodable, _ options: LiveOptions, human: () -> Void) {
    if options.json {
        print(ControlJSON.pretty(result))
    } else {
        human()
    }
}

/// Opens the pool here (`demo`; pool commands go through `runPoolCommand`), runs
/// `body`, and closes (committing) it. Pool errors are printed as one line on standard
/// error and end the command with exit status 1.
func withPool<T>(_ path: String, readOnly: Bool = false, _ body: (Pool) throws -> T) throws -> T {
    let pool: Pool
    do {
        pool = try Pool.open(path: path, readOnly: readOnly)
    } catch {
        throw fail(error)
    }
    do {
        let result = try body(pool)
        try pool.close()
        return result
    } catch {
        try? pool.close()
        throw fail(error)
    }
}

/// Prints `thinbd: error: MESSAGE` and returns the exit code to throw.
func fail(_ error: Error, code: Int32 = 1) -> ExitCode {
    if let exit = error as? ExitCode { return exit }
    SystemInfo.writeStandardError("thinbd: error: \(error)\n")
    return ExitCode(code)
}

/// A usage bar like `[#######.............]`.
func usageBar(used: UInt64, total: UInt64, width: Int = 30) -> String {
    let filled = total == 0 ? 0 : Int((Double(used) / Double(total) * Double(width)).rounded())
    return "[" + String(repeating: "#", count: min(filled, width)) + String(repeating: ".", count: max(0, width - filled)) + "]"
}

func percent(_ used: UInt64, _ total: UInt64) -> String {
    guard total > 0 else { return "0.0%" }
    let tenths = Int((Double(used) / Double(total) * 1000).rounded())
    return "\(tenths / 10).\(tenths % 10)%"
}
