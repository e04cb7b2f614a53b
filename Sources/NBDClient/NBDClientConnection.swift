import NBDProtocol
import NBDTLS
import NIOCore
import ThinSystem

/// A blocking NBD client connection: one request at a time, for copying images
/// (`thinbd import` from an NBD URI, and import/export through a running server).
/// Not thread-safe; use one per thread.
public final class NBDClientConnection {
    public let export: NBDClientHandshake.Export
    /// Whether the connection runs over TLS.
    public let usesTLS: Bool
    private let connection: NBDClientTransport
    private var input = ByteBuffer()
    private var nextCookie: UInt64 = 1

    /// The largest request this connection sends: the server's maximum, at most 32 MiB.
    public var maximumRequestBytes: Int {
        // A server announcing less than 4 KiB (or nothing usable) gets 4 KiB requests:
        // it may refuse them, with an error, but a copy never stalls on empty requests.
        Int(min(max(export.maximumBlockSize ?? (32 << 20), 4096), 32 << 20))
    }

    /// Connects to `uri` and negotiates its export. `nbds://` and `nbds+unix://` URIs, or
    /// any URI with `tls` credentials, upgrade with STARTTLS first and never go on in
    /// plain text. Credentials come from `tls`, else from the URI's libnbd parameters
    /// (`tls-certificates=DIR`, `tls-psk-file=FILE`, `tls-username=NAME`). The server's
    /// certificate is checked against the CA, and against the host name for TCP
    /// connections by name.
    ///
    /// `timeout`: on plain-text connections, a send or receive that waits longer than this
    /// many seconds fails (the connection is then unusable).
    /// `wantsAllocation`: select `base:allocation`, for `zeroExtents` (when the server has it).
    public init(uri: String, tls: NBDTLSClientCredentials? = nil, timeout: Int? = nil, wantsAllocation: Bool = false) throws(NBDClientError) {
        let endpoint: NBDEndpoint
        do throws(NBDURIError) {
            endpoint = try NBDEndpoint(uri: uri)
        } catch {
            throw NBDClientError(error.description)
        }
        var credentials = tls
        if credentials == nil && endpoint.requiresTLS {
            do throws(NBDTLSError) {
                if let directory = endpoint.tlsCertificates {
                    credentials = try NBDTLSClientCredentials.load(.certificates(directory: directory))
                } else if let file = endpoint.tlsPSKFile {
                    credentials = try NBDTLSClientCredentials.load(.psk(file: file), username: endpoint.tlsUsername)
                }
            } catch {
                throw NBDClientError(error.description)
            }
            guard credentials != nil else {
                throw NBDClientError("\(uri) needs TLS credentials: --tls-certificates DIR or --tls-psk FILE (or tls-certificates=DIR in the URI)")
            }
        }
        usesTLS = credentials != nil
        if credentials != nil {
            connection = try ChannelTransport(endpoint.address)
        } else {
            do throws(SystemError) {
                connection = try SocketTransport(endpoint.address, timeout: timeout)
            } catch {
                throw NBDClientError("\(uri): \(error)")
            }
        }
        var handshake = NBDClientHandshake(exportName: endpoint.export, requireTLS: credentials != nil, wantsAllocation: wantsAllocation)
        var ready: NBDClientHandshake.Export?
        var buffered = ByteBuffer()
        do throws(NBDClientError) {
            while ready == nil {
                for action in try handshake.receive(&buffered) {
                    switch action {
                    case .send(let bytes): try Self.send(bytes, on: connection)
                    case .startTLS: try connection.startTLS(credentials!, hostName: endpoint.nameToVerify)
                    case .ready(let export): ready = export
                    }
                }
                if ready == nil { try Self.fill(&buffered, from: connection) }
            }
        } catch {
            // Leave politely, so the server does not log a broken handshake.
            var abort = ByteBuffer()
            abort.writeNBDOptionRequest(NBDOptionRequest(option: .abort))
            try? Self.send(abort, on: connection)
            throw error
        }
        export = ready!
        input = buffered
    }

    deinit {
        var out = ByteBuffer()
        out.writeNBDRequest(NBDRequest(header: NBDRequestHeader(command: .disconnect, cookie: 0, offset: 0, length: 0)))
        try? Self.send(out, on: connection)
        connection.close()
    }

    private static func send(_ bytes: ByteBuffer, on connection: NBDClientTransport) throws(NBDClientError) {
        let result = bytes.readableBytesView.withUnsafeBytes { raw in
            Result { () throws(NBDClientError) in try connection.send(raw) }
        }
        try result.get()
    }

    /// Receives what has arrived straight into `buffer`'s free space.
    private static func fill(_ buffer: inout ByteBuffer, from connection: NBDClientTransport) throws(NBDClientError) {
        var outcome: Result<Int, NBDClientError> = .success(0)
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 256 << 10) { raw in
            outcome = Result { () throws(NBDClientError) in try connection.receive(into: raw) }
            return (try? outcome.get()) ?? 0
        }
        guard try outcome.get() > 0 else { throw NBDClientError("the NBD server closed the connection") }
    }

    private func fill() throws(NBDClientError) {
        // Bytes already consumed are dropped, so the buffer holds about one reply.
        if input.readableBytes == 0 {
            input.clear()
        } else if input.readerIndex > 1 << 20 {
            input.discardReadBytes()
        }
        try Self.fill(&input, from: connection)
    }

    private func request(
        _ command: NBDCommand, at offset: UInt64, length: Int, flags: NBDCommandFlags = [], payload: UnsafeRawBufferPointer? = nil
    ) throws(NBDClientError) -> UInt64 {
        let cookie = nextCookie
        nextCookie += 1
        var out = ByteBuffer()
        out.reserveCapacity(NBDRequestHeader.size + (payload?.count ?? 0))
        out.writeNBDRequest(NBDRequest(
            header: NBDRequestHeader(flags: flags, command: command, cookie: cookie, offset: offset, length: UInt32(length))))
        if let payload { out.writeBytes(payload) }
        try Self.send(out, on: connection)
        return cookie
    }

    private func failure(_ error: NBDError, _ message: String, _ what: String) -> NBDClientError {
        NBDClientError("\(what) failed: \(message.isEmpty ? "\(error)" : message)")
    }

    /// The next reply's magic, once its first 4 bytes are there.
    private func peekMagic() throws(NBDClientError) -> UInt32 {
        while input.readableBytes < 4 { try fill() }
        return input.getInteger(at: input.readerIndex, as: UInt32.self)!
    }

    private func nextChunk() throws(NBDClientError) -> NBDStructuredChunk {
        while true {
            // A chunk longer than any request needs is refused before it is buffered.
            if input.readableBytes >= NBDStructuredChunk.headerSize,
                let length = input.getInteger(at: input.readerIndex + 16, as: UInt32.self),
                Int(length) > maximumRequestBytes + 65536
            {
                throw NBDClientError("the NBD server sent a \(length)-byte reply chunk, more than was asked for")
            }
            do throws(NBDDecodingError) {
                if let chunk = try input.readNBDStructuredChunk() { return chunk }
            } catch {
                throw NBDClientError("malformed reply from the NBD server: \(error)")
            }
            try fill()
        }
    }

    private func simpleReplyHeader() throws(NBDClientError) -> NBDSimpleReplyHeader {
        while true {
            do throws(NBDDecodingError) {
                if let header = try input.readNBDSimpleReplyHeader() { return header }
            } catch {
                throw NBDClientError("malformed reply from the NBD server: \(error)")
            }
            try fill()
        }
    }

    /// Waits for the reply to a request without data.
    private func awaitDone(_ cookie: UInt64, _ what: String) throws(NBDClientError) {
        var done = false
        while !done {
            if try peekMagic() == NBDMagic.simpleReply {
                let header = try simpleReplyHeader()
                guard header.cookie == cookie else { throw NBDClientError("reply for an unknown request") }
                if header.error != .none { throw failure(header.error, "", what) }
                return
            }
            let chunk = try nextChunk()
            guard chunk.cookie == cookie else { throw NBDClientError("reply for an unknown request") }
            switch chunk.payload {
            case .error(let error, let message), .errorOffset(let error, let message, _): throw failure(error, message, what)
            default: break
            }
            done = chunk.flags.contains(.done)
        }
    }

    /// Reads `buffer.count` bytes at `offset`; returns the parts the server said are
    /// holes (zero-filled in `buffer`), as ranges of `buffer`.
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(NBDClientError) -> [Range<Int>] {
        precondition(buffer.count <= maximumRequestBytes)
        let cookie = try request(.read, at: offset, length: buffer.count)
        let what = "NBD read of \(buffer.count) bytes at \(offset)"
        if try peekMagic() == NBDMagic.simpleReply {
            let header = try simpleReplyHeader()
            guard header.cookie == cookie else { throw NBDClientError("reply for an unknown request") }
            if header.error != .none { throw failure(header.error, "", what) }
            while input.readableBytes < buffer.count { try fill() }
            input.readWithUnsafeReadableBytes { raw in
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[0..<buffer.count]))
                return buffer.count
            }
            return []
        }
        var holes: [Range<Int>] = []
        var covered = 0
        var done = false
        /// The chunk's range within the read, if it lies inside it (no overflow on
        /// hostile offsets).
        func place(_ start: UInt64, _ length: Int) throws(NBDClientError) -> Range<Int> {
            guard start >= offset, start - offset <= UInt64(buffer.count), UInt64(length) <= UInt64(buffer.count) - (start - offset) else {
                throw NBDClientError("the NBD server sent data outside the read")
            }
            return Int(start - offset)..<Int(start - offset) + length
        }
        while !done {
            let chunk = try nextChunk()
            guard chunk.cookie == cookie else { throw NBDClientError("reply for an unknown request") }
            switch chunk.payload {
            case .offsetData(let start, let data):
                let range = try place(start, data.readableBytes)
                data.withUnsafeReadableBytes { raw in
                    UnsafeMutableRawBufferPointer(rebasing: buffer[range]).copyMemory(from: raw)
                }
                covered += range.count
            case .offsetHole(let start, let length):
                let range = try place(start, Int(length))
                UnsafeMutableRawBufferPointer(rebasing: buffer[range]).initializeMemory(as: UInt8.self, repeating: 0)
                holes.append(range)
                covered += range.count
            case .error(let error, let message), .errorOffset(let error, let message, _):
                throw failure(error, message, what)
            case .none, .blockStatus, .unknown:
                break
            }
            done = chunk.flags.contains(.done)
        }
        guard covered == buffer.count else { throw NBDClientError("the NBD server's reply to \(what) covered \(covered) bytes") }
        return holes.sorted { $0.lowerBound < $1.lowerBound }
    }

    /// The parts of `length` bytes at `offset` (at most 4 GiB less 64 KiB) that the server
    /// says read as zeros (`base:allocation`'s ZERO flag), in order; its answer may cover
    /// less than asked (`covered` says how much). Needs `allocationContextID`.
    public func zeroExtents(at offset: UInt64, length: UInt32) throws(NBDClientError) -> (zeros: [Range<UInt64>], covered: UInt64) {
        guard let context = export.allocationContextID else { throw NBDClientError("the NBD server has no base:allocation context") }
        let cookie = try request(.blockStatus, at: offset, length: Int(length))
        let what = "NBD block status of \(length) bytes at \(offset)"
        if try peekMagic() == NBDMagic.simpleReply {
            let header = try simpleReplyHeader()
            throw failure(header.error, "", what)
        }
        var zeros: [Range<UInt64>] = []
        var covered: UInt64 = 0
        var answered = false
        var done = false
        while !done {
            let chunk = try nextChunk()
            guard chunk.cookie == cookie else { throw NBDClientError("reply for an unknown request") }
            switch chunk.payload {
            case .blockStatus(let id, let descriptors) where id == context && !answered:
                answered = true
                for descriptor in descriptors {
                    // Never past the request: a hostile length changes nothing beyond it.
                    let start = offset + covered
                    let extent = min(UInt64(descriptor.length), UInt64(length) - covered)
                    guard extent > 0 else { break }
                    if NBDAllocationState(rawValue: descriptor.flags).contains(.zero) { zeros.append(start..<start + extent) }
                    covered += extent
                }
            case .error(let error, let message), .errorOffset(let error, let message, _):
                throw failure(error, message, what)
            default:
                break
            }
            done = chunk.flags.contains(.done)
        }
        guard covered > 0 else { throw NBDClientError("the NBD server's reply to \(what) described nothing") }
        return (zeros, covered)
    }

    public func write(at offset: UInt64, from data: UnsafeRawBufferPointer, fua: Bool = false) throws(NBDClientError) {
        precondition(data.count <= maximumRequestBytes)
        let cookie = try request(.write, at: offset, length: data.count, flags: fua ? .fua : [], payload: data)
        try awaitDone(cookie, "NBD write of \(data.count) bytes at \(offset)")
    }

    /// Makes `length` bytes at `offset` read as zeros; the server may unmap them unless
    /// `keepAllocated` (NO_HOLE). Needs an export that takes WRITE_ZEROES (else an
    /// error). Long ranges go as several requests.
    public func writeZeroes(at offset: UInt64, length: UInt64, keepAllocated: Bool = false) throws(NBDClientError) {
        guard export.flags.contains(.sendWriteZeroes) else { throw NBDClientError("the NBD export does not take WRITE_ZEROES") }
        var done: UInt64 = 0
        while done < length {
            // Whole 64 KiB units below 4 GiB, so that no piece splits a block needlessly.
            let piece = min(length - done, 0xFFFF_0000)
            let flags: NBDCommandFlags = keepAllocated ? .noHole : []
            try awaitDone(try request(.writeZeroes, at: offset + done, length: Int(piece), flags: flags), "NBD write-zeroes of \(piece) bytes at \(offset + done)")
            done += piece
        }
    }

    /// Makes every write so far durable (when the export takes FLUSH).
    public func flush() throws(NBDClientError) {
        guard export.flags.contains(.sendFlush) else { return }
        try awaitDone(try request(.flush, at: 0, length: 0), "NBD flush")
    }
}
