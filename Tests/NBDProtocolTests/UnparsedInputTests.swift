import NIOCore
import Testing

@testable import NBDServer

/// `UnparsedInput`'s copying policy: a kept partial message is copied out of the
/// channel's buffer once, and later passes neither recopy it nor drop a parsed front
/// smaller than what is left (either would copy the tail again on every pass, quadratic
/// in its length when parsing is held back or a client sends in small pieces).
@Suite struct UnparsedInputTests {
    private let allocator = ByteBufferAllocator()

    /// The address of the first unparsed byte: moves when the bytes are copied.
    private func front(_ input: UnparsedInput) -> UnsafeRawPointer? {
        input.bytes.withUnsafeReadableBytes { $0.baseAddress }
    }

    @Test func aKeptTailIsCopiedOnceAndNotAgainWhilePassesParseLittle() {
        var input = UnparsedInput()
        var read = ByteBuffer(repeating: 1, count: 1000)
        input.lastReadSize = read.readableBytes
        input.receive(&read)
        input.keepTail(allocator: allocator)
        // Copied out of the channel's buffer: a buffer of our own, with room for a read
        // as large as the last.
        let kept = front(input)
        #expect(input.bytes.readableBytes == 1000)
        #expect(input.bytes.capacity >= 2000)
        // Passes that parse nothing, each after a small read: appended, never recopied.
        for piece in 0..<200 {
            var small = ByteBuffer(repeating: UInt8(truncatingIfNeeded: piece), count: 4)
            input.lastReadSize = small.readableBytes
            input.receive(&small)
            input.keepTail(allocator: allocator)
            #expect(front(input) == kept, "pass \(piece) recopied the kept bytes")
        }
        #expect(input.bytes.readableBytes == 1800)
        // A pass that parses less than what is left keeps the front where it is.
        input.bytes.moveReaderIndex(forwardBy: 600)
        let afterParse = front(input)
        input.keepTail(allocator: allocator)
        #expect(front(input) == afterParse)
        #expect(input.bytes.readerIndex == 600)
        // Once the parsed front is at least as long as the rest, it is dropped.
        input.bytes.moveReaderIndex(forwardBy: 300)
        input.keepTail(allocator: allocator)
        #expect(input.bytes.readerIndex == 0)
        #expect(input.bytes.readableBytes == 900)
        #expect(input.bytes.getInteger(at: 0, as: UInt8.self) == 1)
        #expect(input.bytes.getInteger(at: 899, as: UInt8.self) == 199)
        // Parsed to its end: nothing is held.
        input.bytes.moveReaderIndex(forwardBy: 900)
        input.keepTail(allocator: allocator)
        #expect(input.bytes.readableBytes == 0)
        #expect(input.bytes.capacity == 0)
    }

    @Test func aReadParsedToItsEndIsLetGoAndTheNextIsTakenAsItIs() {
        var input = UnparsedInput()
        var read = ByteBuffer(repeating: 7, count: 512)
        let address = read.withUnsafeReadableBytes { $0.baseAddress }
        input.receive(&read)
        #expect(front(input) == address, "taken without a copy")
        input.bytes.moveReaderIndex(forwardBy: 512)
        input.keepTail(allocator: allocator)
        #expect(input.bytes.capacity == 0)
    }
}
