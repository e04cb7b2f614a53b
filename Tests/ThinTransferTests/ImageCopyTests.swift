import Testing
import ThinPool
import ThinSystem
import ThinTransfer

final class MemorySource: ImageSource {
    let bytes: [UInt8]
    let maximumReadBytes: Int
    let holes: [Range<Int>]
    var reads = 0
    init(_ bytes: [UInt8], maximumReadBytes: Int, holes: [Range<Int>] = []) {
        self.bytes = bytes
        self.maximumReadBytes = maximumReadBytes
        self.holes = holes
    }
    var size: UInt64 { UInt64(bytes.count) }
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(TransferError) -> [Range<Int>] {
        reads += 1
        let start = Int(offset)
        buffer.copyBytes(from: bytes[start..<start + buffer.count])
        return holes.compactMap { hole in
            let lower = max(hole.lowerBound, start), upper = min(hole.upperBound, start + buffer.count)
            return lower < upper ? (lower - start)..<(upper - start) : nil
        }
    }
}

final class MemoryTarget: ImageTarget {
    var bytes: [UInt8]
    var written = 0
    var finishedSize: UInt64?
    let maximumWriteBytes: Int
    init(size: Int, maximumWriteBytes: Int) {
        bytes = [UInt8](repeating: 0, count: size)
        self.maximumWriteBytes = maximumWriteBytes
    }
    func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws(TransferError) {
        #expect(data.count <= maximumWriteBytes)
        bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
        written += data.count
    }
    func finish(size: UInt64) throws(TransferError) { finishedSize = size }
}

@Suite struct ImageCopyTests {
    /// An image of 4 KiB granules, each zero or not as `pattern` says, with odd bytes.
    func image(_ pattern: [Bool], tail: Int = 0) -> [UInt8] {
        var bytes: [UInt8] = []
        for (i, data) in pattern.enumerated() {
            var granule = [UInt8](repeating: 0, count: 4096)
            if data { granule[(i * 977) % 4096] = UInt8(i % 255 + 1) }
            bytes += granule
        }
        return bytes + [UInt8](repeating: 9, count: tail)
    }

    @Test func copiesExactlyAndWritesOnlyNonZeroGranules() throws {
        var generator = SystemRandomNumberGenerator()
        for maximum in [4096, 12288, 65536, 1 << 20] {
            let pattern = (0..<200).map { _ in Bool.random(using: &generator) }
            let bytes = image(pattern, tail: 100)
            let source = MemorySource(bytes, maximumReadBytes: maximum)
            let target = MemoryTarget(size: bytes.count, maximumWriteBytes: maximum)
            var progress: [UInt64] = []
            let statistics = try ImageCopy.copy(
                from: source, to: target, length: source.size, granularity: 4096, progress: { progress.append($0) })
            #expect(target.bytes == bytes)
            #expect(statistics.bytes == UInt64(bytes.count))
            #expect(statistics.bytesWritten == UInt64(pattern.filter { $0 }.count * 4096 + 100))
            #expect(target.written == Int(statistics.bytesWritten))
            #expect(target.finishedSize == UInt64(bytes.count))
            #expect(progress.last == UInt64(bytes.count) && progress == progress.sorted())
        }
    }

    @Test func holesTheSourceReportsAreNotWritten() throws {
        let bytes = [UInt8](repeating: 0, count: 64 << 10)
        let source = MemorySource(bytes, maximumReadBytes: 16 << 10, holes: [0..<(64 << 10)])
        let target = MemoryTarget(size: bytes.count, maximumWriteBytes: 1 << 20)
        let statistics = try ImageCopy.copy(from: source, to: target, length: source.size, granularity: 65536)
        #expect(statistics.bytesWritten == 0 && target.written == 0)
        #expect(source.reads == 4)
    }

    @Test func aSmallPeerLimitStillCopies() throws {
        // A limit below the zero-check granularity: the check gets finer instead of stalling.
        let bytes = image([true, false, true, true], tail: 0)
        let source = MemorySource(bytes, maximumReadBytes: 1000)
        let target = MemoryTarget(size: bytes.count, maximumWriteBytes: 1 << 20)
        _ = try ImageCopy.copy(from: source, to: target, length: source.size, granularity: 65536)
        #expect(target.bytes == bytes)
    }
}
