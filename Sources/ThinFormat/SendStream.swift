/// The `thinbd send` stream (docs/send-stream.md): one image, or the changes from a base
/// image to it, as a sequence of self-checking records. Pure codec: no I/O.
///
/// Every record is a 40-byte header and a payload, integers little-endian:
/// ```
///  0  u32  magic "TBDR" (0x52444254)
///  4  u16  type (1 BEGIN, 2 DATA, 3 ZERO, 4 END)
///  6  u16  flags: ZERO bit 0, the zeros are allocated in the image (not a hole); others 0
///  8  u64  sequence: BEGIN is 0, each later record one more
/// 16  u64  image offset (DATA, ZERO; 0 otherwise)
/// 24  u64  image length (DATA: the payload's length; ZERO: the range; 0 otherwise)
/// 32  u32  payload length
/// 36  u32  CRC32C of bytes 0..<36, continued over the payload
/// ```
public enum SendStream {
    public static let recordMagic: UInt32 = 0x5244_4254
    public static let headerSize = 40
    public static let version: UInt32 = 1
    /// The largest DATA payload a writer sends, and a reader accepts.
    public static let maxDataPayload = 1 << 20
    /// The largest BEGIN payload (two names of at most 255 bytes and the fixed fields).
    public static let maxBeginPayload = 1024
    static let endPayloadSize = 24
    /// BEGIN flag bit: the stream holds changes from a base image.
    public static let incrementalFlag: UInt32 = 1
    /// ZERO record flag bit: the image keeps these zeros allocated (written as zeros
    /// without unmapping), so the receiver does too and the allocation maps match.
    public static let allocatedZeroFlag: UInt16 = 1

    public enum RecordType: UInt16, Sendable {
        case begin = 1, data = 2, zero = 3, end = 4
    }
}

/// What BEGIN says about the stream.
///
/// BEGIN payload:
/// ```
///  0  u32  format version (1)
///  4  u32  flags (bit 0: incremental; others 0)
///  8  u64  image size in bytes
/// 16  u32  block size of the sending pool (informative)
/// 20  u32  reserved, 0
/// 24  16   image UUID
/// 40  16   base UUID (zero for a full stream)
/// 56  u64  creation time of the image (Unix seconds)
/// 64  u16  image name length, then the name (VOLUME@SNAPSHOT, UTF-8)
///     u16  base name length, then the name (empty for a full stream)
/// ```
public struct SendStreamHeader: Equatable, Sendable {
    public var imageSize: UInt64
    public var blockSize: UInt32
    public var imageUUID: [UInt8]
    /// Nil for a full stream.
    public var baseUUID: [UInt8]?
    public var createdAt: UInt64
    public var imageName: String
    /// The base's name in the sending pool (empty for a full stream); for messages only.
    public var baseName: String

    public init(
        imageSize: UInt64, blockSize: UInt32, imageUUID: [UInt8], baseUUID: [UInt8]?, createdAt: UInt64, imageName: String,
        baseName: String = ""
    ) {
        precondition(imageUUID.count == 16 && (baseUUID?.count ?? 16) == 16, "a UUID is 16 bytes")
        self.imageSize = imageSize
        self.blockSize = blockSize
        self.imageUUID = imageUUID
        self.baseUUID = baseUUID
        self.createdAt = createdAt
        self.imageName = imageName
        self.baseName = baseName
    }

    public var isIncremental: Bool { baseUUID != nil }

    func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 64)
        bytes.withUnsafeMutableBytes { raw in
            raw.setLE32(0, SendStream.version)
            raw.setLE32(4, isIncremental ? SendStream.incrementalFlag : 0)
            raw.setLE64(8, imageSize)
            raw.setLE32(16, blockSize)
            raw.setLE64(56, createdAt)
        }
        bytes.replaceSubrange(24..<40, with: imageUUID)
        bytes.replaceSubrange(40..<56, with: baseUUID ?? VolumeRecord.noUUID)
        for name in [imageName, baseName] {
            let utf8 = Array(name.utf8.prefix(VolumeRecord.maxNameBytes))
            bytes += [UInt8(truncatingIfNeeded: utf8.count), UInt8(truncatingIfNeeded: utf8.count >> 8)] + utf8
        }
        return bytes
    }

    static func decode(_ payload: [UInt8]) throws(SendStreamError.Problem) -> SendStreamHeader {
        guard payload.count >= 68 else { throw .malformed("the BEGIN record is \(payload.count) bytes, too short") }
        let (version, flags, size, blockSize, created) = payload.withUnsafeBytes { raw in
            (raw.loadLE32(0), raw.loadLE32(4), raw.loadLE64(8), raw.loadLE32(16), raw.loadLE64(56))
        }
        guard version == SendStream.version else {
            throw .malformed("stream format version \(version); this thinbd reads version \(SendStream.version)")
        }
        guard flags & ~SendStream.incrementalFlag == 0 else { throw .malformed("unknown BEGIN flags \(flags)") }
        guard size > 0, size <= 1 << 60 else { throw .malformed("image size \(size) is outside 1 byte ... 1 EiB") }
        var position = 64
        func name() throws(SendStreamError.Problem) -> String {
            guard position + 2 <= payload.count else { throw .malformed("the BEGIN record ends inside a name") }
            let length = Int(payload[position]) | Int(payload[position + 1]) << 8
            position += 2
            guard length <= VolumeRecord.maxNameBytes, position + length <= payload.count,
                let text = String(validating: payload[position..<position + length], as: UTF8.self)
            else { throw .malformed("a name in the BEGIN record is too long or not UTF-8") }
            position += length
            return text
        }
        let imageName = try name()
        let baseName = try name()
        guard position == payload.count else { throw .malformed("\(payload.count - position) stray bytes after the BEGIN record's names") }
        let incremental = flags & SendStream.incrementalFlag != 0
        let base = Array(payload[40..<56])
        guard incremental == (base != VolumeRecord.noUUID) else {
            throw .malformed(incremental ? "an incremental stream without a base UUID" : "a full stream with a base UUID")
        }
        let image = Array(payload[24..<40])
        guard image != VolumeRecord.noUUID else { throw .malformed("the image has no UUID") }
        return SendStreamHeader(
            imageSize: size, blockSize: blockSize, imageUUID: image, baseUUID: incremental ? base : nil, createdAt: created,
            imageName: imageName, baseName: baseName)
    }
}

/// END's payload: what the stream held, so that a stream cut at a record boundary, or
/// missing records, is found.
public struct SendStreamTotals: Equatable, Sendable {
    /// DATA and ZERO records.
    public var records: UInt64 = 0
    public var dataBytes: UInt64 = 0
    public var zeroBytes: UInt64 = 0

    public init(records: UInt64 = 0, dataBytes: UInt64 = 0, zeroBytes: UInt64 = 0) {
        self.records = records
        self.dataBytes = dataBytes
        self.zeroBytes = zeroBytes
    }
}

/// One decoded record.
public enum SendStreamRecord: Equatable, Sendable {
    case begin(SendStreamHeader)
    /// `bytes` go at image offset `offset`.
    case data(offset: UInt64, bytes: [UInt8])
    /// The range reads as zeros: a hole in the image, or zeros it keeps `allocated`.
    case zero(offset: UInt64, length: UInt64, allocated: Bool)
    case end(SendStreamTotals)
}

/// Why a stream was refused, and where: the byte of the stream and the record.
public struct SendStreamError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Problem: Error, Equatable, Sendable {
        case notAStream
        case truncated
        case checksum
        case malformed(String)
    }

    public var problem: Problem
    /// Byte of the stream where the record that failed starts.
    public var streamOffset: UInt64
    /// Its sequence number (the number of records before it).
    public var record: UInt64

    public var description: String {
        switch problem {
        case .notAStream: "this is not a thinbd send stream (no record header at byte \(streamOffset))"
        case .truncated: "the stream ends early, inside or after record \(record) (at byte \(streamOffset)): it was cut off"
        case .checksum: "the stream is corrupt: record \(record) at byte \(streamOffset) fails its checksum"
        case .malformed(let why): "the stream is malformed at record \(record) (byte \(streamOffset)): \(why)"
        }
    }
}

/// Writes records. A value: it counts sequence numbers and totals, and returns bytes.
public struct SendStreamWriter: Sendable {
    private var sequence: UInt64 = 0
    public private(set) var totals = SendStreamTotals()
    /// Where the last DATA or ZERO record ended (records go in image order).
    private var imageEnd: UInt64 = 0

    public init() {}

    /// The BEGIN record (first).
    public mutating func begin(_ header: SendStreamHeader) -> [UInt8] {
        precondition(sequence == 0, "BEGIN comes first")
        let payload = header.encoded()
        return record(.begin, offset: 0, length: 0, payload: payload) + payload
    }

    /// The header of a DATA record for `payload` at `offset`; the payload follows it.
    public mutating func dataHeader(offset: UInt64, payload: UnsafeRawBufferPointer) -> [UInt8] {
        precondition(payload.count > 0 && payload.count <= SendStream.maxDataPayload && offset >= imageEnd)
        totals.records += 1
        totals.dataBytes += UInt64(payload.count)
        imageEnd = offset + UInt64(payload.count)
        return record(.data, offset: offset, length: UInt64(payload.count), payload: payload)
    }

    /// A ZERO record.
    public mutating func zero(offset: UInt64, length: UInt64, allocated: Bool = false) -> [UInt8] {
        precondition(length > 0 && offset >= imageEnd)
        totals.records += 1
        totals.zeroBytes += length
        imageEnd = offset + length
        return record(
            .zero, flags: allocated ? SendStream.allocatedZeroFlag : 0, offset: offset, length: length,
            payload: UnsafeRawBufferPointer(start: nil, count: 0))
    }

    /// The END record (last).
    public mutating func end() -> [UInt8] {
        var payload = [UInt8](repeating: 0, count: SendStream.endPayloadSize)
        payload.withUnsafeMutableBytes { raw in
            raw.setLE64(0, totals.records)
            raw.setLE64(8, totals.dataBytes)
            raw.setLE64(16, totals.zeroBytes)
        }
        return record(.end, offset: 0, length: 0, payload: payload) + payload
    }

    private mutating func record(_ type: SendStream.RecordType, offset: UInt64, length: UInt64, payload: [UInt8]) -> [UInt8] {
        payload.withUnsafeBytes { record(type, offset: offset, length: length, payload: $0) }
    }

    private mutating func record(
        _ type: SendStream.RecordType, flags: UInt16 = 0, offset: UInt64, length: UInt64, payload: UnsafeRawBufferPointer
    ) -> [UInt8] {
        var header = [UInt8](repeating: 0, count: SendStream.headerSize)
        header.withUnsafeMutableBytes { raw in
            raw.setLE32(0, SendStream.recordMagic)
            raw.setLE16(4, type.rawValue)
            raw.setLE16(6, flags)
            raw.setLE64(8, sequence)
            raw.setLE64(16, offset)
            raw.setLE64(24, length)
            raw.setLE32(32, UInt32(payload.count))
            let crc = CRC32C.checksum(payload, continuing: CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[0..<36])))
            raw.setLE32(36, crc)
        }
        sequence += 1
        return header
    }
}

/// Reads records from bytes fed in any pieces (one byte at a time works). A value:
/// `append` what arrived, take records with `next()` until it says it needs more, and
/// call `finish()` at the end of the input. Every field is checked before it is used:
/// record order, sequence numbers, ranges inside the image and in image order, payload
/// sizes (bounded before anything is buffered), checksums and the END totals.
public struct SendStreamReader: Sendable {
    private var pending: [UInt8] = []
    private var start = 0
    /// Stream bytes taken as whole records so far.
    public private(set) var consumed: UInt64 = 0
    private var sequence: UInt64 = 0
    public private(set) var header: SendStreamHeader?
    private var totals = SendStreamTotals()
    private var imageEnd: UInt64 = 0
    public private(set) var isEnded = false

    public init() {}

    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        if start > 0 && start >= pending.count / 2 {
            pending.removeFirst(start)
            start = 0
        }
        pending.append(contentsOf: bytes)
    }

    public mutating func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0) }
    }

    /// The next whole record, or nil when more bytes are needed.
    public mutating func next() throws(SendStreamError) -> SendStreamRecord? {
        let available = pending.count - start
        guard available > 0 else { return nil }
        if isEnded { throw failure(.malformed("\(available) bytes follow the END record")) }
        // A stream that does not start with a record header is refused at once.
        let magicBytes = min(available, 4)
        let expected: [UInt8] = [0x54, 0x42, 0x44, 0x52]
        guard Array(pending[start..<start + magicBytes]) == Array(expected[0..<magicBytes]) else {
            throw failure(sequence == 0 ? .notAStream : .malformed("no record header here"))
        }
        guard available >= SendStream.headerSize else { return nil }
        let fields = pending.withUnsafeBytes { raw in
            let base = UnsafeRawBufferPointer(rebasing: raw[start..<start + SendStream.headerSize])
            return (
                type: base.loadLE16(4), flags: base.loadLE16(6), sequence: base.loadLE64(8), offset: base.loadLE64(16),
                length: base.loadLE64(24), payload: Int(base.loadLE32(32)), crc: base.loadLE32(36)
            )
        }
        guard let type = SendStream.RecordType(rawValue: fields.type) else { throw failure(.malformed("unknown record type \(fields.type)")) }
        let knownFlags = type == .zero ? SendStream.allocatedZeroFlag : 0
        guard fields.flags & ~knownFlags == 0 else { throw failure(.malformed("unknown flags \(fields.flags) on a \(type) record")) }
        guard fields.sequence == sequence else {
            throw failure(.malformed("record number \(fields.sequence) where \(sequence) was due (records are missing or repeated)"))
        }
        let limit: Int
        switch type {
        case .begin: limit = SendStream.maxBeginPayload
        case .data: limit = SendStream.maxDataPayload
        case .zero: limit = 0
        case .end: limit = SendStream.endPayloadSize
        }
        guard fields.payload <= limit else { throw failure(.malformed("a \(type) record with \(fields.payload) payload bytes (at most \(limit))")) }
        guard available >= SendStream.headerSize + fields.payload else { return nil }
        let payloadRange = start + SendStream.headerSize..<start + SendStream.headerSize + fields.payload
        let crc = pending.withUnsafeBytes { raw in
            CRC32C.checksum(
                UnsafeRawBufferPointer(rebasing: raw[payloadRange]),
                continuing: CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[start..<start + 36])))
        }
        guard crc == fields.crc else { throw failure(.checksum) }
        let record = try decode(type, fields.flags, fields.offset, fields.length, Array(pending[payloadRange]))
        start = payloadRange.upperBound
        consumed += UInt64(SendStream.headerSize + fields.payload)
        sequence += 1
        return record
    }

    /// Called at the end of the input: a stream without its END record was cut off.
    public func finish() throws(SendStreamError) {
        guard isEnded, pending.count == start else { throw failure(.truncated) }
    }

    private mutating func decode(_ type: SendStream.RecordType, _ flags: UInt16, _ offset: UInt64, _ length: UInt64, _ payload: [UInt8]) throws(SendStreamError) -> SendStreamRecord {
        if type != .begin && header == nil { throw failure(.malformed("the stream does not start with BEGIN")) }
        switch type {
        case .begin:
            guard header == nil else { throw failure(.malformed("a second BEGIN record")) }
            guard offset == 0, length == 0 else { throw failure(.malformed("BEGIN with an image range")) }
            do throws(SendStreamError.Problem) {
                let decoded = try SendStreamHeader.decode(payload)
                header = decoded
                return .begin(decoded)
            } catch {
                throw failure(error)
            }
        case .data, .zero:
            let size = header?.imageSize ?? 0
            if type == .data && length != UInt64(payload.count) { throw failure(.malformed("DATA length \(length) with \(payload.count) payload bytes")) }
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard length > 0, !overflow, end <= size else {
                throw failure(.malformed("range \(offset)+\(length) is empty or outside the \(size)-byte image"))
            }
            guard offset >= imageEnd else { throw failure(.malformed("range at \(offset) overlaps or precedes the one before (ending at \(imageEnd))")) }
            imageEnd = end
            totals.records += 1
            if type == .data {
                totals.dataBytes += length
                return .data(offset: offset, bytes: payload)
            }
            totals.zeroBytes += length
            return .zero(offset: offset, length: length, allocated: flags & SendStream.allocatedZeroFlag != 0)
        case .end:
            guard offset == 0, length == 0, payload.count == SendStream.endPayloadSize else { throw failure(.malformed("a malformed END record")) }
            var stated = SendStreamTotals()
            payload.withUnsafeBytes { raw in
                stated.records = raw.loadLE64(0)
                stated.dataBytes = raw.loadLE64(8)
                stated.zeroBytes = raw.loadLE64(16)
            }
            guard stated == totals else {
                throw failure(.malformed("END counts \(stated.records) records and \(stated.dataBytes) data bytes; \(totals.records) and \(totals.dataBytes) arrived"))
            }
            isEnded = true
            return .end(stated)
        }
    }

    private func failure(_ problem: SendStreamError.Problem) -> SendStreamError {
        SendStreamError(problem: problem, streamOffset: consumed, record: sequence)
    }
}

extension UnsafeRawBufferPointer {
    fileprivate func loadLE16(_ offset: Int) -> UInt16 { UInt16(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt16.self)) }
    fileprivate func loadLE32(_ offset: Int) -> UInt32 { UInt32(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    fileprivate func loadLE64(_ offset: Int) -> UInt64 { UInt64(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
}
