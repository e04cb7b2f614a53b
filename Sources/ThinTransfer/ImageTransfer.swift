import NBDProtocol
import NBDTLS
import ThinControl
import ThinPool
import ThinSystem

/// `thinbd import` and `thinbd export`: raw images in and out of a pool, wherever the
/// pool is. When a server has the pool, volumes are made and deleted through its control
/// socket and the data goes through its NBD socket; otherwise the pool is opened here.
public struct ImageTransfer {
    public var poolPath: String
    /// `--control PATH`: the server's control socket (and fail if none answers).
    public var controlPath: String?
    /// TLS credentials for the server's NBD socket when it requires TLS.
    public var tls: NBDTLSClientCredentials?

    public init(poolPath: String, controlPath: String? = nil, tls: NBDTLSClientCredentials? = nil) {
        self.poolPath = poolPath
        self.controlPath = controlPath
        self.tls = tls
    }

    /// Progress: bytes done and bytes in all.
    public typealias Progress = (UInt64, UInt64) -> Void

    /// Opens an image: an NBD URI (`nbd[s]://`, `nbd[s]+unix://`) or a file path.
    public static func openSource(_ spec: String, tls: NBDTLSClientCredentials? = nil) throws(TransferError) -> ImageSource {
        spec.contains("://") ? try NBDSource(uri: spec, tls: tls) : try RawFileSource(path: spec)
    }

    /// Imports `source` as new volume `name` of `size` bytes (default: the source's
    /// size). Zero runs are not written, so they stay unmapped. A failed import deletes
    /// the volume it made. Returns the volume (as the control protocol describes it) and
    /// what was copied.
    public func importImage(name: String, from source: ImageSource, size: UInt64?, progress: Progress = { _, _ in }) throws(TransferError) -> ImportResult {
        let volumeSize = size ?? source.size
        guard volumeSize > 0 else { throw TransferError("the source is empty; pass --size to make an empty volume") }
        guard source.size <= volumeSize else {
            throw TransferError("the source is \(source.size) bytes, more than --size \(volumeSize)")
        }
        if let server = try server() {
            let info = try server.run(.info, as: PoolInfoResult.self)
            _ = try server.run(.createVolume(name: name, size: volumeSize), as: VolumeCreateResult.self)
            do throws(TransferError) {
                let target = try NBDTarget(uri: try server.uri(for: name), tls: tls)
                let statistics = try ImageCopy.copy(
                    from: source, to: target, length: source.size, granularity: Int(max(info.blockSize, 4096)),
                    progress: { progress($0, source.size) })
                guard let created = try server.run(.list, as: [VolumeSummary].self).first(where: { $0.name == name }) else {
                    throw TransferError("volume \(name) went away during the import")
                }
                return ImportResult(volume: created, statistics)
            } catch {
                _ = try? server.run(.delete(name: name, force: true), as: DeleteResult.self)
                throw error
            }
        }
        return try withOfflinePool(readOnly: false) { pool throws(TransferError) in
            let volume = try pooled { () throws(PoolError) in try pool.createVolume(name, size: volumeSize) }
            do throws(TransferError) {
                let statistics = try ImageCopy.copy(
                    from: source, to: try PoolVolumeTarget(pool: pool, name: name), length: source.size,
                    granularity: Int(pool.blockSize), progress: { progress($0, source.size) })
                let final = try pooled { () throws(PoolError) in try pool.volumeInfo(volume.name) }
                return ImportResult(volume: VolumeSummary(final, connections: 0), statistics)
            } catch {
                try? pool.delete(name)
                throw error
            }
        }
    }

    /// Exports volume or snapshot `name` to a new sparse raw file at `destination`
    /// (replacing one only if `replacing`). The file is one point in time: a served
    /// volume is copied from a snapshot taken for the export and deleted after it.
    public func exportImage(name: String, to destination: String, replacing: Bool, progress: Progress = { _, _ in }) throws(TransferError) -> ExportResult {
        let statistics = try exportCopy(name: name, to: destination, replacing: replacing, progress: progress)
        return ExportResult(name: name, destination: destination, bytes: statistics.bytes, bytesWritten: statistics.bytesWritten)
    }

    private func exportCopy(name: String, to destination: String, replacing: Bool, progress: Progress) throws(TransferError) -> CopyStatistics {
        if let existing = RawFile.identity(of: destination) {
            guard existing.isRegularFile else { throw TransferError("\(destination) is not a regular file; export writes raw image files") }
            guard existing != RawFile.identity(of: poolPath) else { throw TransferError("\(destination) is the pool file itself") }
        }
        func copy(_ source: ImageSource) throws(TransferError) -> CopyStatistics {
            let target = try RawFileTarget(path: destination, replacing: replacing)
            return try ImageCopy.copy(from: source, to: target, length: source.size, granularity: 4096, progress: { progress($0, source.size) })
        }
        if let server = try server() {
            guard !name.contains("@") else { return try copy(try NBDSource(uri: try server.uri(for: name), tls: tls)) }
            // A served volume may be written while it is copied: copy a snapshot taken
            // for the purpose (one commit), so the file is one point in time, then drop it.
            let snapshot = "\(name)@thinbd-export-\(SystemInfo.processID)"
            _ = try server.run(.snapshot(name: snapshot, ifMissing: false), as: SnapshotCloneResult.self)
            defer { _ = try? server.run(.delete(name: snapshot, force: true), as: DeleteResult.self) }
            return try copy(try NBDSource(uri: try server.uri(for: snapshot), tls: tls))
        }
        return try withOfflinePool(readOnly: true) { pool throws(TransferError) in
            try copy(try PoolVolumeSource(pool: pool, name: name))
        }
    }

    // MARK: Finding the pool

    /// The running server that has the pool, if any.
    func server() throws(TransferError) -> ServerHandle? {
        let found: ControlClient?
        do throws(ControlError) {
            found = try ControlClient.connectToServer(ofPool: poolPath, at: controlPath)
        } catch {
            throw TransferError(error.message)
        }
        guard let client = found else { return nil }
        return ServerHandle(client: client, hello: client.hello)
    }

    func withOfflinePool<T>(readOnly: Bool, _ body: (Pool) throws(TransferError) -> T) throws(TransferError) -> T {
        let pool = try pooled { () throws(PoolError) in try Pool.open(path: poolPath, readOnly: readOnly) }
        pool.setOriginOpener(OriginConnector(tls: tls))
        do throws(TransferError) {
            let result = try body(pool)
            try pooled { () throws(PoolError) in try pool.close() }
            return result
        } catch {
            try? pool.close()
            throw error
        }
    }
}

func pooled<T>(_ body: () throws(PoolError) -> T) throws(TransferError) -> T {
    do throws(PoolError) {
        return try body()
    } catch {
        throw TransferError(error.description)
    }
}

/// What `thinbd import --json` prints.
public struct ImportResult: Codable, Sendable, Equatable {
    public var volume: VolumeSummary
    /// Bytes read from the source.
    public var bytesRead: UInt64
    /// Bytes written to the volume (zero runs are not).
    public var bytesWritten: UInt64

    enum CodingKeys: String, CodingKey {
        case volume, bytesRead = "bytes_read", bytesWritten = "bytes_written"
    }
}

extension ImportResult {
    init(volume: VolumeSummary, _ statistics: CopyStatistics) {
        self.init(volume: volume, bytesRead: statistics.bytes, bytesWritten: statistics.bytesWritten)
    }
}

/// What `thinbd export --json` prints.
public struct ExportResult: Codable, Sendable, Equatable {
    public var name: String
    public var destination: String
    /// The file's size.
    public var bytes: UInt64
    /// Bytes of data written (the rest are holes).
    public var bytesWritten: UInt64

    enum CodingKeys: String, CodingKey {
        case name, destination, bytes, bytesWritten = "bytes_written"
    }
}

/// A server reached through its control socket.
struct ServerHandle {
    let client: ControlClient
    let hello: HelloResult

    /// Runs `command` on the server; its result is of type `Value` (see `ControlCommand.decodeResult`).
    static func run<Value>(_ command: ControlCommand, on client: ControlClient, as _: Value.Type = Value.self) throws(TransferError) -> Value {
        do throws(ControlError) {
            return try client.request(command).result()
        } catch {
            throw TransferError(error.message)
        }
    }

    func run<Value>(_ command: ControlCommand, as type: Value.Type) throws(TransferError) -> Value {
        try Self.run(command, on: client, as: type)
    }

    /// An NBD URI for `export` on this server: its Unix socket if it has one, else TCP;
    /// `nbds` when the server requires TLS.
    func uri(for export: String) throws(TransferError) -> String {
        let endpoints = hello.uris.compactMap { try? NBDEndpoint(uri: $0) }
        for endpoint in endpoints {
            if case .unix(let path) = endpoint.address { return NBDURI.unix(socket: path, export: export, tls: endpoint.requiresTLS) }
        }
        for endpoint in endpoints {
            if case .tcp(let host, let port) = endpoint.address {
                return NBDURI.tcp(host: host, port: port, export: export, tls: endpoint.requiresTLS)
            }
        }
        throw TransferError("the server has the pool but no NBD socket to copy through (socket activation or --stdio); stop it, or serve with --socket")
    }
}
