import ThinPool
import ThinSystem

public enum ControlEndpoint {
    /// The version the CLI and `hello` report.
    public static let version = "0.1.0"

    /// Where `thinbd serve` puts its control socket unless told otherwise: beside the
    /// pool file, named after it.
    public static func defaultPath(forPool poolPath: String) -> String { poolPath + ".control" }

    /// Why `path` is no safe place for a control socket, or nil. Whoever can replace the
    /// socket can take the commands meant for the server (or answer them): its directory
    /// must not be writable by other users, unless it is sticky (like /tmp: then only the
    /// owner of a file can remove it) and a socket already there is ours.
    public static func unsafePlace(_ path: String) -> String? {
        let directory = path.lastIndex(of: "/").map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        guard let place = SystemInfo.status(of: directory, followingLinks: true) else { return nil }
        guard place.isWritableByOthers else { return nil }
        guard place.isSticky else {
            return "its directory \(directory) is writable by other users (mode \(String(place.mode, radix: 8))) and not sticky: anyone could replace the socket; choose another --control PATH"
        }
        if let existing = SystemInfo.status(of: path), existing.owner != SystemInfo.effectiveUserID {
            return "\(path) belongs to another user (uid \(existing.owner)) in the shared directory \(directory)"
        }
        return nil
    }
}

/// A connection to a server's control socket: one request, one reply, in order.
public final class ControlClient {
    private let connection: StreamConnection
    private var framer = ControlLineFramer(limit: ControlLineFramer.maxReplyBytes)
    /// The server's answer to the `hello` sent on connecting: who it is, which file it
    /// has open, where its NBD listeners are.
    public let hello: HelloResult

    /// Asks `hello` on a new connection.
    private init(connection: StreamConnection) throws(ControlError) {
        self.connection = connection
        hello = try Self.exchange(.hello, on: connection, framer: &framer).result(as: HelloResult.self)
    }

    /// Connects to the server that has pool `poolPath`: at `explicitPath` (`--control`)
    /// if given, else at the pool's default socket. Nil when no server is there (no
    /// socket file, or a dead server's, or a path too long to be one); an error when an
    /// explicit socket does not answer, or connecting fails some other way, or the server
    /// there has another file open than the one now at `poolPath` (`other-pool`). Cost:
    /// a connect and a `hello` round trip.
    public static func connectToServer(ofPool poolPath: String, at explicitPath: String?) throws(ControlError) -> ControlClient? {
        let socket = explicitPath ?? ControlEndpoint.defaultPath(forPool: poolPath)
        if SystemInfo.fileExists(socket), let problem = ControlEndpoint.unsafePlace(socket) {
            throw ControlError(code: "unreachable", message: "not using the control socket \(socket): \(problem)")
        }
        let connection: StreamConnection
        do throws(SystemError) {
            connection = try StreamConnection(connectingTo: socket)
        } catch {
            let noServer = error.code == .noEntry || error.code == .connectionRefused || error.code == .nameTooLong
            if explicitPath == nil && noServer { return nil }
            throw ControlError(code: "unreachable", message: "no server answers at \(socket): \(error.message)")
        }
        let client = try ControlClient(connection: connection)
        try client.confirmServing(poolPath, socket: socket)
        return client
    }

    /// Refuses a server that does not have the file now at `poolPath` open. A server
    /// keeps its socket while its pool file is removed (or renamed, or replaced by a new
    /// pool of the same name) under it; without this, commands meant for the file at the
    /// path would change the one the server holds. Servers that do not report their
    /// file (before `pool_device`) are taken at their word.
    private func confirmServing(_ poolPath: String, socket: String) throws(ControlError) {
        guard let device = hello.poolDevice, let inode = hello.poolInode else { return }
        let atPath = RawFile.identity(of: poolPath)
        if let atPath, atPath.device == device, atPath.inode == inode { return }
        let now = atPath == nil ? "nothing is at \(poolPath) now" : "\(poolPath) is now another file"
        throw ControlError(
            code: "other-pool",
            message: "the server at \(socket) (pid \(hello.pid)) serves the file that was at \(poolPath) when it started, and \(now) (removed, renamed or replaced while served); not sending it commands meant for \(poolPath); stop that server (pid \(hello.pid)) to use \(poolPath)")
    }

    /// Sends `command` and waits for its reply (as long as the operation takes).
    public func request(_ command: ControlCommand) throws(ControlError) -> ControlReply {
        try Self.exchange(command, on: connection, framer: &framer)
    }

    private static func exchange(_ command: ControlCommand, on connection: StreamConnection, framer: inout ControlLineFramer) throws(ControlError) -> ControlReply {
        try transfer { () throws(SystemError) in try connection.send(command.line) }
        while true {
            if let line = try framer.nextLine() { return try ControlReply(line: line, answering: command) }
            let bytes = try transfer { () throws(SystemError) in try connection.receive() }
            if bytes.isEmpty { throw ControlError(code: "io", message: "the server closed the control connection without replying") }
            framer.append(bytes)
        }
    }

    private static func transfer<T>(_ body: () throws(SystemError) -> T) throws(ControlError) -> T {
        do throws(SystemError) {
            return try body()
        } catch {
            throw ControlError(code: "io", message: "control socket: \(error)")
        }
    }
}

/// Runs a command on a pool wherever the pool is: through the control socket of the
/// server that has it open, or, when none is running, on the pool opened here (and
/// closed, committed, before returning). What the CLI does for every pool command.
public struct PoolCommandClient {
    public var poolPath: String
    /// `--control PATH`: ask the server there, and fail if none answers.
    public var controlPath: String?
    /// How long to keep trying while another process (not a server) holds the pool.
    public var waitSeconds: Double = 0

    public init(poolPath: String, controlPath: String? = nil, waitSeconds: Double = 0) {
        self.poolPath = poolPath
        self.controlPath = controlPath
        self.waitSeconds = waitSeconds
    }

    /// The reply, and whether a server gave it.
    public func run(_ command: ControlCommand) -> (reply: ControlReply, served: Bool) {
        // At most a day: a huge or infinite --wait must not overflow.
        let deadline = SystemInfo.monotonicNanoseconds() + UInt64(min(max(0, waitSeconds), 86_400) * 1e9)
        while true {
            do throws(ControlError) {
                if let client = try ControlClient.connectToServer(ofPool: poolPath, at: controlPath) {
                    do throws(ControlError) {
                        return (try client.request(command), true)
                    } catch {
                        return (.failure(error), true)
                    }
                }
            } catch {
                return (.failure(error), false)
            }
            do throws(PoolError) {
                let pool = try Pool.open(path: poolPath, readOnly: !command.modifiesPool)
                let reply = PoolCommands(pool: pool, served: nil).perform(command)
                do throws(PoolError) {
                    try pool.close()
                } catch {
                    return (.failure(ControlError(error)), false)
                }
                return (reply, false)
            } catch {
                if case .inUse = error {
                    if SystemInfo.monotonicNanoseconds() < deadline {
                        SystemInfo.sleep(milliseconds: 50)
                        continue
                    }
                    let socketPath = ControlEndpoint.defaultPath(forPool: poolPath)
                    return (.failure(ControlError(code: "busy", message: "\(error); no server control socket answers at \(socketPath) (pass --control PATH if the server was given one)")), false)
                }
                return (.failure(ControlError(error)), false)
            }
        }
    }
}
