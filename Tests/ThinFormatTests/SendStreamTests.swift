import Testing

@testable import ThinFormat

@Suite struct SendStreamTests {
    let header = SendStreamHeader(
        imageSize: 1 << 30, blockSize: 65536, imageUUID: Array(1...16), baseUUID: Array(101...116), createdAt: 1_700_000_000,
        imageName: "vm@tue", baseName: "vm@mon")

    /// A stream of BEGIN, three DATA and two ZERO records, and END.
    func sample() -> (bytes: [UInt8], records: [SendStreamRecord]) {
        var writer = SendStreamWriter()
        var bytes = writer.begin(header)
        var records: [SendStreamRecord] = [.begin(header)]
        let pieces: [(UInt64, [UInt8]?, UInt64)] = [
            (0, [UInt8](repeating: 7, count: 4096), 4096), (65536, nil, 131072), (1 << 20, Array(0..<255), 255),
            (2 << 20, nil, 1 << 20), ((3 << 20) + 7, nil, 4096), ((1 << 30) - 512, [UInt8](repeating: 1, count: 512), 512),
        ]
        for (offset, data, length) in pieces {
            if let data {
                bytes += data.withUnsafeBytes { writer.dataHeader(offset: offset, payload: $0) } + data
                records.append(.data(offset: offset, bytes: data))
            } else {
                let allocated = offset % 2 == 1
                bytes += writer.zero(offset: offset, length: length, allocated: allocated)
                records.append(.zero(offset: offset, length: length, allocated: allocated))
            }
        }
        bytes += writer.end()
        records.append(.end(writer.totals))
        return (bytes, records)
    }

    func read(_ bytes: [UInt8], piece: Int) throws(SendStreamError) -> [SendStreamRecord] {
        var reader = SendStreamReader()
        var records: [SendStreamRecord] = []
        var position = 0
        while position < bytes.count {
            reader.append(Array(bytes[position..<min(position + piece, bytes.count)]))
            position += piece
            while let record = try reader.next() { records.append(record) }
        }
        try reader.finish()
        return records
    }

    @Test func roundTripsWholeAndOneByteAtATime() throws {
        let (bytes, records) = sample()
        for piece in [bytes.count, 1, 7, 40, 4096] {
            #expect(try read(bytes, piece: piece) == records, "pieces of \(piece)")
        }
        let totals = SendStreamTotals(records: 6, dataBytes: 4096 + 255 + 512, zeroBytes: 131072 + (1 << 20) + 4096)
        #expect(records.last == .end(totals))
        var full = header
        full.baseUUID = nil
        full.baseName = ""
        var writer = SendStreamWriter()
        var stream = writer.begin(full)
        stream += writer.end()
        #expect(try read(stream, piece: 3) == [.begin(full), .end(SendStreamTotals())])
    }

    func problem(_ bytes: [UInt8]) -> SendStreamError? {
        do {
            _ = try read(bytes, piece: 1000)
            return nil
        } catch {
            return error
        }
    }

    @Test func truncationAnywhereIsFound() {
        let (bytes, _) = sample()
        for cut in [0, 1, 39, 40, 100, bytes.count / 2, bytes.count - 24, bytes.count - 1] {
            let error = problem(Array(bytes[0..<cut]))
            #expect(error?.problem == .truncated, "cut at \(cut): \(String(describing: error))")
        }
    }

    @Test func everyFlippedByteIsFound() {
        let (bytes, _) = sample()
        // Every byte of every header, and bytes spread through the payloads.
        for index in stride(from: 0, to: bytes.count, by: 1 + bytes.count / 3000) {
            var damaged = bytes
            damaged[index] ^= 0x20
            let error = problem(damaged)
            #expect(error != nil, "a flipped byte at \(index) went unnoticed")
            #expect(error?.description.contains("byte") == true)
        }
    }

    @Test func aStreamThatIsNotAStreamIsSaidToBeSo() {
        let error = problem(Array("QFI\u{fb}qcow2 header and more bytes".utf8))
        #expect(error?.problem == .notAStream)
        #expect(error?.description.contains("not a thinbd send stream") == true)
        // Even two bytes of something else are refused at once, without waiting for more.
        var reader = SendStreamReader()
        reader.append([0x7F, 0x45])
        #expect(throws: SendStreamError.self) { try reader.next() }
    }

    /// A record with any fields and a correct checksum.
    func record(_ type: UInt16, _ sequence: UInt64, offset: UInt64 = 0, length: UInt64 = 0, payload: [UInt8] = [], flags: UInt16 = 0) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: SendStream.headerSize)
        bytes.withUnsafeMutableBytes { raw in
            raw.setLE32(0, SendStream.recordMagic)
            raw.setLE16(4, type)
            raw.setLE16(6, flags)
            raw.setLE64(8, sequence)
            raw.setLE64(16, offset)
            raw.setLE64(24, length)
            raw.setLE32(32, UInt32(payload.count))
        }
        let crc = payload.withUnsafeBytes { CRC32C.checksum($0, continuing: CRC32C.checksum(Array(bytes[0..<36]))) }
        bytes.withUnsafeMutableBytes { $0.setLE32(36, crc) }
        return bytes + payload
    }

    /// Well-formed records with valid checksums that still break the rules.
    @Test func recordsOutOfOrderOrOutsideTheImageAreRefused() {
        var writer = SendStreamWriter()
        let begin = writer.begin(header)
        let zero: UInt16 = 3
        let cases: [([UInt8], String)] = [
            (begin + record(zero, 1, offset: (1 << 30) - 4096, length: 8192), "outside"),
            (begin + record(zero, 1, offset: 1 << 62, length: UInt64.max - 10), "outside"),
            (begin + record(zero, 1, offset: 0, length: 0), "empty"),
            (begin + record(zero, 1, offset: 0, length: 4096) + record(zero, 1, offset: 8192, length: 4096), "missing or repeated"),
            (begin + record(zero, 1, offset: 8192, length: 4096) + record(zero, 2, offset: 0, length: 4096), "precedes"),
            (begin + record(1, 1, payload: header.encoded()), "second BEGIN"),
            (record(zero, 0, offset: 0, length: 4096), "does not start with BEGIN"),
            (begin + record(2, 1, offset: 0, length: 10, payload: [1, 2, 3]), "DATA length"),
            (begin + record(2, 1, offset: 0, length: 2 << 20, payload: []) , "payload bytes"),
            (begin + record(9, 1), "unknown record type"),
            (begin + record(zero, 1, offset: 0, length: 4096, flags: 2), "unknown flags"),
            (begin + record(2, 1, offset: 0, length: 1, payload: [1], flags: 1), "unknown flags"),
            (begin + record(4, 1, payload: [UInt8](repeating: 0, count: 24).enumerated().map { $0.offset == 0 ? 1 : $0.element }), "END counts"),
            (sample().bytes + [0x54], "follow the END"),
        ]
        for (bytes, expected) in cases {
            let error = problem(bytes)
            #expect(error?.description.contains(expected) == true, "expected '\(expected)': \(String(describing: error))")
        }
        // A DATA record claiming a payload over the limit is refused from its header,
        // before any of the payload is buffered.
        var reader = SendStreamReader()
        reader.append(begin)
        reader.append(Array(record(2, 1, offset: 0, length: 64 << 20).prefix(32)) + [0, 0, 0, 4, 0, 0, 0, 0])
        #expect(throws: SendStreamError.self) { while try reader.next() != nil {} }
    }

    @Test func headersWithBadFieldsAreRefused() {
        var unversioned = header.encoded()
        unversioned[0] = 9
        var noUUID = header
        noUUID.imageUUID = VolumeRecord.noUUID
        for (payload, expected) in [(unversioned, "version 9"), (noUUID.encoded(), "no UUID"), (Array(header.encoded().prefix(70)), "name")] {
            #expect(throws: SendStreamError.Problem.self) { try SendStreamHeader.decode(payload) }
            do {
                _ = try SendStreamHeader.decode(payload)
            } catch {
                if case .malformed(let why) = error { #expect(why.contains(expected), "\(why)") }
            }
        }
    }
}
