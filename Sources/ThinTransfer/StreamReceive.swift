import NBDClient
import NBDProtocol
import NBDTLS
import ThinControl
import ThinFormat
import ThinPool
import ThinSystem

/// What `thinbd receive --json` prints.
public struct ReceiveResult: Codable, Sendable, Equatable {
    public var volume: String
    /// The snapshot made, with the stream's image UUID.
    public var snapshot: VolumeSummary
    public var incremental: Bool
    /// Image bytes already there from an interrupted receive (`--resume`), else 0.
    public var resumedFrom: UInt64
    /// An earlier interrupted receive into the same name was discarded first.
    public var discardedEarlier: Bool
    public var dataBytes: UInt64
    public var zeroBytes: UInt64
    public var streamBytes: UInt64

    enum CodingKeys: String, CodingKey {
        case volume, snapshot, incremental
        case resumedFrom = "resumed_from", discardedEarlier = "discarded_earlier", dataBytes = "data_bytes"
        case zeroBytes = "zero_bytes", streamBytes = "stream_bytes"
    }
}

/// Where `receive` puts a stream: a served pool (control socket and NBD) or one it opens.
protocol StreamReceiveSide {
    func step(_ request: ReceiveRequest) throws(TransferError) -> ReceiveStepResult
    func openStaging(_ name: String) throws(TransferError) -> StagingWriter
}

/// Writes to the staging volume.
protocol StagingWriter {
    func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws(TransferError)
    /// `allocated`: keep the zeros mapped, as the sender's image does (else unmap them).
    func zero(at offset: UInt64, length: UInt64, allocated: Bool) throws(TransferError)
    /// Returns once everything written is in the pool (acknowledged by its server).
    func flush() throws(TransferError)
}

extension ImageTransfer {
    /// Reads a send stream from `input` and applies it (see `Pool.beginReceive`): a full
    /// stream makes volume `name` (default: the sender's volume name) and its snapshot,
    /// an incremental one applies onto `name`'s copy of the base. Atomic: until the END
    /// record has arrived and checked, nothing but the staging volume exists, and it is
    /// deleted when the stream fails. With `resume`, it is kept instead, with what was
    /// applied committed, and running the same receive again continues from there.
    public func receive(
        into name: String?, from input: ByteStream, resume: Bool, force: Bool, progress: Progress = { _, _ in }
    ) throws(TransferError) -> ReceiveResult {
        if let server = try server() {
            return try receive(into: name, from: input, resume: resume, force: force, side: ServedReceiveSide(server: server, tls: tls), progress: progress)
        }
        return try withOfflinePool(readOnly: false) { pool throws(TransferError) in
            try receive(into: name, from: input, resume: resume, force: force, side: OfflineReceiveSide(pool: pool), progress: progress)
        }
    }

    func receive(
        into requestedName: String?, from input: ByteStream, resume: Bool, force: Bool, side: StreamReceiveSide, progress: Progress
    ) throws(TransferError) -> ReceiveResult {
        var reader = SendStreamReader()
        let buffer = AlignedBuffer(count: 1 << 20)
        var atEnd = false
        /// The next record, reading more input as needed; nil once the input has ended.
        func nextRecord() throws(TransferError) -> SendStreamRecord? {
            while true {
                do throws(SendStreamError) {
                    if let record = try reader.next() { return record }
                    if atEnd {
                        try reader.finish()
                        return nil
                    }
                } catch {
                    throw TransferError(error.description)
                }
                let count: Int
                do throws(SystemError) {
                    count = try input.read(into: buffer.bytes)
                } catch {
                    throw TransferError("reading \(input.name): \(error)")
                }
                if count == 0 {
                    atEnd = true
                } else {
                    reader.append(UnsafeRawBufferPointer(rebasing: buffer.bytes[0..<count]))
                }
            }
        }
        guard case .begin(let header) = try nextRecord() else { throw TransferError("the stream does not start with BEGIN") }
        guard let (sentVolume, _) = VolumeName.splitSnapshot(header.imageName) else {
            throw TransferError("the stream's image name \(header.imageName) is not VOLUME@SNAPSHOT")
        }
        let name = requestedName ?? String(sentVolume)
        var request = ReceiveRequest(step: .begin, name: name, header: header, resume: resume, force: force)
        let plan = try side.step(request)
        request.staging = plan.staging
        var applied = plan.appliedUpTo
        var sinceCheckpoint: UInt64 = 0
        var writer: StagingWriter?
        do throws(TransferError) {
            let staging = try side.openStaging(plan.staging)
            writer = staging
            while let record = try nextRecord() {
                switch record {
                case .begin:
                    throw TransferError("a second BEGIN record")
                case .data(let offset, let bytes):
                    let end = offset + UInt64(bytes.count)
                    if end > plan.appliedUpTo {
                        let written = bytes.withUnsafeBytes { raw in Result { () throws(TransferError) in try staging.write(at: offset, from: raw) } }
                        try written.get()
                        sinceCheckpoint += UInt64(bytes.count)
                    }
                    applied = max(applied, end)
                case .zero(let offset, let length, let allocated):
                    if offset + length > plan.appliedUpTo { try staging.zero(at: offset, length: length, allocated: allocated) }
                    applied = max(applied, offset + length)
                case .end:
                    try staging.flush()
                    // Its connection goes before the staging volume does.
                    writer = nil
                    request.step = .finish
                    let finished = try side.step(request)
                    guard let snapshot = finished.snapshot else { throw TransferError("the server made no snapshot") }
                    progress(header.imageSize, header.imageSize)
                    let totals = Self.totals(of: record)
                    return ReceiveResult(
                        volume: name, snapshot: snapshot, incremental: header.isIncremental, resumedFrom: plan.appliedUpTo,
                        discardedEarlier: plan.discardedEarlier, dataBytes: totals.dataBytes, zeroBytes: totals.zeroBytes,
                        streamBytes: reader.consumed)
                }
                if resume && sinceCheckpoint >= 64 << 20 {
                    try staging.flush()
                    request.step = .progress
                    request.appliedUpTo = applied
                    _ = try side.step(request)
                    sinceCheckpoint = 0
                }
                progress(applied, header.imageSize)
            }
            throw TransferError("the stream ended without its END record")
        } catch {
            if resume {
                // What arrived whole is kept: committed with the progress mark.
                request.step = .progress
                request.appliedUpTo = applied
                let kept = (try? writer?.flush()) != nil && (try? side.step(request)) != nil
                throw TransferError(
                    "\(error.description); "
                        + (kept
                            ? "the first \(applied) bytes of the image are kept in \(plan.staging): run the same receive with --resume to continue"
                            : "what was received could not be kept"))
            }
            request.step = .abort
            _ = try? side.step(request)
            throw TransferError("\(error.description); nothing was received (run with --resume to keep partial progress)")
        }
    }

    private static func totals(of record: SendStreamRecord) -> SendStreamTotals {
        if case .end(let totals) = record { return totals }
        return SendStreamTotals()
    }
}

/// `receive` into a pool this process opened.
struct OfflineReceiveSide: StreamReceiveSide {
    let pool: Pool

    func step(_ request: ReceiveRequest) throws(TransferError) -> ReceiveStepResult {
        do throws(ControlError) {
            guard case .received(let result) = try PoolCommands(pool: pool, served: nil).run(.receive(request)) else {
                throw ControlError(code: "io", message: "receive returned another result")
            }
            return result
        } catch {
            throw TransferError(error.message)
        }
    }

    func openStaging(_ name: String) throws(TransferError) -> StagingWriter {
        OfflineStaging(pool: pool, id: try pooled { () throws(PoolError) in try pool.volumeID(name) })
    }
}

struct OfflineStaging: StagingWriter {
    let pool: Pool
    let id: UInt64

    func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws(TransferError) {
        try pooled { () throws(PoolError) in try pool.write(id, at: offset, from: data) }
    }

    func zero(at offset: UInt64, length: UInt64, allocated: Bool) throws(TransferError) {
        try pooled { () throws(PoolError) in try pool.writeZeroes(id, at: offset, count: length, mayUnmap: !allocated) }
    }

    func flush() throws(TransferError) {
        try pooled { () throws(PoolError) in try pool.flush() }
    }
}

/// `receive` through a server: the steps go over the control socket, the data over NBD.
struct ServedReceiveSide: StreamReceiveSide {
    let server: ServerHandle
    let tls: NBDTLSClientCredentials?

    func step(_ request: ReceiveRequest) throws(TransferError) -> ReceiveStepResult {
        try server.run(.receive(request), as: ReceiveStepResult.self)
    }

    func openStaging(_ name: String) throws(TransferError) -> StagingWriter {
        let uri = try server.uri(for: name)
        return ServedStaging(connection: try overNBD { () throws(NBDClientError) in try NBDClientConnection(uri: uri, tls: tls) })
    }
}

final class ServedStaging: StagingWriter {
    let connection: NBDClientConnection

    init(connection: NBDClientConnection) { self.connection = connection }

    func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws(TransferError) {
        var done = 0
        while done < data.count {
            let piece = min(data.count - done, connection.maximumRequestBytes)
            try overNBD { () throws(NBDClientError) in
                try connection.write(at: offset + UInt64(done), from: UnsafeRawBufferPointer(rebasing: data[done..<done + piece]))
            }
            done += piece
        }
    }

    func zero(at offset: UInt64, length: UInt64, allocated: Bool) throws(TransferError) {
        try overNBD { () throws(NBDClientError) in try connection.writeZeroes(at: offset, length: length, keepAllocated: allocated) }
    }

    func flush() throws(TransferError) {
        try overNBD { () throws(NBDClientError) in try connection.flush() }
    }
}
