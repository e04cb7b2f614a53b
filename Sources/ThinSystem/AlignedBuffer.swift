import Glibc

/// A heap buffer aligned for O_DIRECT I/O (4096 bytes by default), zero-filled on creation.
///
/// Cost: one posix_memalign per buffer; callers that do I/O per request keep these in
/// pools instead of allocating per request.
public final class AlignedBuffer: @unchecked Sendable {
    public static let directIOAlignment = 4096

    public let bytes: UnsafeMutableRawBufferPointer

    public init(count: Int, alignment: Int = AlignedBuffer.directIOAlignment) {
        precondition(count >= 0 && alignment > 0 && alignment & (alignment - 1) == 0)
        var pointer: UnsafeMutableRawPointer?
        let result = posix_memalign(&pointer, alignment, max(count, 1))
        guard result == 0, let pointer else { fatalError("out of memory allocating \(count) aligned bytes") }
        memset(pointer, 0, max(count, 1))
        bytes = UnsafeMutableRawBufferPointer(start: pointer, count: count)
    }

    deinit { free(bytes.baseAddress) }

    public var count: Int { bytes.count }

    public func zero() {
        if let base = bytes.baseAddress { memset(base, 0, bytes.count) }
    }
}
