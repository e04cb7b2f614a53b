import NBDClient
import NBDProtocol
import NBDTLS
import ThinFormat
import ThinPool
import ThinSystem

/// Reaches the origins of origin-backed volumes for a pool (`Pool.setOriginOpener`): NBD
/// exports (a small pool of connections, multi-conn when the server offers it, bounded
/// timeouts, reconnection with backoff) and raw files.
public final class OriginConnector: OriginOpener, @unchecked Sendable {
    let tls: NBDTLSClientCredentials?
    /// Seconds a connection attempt or a request may wait before it fails.
    let timeout: Int

    public init(tls: NBDTLSClientCredentials? = nil, timeout: Int = 20) {
        self.tls = tls
        self.timeout = timeout
    }

    public func open(_ origin: VolumeRecord.Origin) throws(PoolError) -> VolumeOrigin {
        switch origin.kind {
        case .file:
            let file = try FileOrigin(path: origin.locator)
            guard file.size == origin.size else {
                throw .originMismatch("\(origin.locator) is \(file.size) bytes; the clone was made from \(origin.size) bytes: it is another image")
            }
            return file
        case .nbd:
            return try NBDOrigin(origin, tls: tls, timeout: timeout)
        }
    }

    /// What `thinbd clone POOL ORIGIN NAME` records: an NBD URI (`nbd[s]://`,
    /// `nbd[s]+unix://`) or a raw file, reached now to learn its size and, for a thinbd
    /// server, the image's UUID. A relative path is made absolute (a server resolves it).
    public static func probe(_ spec: String, tls: NBDTLSClientCredentials? = nil, workingDirectory: String) throws(TransferError) -> VolumeRecord.Origin {
        if spec.contains("://") {
            let connection = try overNBD { () throws(NBDClientError) in try NBDClientConnection(uri: spec, tls: tls, timeout: 20) }
            return VolumeRecord.Origin(
                kind: .nbd, locator: spec, size: connection.export.size,
                uuid: NBDOrigin.imageUUID(in: connection.export.description) ?? VolumeRecord.noUUID)
        }
        let path = spec.hasPrefix("/") ? spec : workingDirectory + "/" + spec
        do throws(PoolError) {
            return VolumeRecord.Origin(kind: .file, locator: path, size: try FileOrigin(path: path).size)
        } catch {
            throw TransferError(error.description)
        }
    }
}

/// A raw file or block device as an origin.
final class FileOrigin: VolumeOrigin, @unchecked Sendable {
    let file: RawFile
    let size: UInt64

    init(path: String) throws(PoolError) {
        do throws(SystemError) {
            file = try RawFile(readingAt: path)
            size = try file.size()
        } catch {
            throw .originUnavailable("\(path): \(error.message)")
        }
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(PoolError) {
        do throws(SystemError) {
            let got = try file.read(at: offset, into: buffer)
            guard got == buffer.count else { throw SystemError(.io, "the file ended at \(offset + UInt64(got)) (it shrank)") }
        } catch {
            throw .originUnavailable("\(file.path): \(error)")
        }
    }
}

/// An NBD export as an origin: up to four connections when the server offers
/// multi-conn (else one), each used by one request at a time. A failed connection is
/// dropped; new ones are made on demand, but after a failure to connect, attempts wait
/// out a backoff (0.5 s doubling to 10 s) and fail at once meanwhile, so an origin that
/// is down costs its readers a quick EIO, not a pile-up of timeouts.
final class NBDOrigin: VolumeOrigin, @unchecked Sendable {
    let record: VolumeRecord.Origin
    let tls: NBDTLSClientCredentials?
    let timeout: Int

    struct Connections {
        var idle: [NBDClientConnection] = []
        var open = 0
        var limit = 1
        /// No new connection before this time (monotonic ns) after a failure.
        var retryAt: UInt64 = 0
        var backoff: UInt64 = 500_000_000
        var lastFailure: PoolError = .originUnavailable("not connected")
    }

    private let connections = WaitableValue(Connections())

    /// What the origin said reads as zeros, by window of `zeroWindow` bytes: the ranges
    /// (empty: none), or absent while not asked. An origin's image does not change (its
    /// identity is checked at every connection), so what it said stays true.
    private let zeroWindows = LockedValue([UInt64: [Range<UInt64>]]())
    static let zeroWindow: UInt64 = 1 << 30

    init(_ record: VolumeRecord.Origin, tls: NBDTLSClientCredentials?, timeout: Int) throws(PoolError) {
        self.record = record
        self.tls = tls
        self.timeout = timeout
        // The first connection checks the image; it starts the pool.
        let first = try connect()
        let limit = first.export.flags.contains(.canMultiConn) ? 4 : 1
        connections.update { state in
            state.idle = [first]
            state.open = 1
            state.limit = limit
        }
    }

    /// The image UUID a thinbd server puts in its export description (`..., image UUID`).
    static func imageUUID(in description: String?) -> [UInt8]? {
        guard let words = description?.split(separator: " "), words.count >= 2, words[words.count - 2] == "image" else { return nil }
        return parseUUID(String(words[words.count - 1]))
    }

    /// A new connection, checked against the recorded identity.
    private func connect() throws(PoolError) -> NBDClientConnection {
        let connection: NBDClientConnection
        do throws(NBDClientError) {
            connection = try NBDClientConnection(uri: record.locator, tls: tls, timeout: timeout, wantsAllocation: true)
        } catch {
            throw .originUnavailable("\(record.locator): \(error.description)")
        }
        guard connection.export.size == record.size else {
            throw .originMismatch(
                "\(record.locator) is \(connection.export.size) bytes; the clone was made from \(record.size) bytes: it is another image, and nothing was read from it")
        }
        if record.uuid != VolumeRecord.noUUID {
            let found = Self.imageUUID(in: connection.export.description)
            guard found == record.uuid else {
                throw .originMismatch(
                    "\(record.locator) is image \(found.map(formatUUID) ?? "without a UUID"); the clone was made from image \(formatUUID(record.uuid)): nothing was read from it")
            }
        }
        return connection
    }

    private enum Lease {
        case idle(NBDClientConnection)
        case connect
        case failFast(PoolError)
    }

    /// A connection to use: an idle one (`reused`), or a new one.
    private func lease() throws(PoolError) -> (connection: NBDClientConnection, reused: Bool) {
        let now = SystemInfo.monotonicNanoseconds()
        let lease = connections.wait { state -> Lease? in
            if let connection = state.idle.popLast() { return .idle(connection) }
            guard state.open < state.limit else { return nil }
            if now < state.retryAt { return .failFast(state.lastFailure) }
            state.open += 1
            return .connect
        }
        switch lease {
        case .idle(let connection):
            return (connection, true)
        case .failFast(let failure):
            throw failure
        case .connect:
            do throws(PoolError) {
                let connection = try connect()
                connections.update { state in state.backoff = 500_000_000 }
                return (connection, false)
            } catch {
                connections.update { state in
                    state.open -= 1
                    state.retryAt = SystemInfo.monotonicNanoseconds() + state.backoff
                    state.backoff = min(state.backoff * 2, 10_000_000_000)
                    state.lastFailure = error
                }
                throw error
            }
        }
    }

    /// Runs `body` on a leased connection and gives it back. A connection that fails may
    /// be half-way through a reply: it goes. An idle one may have died with a server that
    /// restarted since: then one new connection is tried.
    private func withConnection<T>(_ body: (NBDClientConnection) throws(NBDClientError) -> T) throws(PoolError) -> T {
        var (connection, reused) = try lease()
        while true {
            do throws(NBDClientError) {
                let result = try body(connection)
                connections.update { $0.idle.append(connection) }
                return result
            } catch {
                connections.update { $0.open -= 1 }
                guard reused else { throw .originUnavailable("\(record.locator): \(error.description)") }
                (connection, reused) = try lease()
            }
        }
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(PoolError) {
        try withConnection { connection throws(NBDClientError) in
            var done = 0
            while done < buffer.count {
                let piece = min(buffer.count - done, connection.maximumRequestBytes)
                _ = try connection.read(at: offset + UInt64(done), into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + piece]))
                done += piece
            }
        }
    }

    func zeroRanges(in range: Range<UInt64>) -> [Range<UInt64>] {
        var zeros: [Range<UInt64>] = []
        var window = range.lowerBound / Self.zeroWindow
        while window * Self.zeroWindow < range.upperBound {
            guard let known = zeroWindows.withLockedValue({ $0[window] }) ?? askZeros(window: window) else { return zeros }
            zeros += known.compactMap { zero in
                let clipped = zero.clamped(to: range)
                return clipped.isEmpty ? nil : clipped
            }
            window += 1
        }
        return zeros
    }

    /// Asks the origin which parts of window `window` read as zeros, and remembers the
    /// answer; nil when it cannot say (no `base:allocation`, or a failure: then the
    /// blocks are simply read).
    private func askZeros(window: UInt64) -> [Range<UInt64>]? {
        let start = window * Self.zeroWindow
        let end = min(start + Self.zeroWindow, record.size)
        let answer = try? withConnection { connection throws(NBDClientError) -> [Range<UInt64>]? in
            guard connection.export.allocationContextID != nil else { return nil }
            var zeros: [Range<UInt64>] = []
            var next = start
            while next < end {
                let (found, covered) = try connection.zeroExtents(at: next, length: UInt32(min(end - next, 0xFFFF_0000)))
                zeros += found
                next += covered
            }
            return zeros
        }
        guard let answer else { return nil }
        zeroWindows.withLockedValue { $0[window] = answer }
        return answer
    }
}
