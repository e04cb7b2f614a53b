import NIOCore
import Testing

@testable import NBDServer

@Suite struct RecyclingAllocatorTests {
    /// Buffers from the recycling allocator grow, copy and keep their bytes as any other,
    /// across its size classes and past the largest (where realloc itself takes over),
    /// and a copy-on-write copy leaves the original untouched.
    @Test func buffersGrowAndCopyAsAnyOther() {
        let allocator = ByteBufferAllocator.recycling
        var buffer = allocator.buffer(capacity: 100)
        var expected: [UInt8] = []
        for round in 0..<300 {
            let chunk = [UInt8](repeating: UInt8(truncatingIfNeeded: round), count: 1000 + round)
            buffer.writeBytes(chunk)
            expected += chunk
        }
        #expect(buffer.readableBytes > 300_000, "grown through every class and past them")
        #expect(buffer.readBytes(length: buffer.readableBytes) == expected)

        var original = allocator.buffer(capacity: 4096)
        original.writeBytes([1, 2, 3])
        var copy = original
        copy.setBytes([9], at: 0)
        #expect(original.getBytes(at: 0, length: 3) == [1, 2, 3])
        #expect(copy.getBytes(at: 0, length: 3) == [9, 2, 3])
    }

    /// A read reply's buffer from it is aligned for O_DIRECT and has its header room.
    @Test func readBuffersAreAlignedWithHeadroom() {
        for length in [512, 4096, 65536, 1 << 20] {
            let (buffer, target, headroom) = NBDConnectionCore.makeReadBuffer(length: length, allocator: .recycling)
            #expect(Int(bitPattern: target.baseAddress) % 4096 == 0)
            #expect(target.count == length && buffer.readableBytes == length)
            #expect(headroom.count == NBDConnectionCore.readHeaderRoom)
        }
    }
}
