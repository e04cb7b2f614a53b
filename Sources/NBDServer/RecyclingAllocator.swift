@_spi(CustomByteBufferAllocator) import NIOCore
import ThinSystem

extension ByteBufferAllocator {
    /// Byte buffers whose memory the event loops recycle (`RecycledMemory`; the server
    /// opts its loop threads in): for the buffers made and dropped per request (read
    /// replies, WRITE payloads), which plain malloc served from its slow path. Buffers
    /// from it behave as any other; only their memory comes and goes differently. Safe
    /// to use from any thread.
    static let recycling = makeRecycling()

    private static func makeRecycling() -> ByteBufferAllocator {
        // Built in a function: as a static initializer this crashes Swift 6.3.1's
        // sendability checker.
        ByteBufferAllocator(
            allocate: RecycledMemory.allocate,
            reallocate: RecycledMemory.reallocate,
            deallocate: RecycledMemory.deallocate,
            copy: { $0.copyMemory(from: $1, byteCount: $2) })
    }
}
