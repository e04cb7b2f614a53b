import NBDTLS
import ThinControl
import ThinFormat
import ThinPool
import ThinSystem

/// What `thinbd send --json` prints.
public struct SendResult: Codable, Sendable, Equatable {
    public var image: String
    public var imageUUID: String
    /// Empty for a full stream.
    public var base: String
    @Nullable public var baseUUID: String?
    public var size: UInt64
    /// DATA and ZERO records.
    public var records: UInt64
    public var dataBytes: UInt64
    public var zeroBytes: UInt64
    /// Bytes written to the stream, headers included.
    public var streamBytes: UInt64

    enum CodingKeys: String, CodingKey {
        case image, base, size, records
        case imageUUID = "image_uuid", baseUUID = "base_uuid", dataBytes = "data_bytes", zeroBytes = "zero_bytes"
        case streamBytes = "stream_bytes"
    }
}

/// Where `send` finds the images: a served pool (control socket and NBD) or one it opens.
protocol StreamSendSide {
    var blockSize: UInt64 { get }
    func describe(_ name: String) throws(TransferError) -> VolumeSummary
    /// Byte extents of `image` that may differ from `base` (nil: everything mapped) among
    /// the blocks that meet `window`.
    func changes(from base: String?, to image: String, in window: Range<UInt64>) throws(TransferError) -> [Range<UInt64>]
    func reader(for image: String) throws(TransferError) -> ImageSource
}

/// Buffers records and writes them to the stream in large pieces.
final class StreamOutput {
    let stream: ByteStream
    private var buffer: [UInt8] = []
    private(set) var written: UInt64 = 0

    init(_ stream: ByteStream) {
        self.stream = stream
        buffer.reserveCapacity(2 << 20)
    }

    func append(_ bytes: [UInt8]) throws(TransferError) {
        buffer += bytes
        if buffer.count >= 1 << 20 { try drain() }
    }

    func append(_ bytes: UnsafeRawBufferPointer) throws(TransferError) {
        buffer.append(contentsOf: bytes)
        if buffer.count >= 1 << 20 { try drain() }
    }

    func drain() throws(TransferError) {
        guard !buffer.isEmpty else { return }
        let stream = self.stream
        let result = buffer.withUnsafeBytes { raw in Result { () throws(SystemError) in try stream.write(raw) } }
        if case .failure(let error) = result {
            throw TransferError(
                error.code == .brokenPipe ? "the reader of \(stream.name) went away after \(written) bytes" : "writing \(stream.name): \(error)")
        }
        written += UInt64(buffer.count)
        buffer.removeAll(keepingCapacity: true)
    }
}

extension ImageTransfer {
    /// Writes snapshot `image` (VOLUME@SNAPSHOT) as a send stream to `output`: all of it,
    /// or with `base`, only what differs from that snapshot, found by the walk of
    /// `thinbd diff` (cost follows the change). Zero runs and trimmed ranges become ZERO
    /// records. Reads through the server when one has the pool. Nothing in the pool changes.
    public func send(image: String, base: String?, to output: ByteStream, progress: Progress = { _, _ in }) throws(TransferError) -> SendResult {
        if let server = try server() {
            return try send(image: image, base: base, side: try ServedSendSide(server: server, tls: tls), output: output, progress: progress)
        }
        return try withOfflinePool(readOnly: true) { pool throws(TransferError) in
            try send(image: image, base: base, side: OfflineSendSide(pool: pool), output: output, progress: progress)
        }
    }

    func send(image: String, base: String?, side: StreamSendSide, output stream: ByteStream, progress: Progress) throws(TransferError) -> SendResult {
        let target = try side.describe(image)
        guard target.kind == "snapshot" else {
            throw TransferError("\(image) is a \(target.kind); send takes a snapshot (VOLUME@SNAPSHOT), which cannot change while it is read")
        }
        guard let imageUUID = target.uuid.flatMap(parseUUID) else { throw TransferError("\(image) has no UUID yet: open the pool read-write once") }
        var baseUUID: [UInt8]?
        if let base {
            let from = try side.describe(base)
            guard from.kind == "snapshot" else { throw TransferError("the base \(base) is a \(from.kind); an incremental stream starts from a snapshot") }
            guard let uuid = from.uuid.flatMap(parseUUID) else { throw TransferError("\(base) has no UUID yet: open the pool read-write once") }
            guard uuid != imageUUID else { throw TransferError("\(base) and \(image) are the same image") }
            baseUUID = uuid
        }
        let header = SendStreamHeader(
            imageSize: target.size, blockSize: UInt32(clamping: side.blockSize), imageUUID: imageUUID, baseUUID: baseUUID,
            createdAt: target.created, imageName: image, baseName: base ?? "")
        var writer = SendStreamWriter()
        let output = StreamOutput(stream)
        try output.append(writer.begin(header))
        let source = try side.reader(for: image)
        let chunk = min(SendStream.maxDataPayload, max(source.maximumReadBytes, 4096))
        let buffer = AlignedBuffer(count: chunk)
        var pendingZero: (range: Range<UInt64>, allocated: Bool)?
        func flushZero() throws(TransferError) {
            if let zero = pendingZero {
                try output.append(writer.zero(offset: zero.range.lowerBound, length: UInt64(zero.range.count), allocated: zero.allocated))
            }
            pendingZero = nil
        }
        let size = target.size
        let window: UInt64 = 4 << 30
        var position: UInt64 = 0
        for windowStart in stride(from: UInt64(0), to: size, by: Int(window)) {
            let windowEnd = min(size, windowStart + window)
            for extent in try side.changes(from: base, to: image, in: windowStart..<windowEnd) {
                // Whole blocks meet the window: each byte is sent once, in order.
                var offset = max(extent.lowerBound, position)
                let end = min(extent.upperBound, windowEnd)
                while offset < end {
                    let count = Int(min(UInt64(chunk), end - offset))
                    let piece = UnsafeMutableRawBufferPointer(rebasing: buffer.bytes[0..<count])
                    let holes = try source.read(at: offset, into: piece)
                    var granule = 0
                    while granule < count {
                        // Runs of 4 KiB granules of one kind (the ends may be shorter).
                        let kind = Self.kind(piece, granule, holes)
                        var runEnd = min(granule + 4096, count)
                        while runEnd < count && Self.kind(piece, runEnd, holes) == kind { runEnd = min(runEnd + 4096, count) }
                        let start = offset + UInt64(granule)
                        let stop = offset + UInt64(runEnd)
                        if kind == .data {
                            try flushZero()
                            let data = UnsafeRawBufferPointer(rebasing: piece[granule..<runEnd])
                            try output.append(writer.dataHeader(offset: start, payload: data))
                            try output.append(data)
                        } else if let pending = pendingZero, pending.range.upperBound == start, pending.allocated == (kind == .zeros) {
                            pendingZero = (pending.range.lowerBound..<stop, pending.allocated)
                        } else {
                            try flushZero()
                            pendingZero = (start..<stop, kind == .zeros)
                        }
                        granule = runEnd
                    }
                    offset += UInt64(count)
                    position = offset
                    progress(offset, size)
                }
            }
        }
        try flushZero()
        try output.append(writer.end())
        try output.drain()
        do throws(SystemError) {
            try stream.sync()
        } catch {
            throw TransferError("finishing \(stream.name): \(error)")
        }
        progress(size, size)
        let totals = writer.totals
        return SendResult(
            image: image, imageUUID: formatUUID(imageUUID), base: base ?? "", baseUUID: baseUUID.map(formatUUID), size: size,
            records: totals.records, dataBytes: totals.dataBytes, zeroBytes: totals.zeroBytes, streamBytes: output.written)
    }

    enum GranuleKind { case data, hole, zeros }

    /// What the 4 KiB granule at `index` (shorter at the end) holds: data, a hole the
    /// source reported, or zeros it keeps allocated.
    private static func kind(_ piece: UnsafeMutableRawBufferPointer, _ index: Int, _ holes: [Range<Int>]) -> GranuleKind {
        let end = min(index + 4096, piece.count)
        if holes.contains(where: { $0.lowerBound <= index && end <= $0.upperBound }) { return .hole }
        return ImageCopy.isAllZero(UnsafeRawBufferPointer(rebasing: piece[index..<end])) ? .zeros : .data
    }
}

/// `send` on a pool this process opened (read-only).
struct OfflineSendSide: StreamSendSide {
    let pool: Pool
    var blockSize: UInt64 { pool.blockSize }

    func describe(_ name: String) throws(TransferError) -> VolumeSummary {
        VolumeSummary(try pooled { () throws(PoolError) in try pool.volumeInfo(name) }, connections: 0)
    }

    func changes(from base: String?, to image: String, in window: Range<UInt64>) throws(TransferError) -> [Range<UInt64>] {
        try pooled { () throws(PoolError) in try pool.differences(from: base, to: image, in: window).extents }
    }

    func reader(for image: String) throws(TransferError) -> ImageSource { try PoolVolumeSource(pool: pool, name: image) }
}

/// `send` through a server: the walk runs there (control `diff`), the data comes over NBD.
struct ServedSendSide: StreamSendSide {
    let server: ServerHandle
    let tls: NBDTLSClientCredentials?
    let blockSize: UInt64

    init(server: ServerHandle, tls: NBDTLSClientCredentials?) throws(TransferError) {
        self.server = server
        self.tls = tls
        blockSize = try server.run(.info, as: PoolInfoResult.self).blockSize
    }

    func describe(_ name: String) throws(TransferError) -> VolumeSummary {
        guard let found = try server.run(.list, as: [VolumeSummary].self).first(where: { $0.name == name }) else {
            throw TransferError("no such volume or snapshot: \(name)")
        }
        return found
    }

    func changes(from base: String?, to image: String, in window: Range<UInt64>) throws(TransferError) -> [Range<UInt64>] {
        try server.run(.diff(from: base ?? "", to: image, window: window), as: DiffResult.self).extents.map {
            $0.offset..<$0.offset + $0.length
        }
    }

    func reader(for image: String) throws(TransferError) -> ImageSource {
        try NBDSource(uri: try server.uri(for: image), tls: tls)
    }
}
