import NIOCore

/// What a connection has received and not parsed yet, and whose storage holds it.
///
/// The bytes are often the channel's pooled receive buffer itself, which the channel
/// reuses for a later read only when nothing else holds it. So after a parsing pass
/// (`keepTail`) nothing is kept when all was parsed, and a partial message is copied
/// out of the channel's buffer, once, into a buffer of our own with room for a read as
/// large as the last. Later reads are appended to that buffer, and parsed bytes are
/// dropped from its front only once they are at least as many as those left, so under
/// back-pressure or a client that sends in small pieces each byte is copied a bounded
/// number of times. (`discardReadBytes` on the channel's shared buffer copied the whole
/// rest of its capacity instead, every pass: 6.6 % of the loop's time on 4 KiB writes,
/// docs/performance.md.)
///
/// Cost: no allocation when a read is parsed to its end; one allocation and a copy of
/// the partial message when one is left in the channel's buffer. No I/O.
struct UnparsedInput {
    /// The unparsed bytes, front first. Callers only read from them (moving the reader
    /// index); new bytes come through `receive`, and `release` empties them.
    var bytes = Self.noBytes
    /// Whether `bytes` is a buffer of our own, not a receive buffer the channel may
    /// want back.
    private var isOwn = false
    /// The size of the channel's last read (it reads up to 256 KiB at a time): the room
    /// a kept partial message leaves for the next one.
    var lastReadSize = 0

    /// Holds no storage of its own: `bytes` when nothing waits to be parsed.
    private static let noBytes = ByteBuffer()

    /// Takes a read's bytes: as they are when nothing waits, else appended to the kept
    /// partial message (a buffer of our own, growing by doubling).
    mutating func receive(_ read: inout ByteBuffer) {
        if bytes.readableBytes == 0 {
            bytes = read
            isOwn = false
        } else {
            bytes.writeBuffer(&read)
        }
    }

    /// After a parsing pass: lets the channel's buffer go and keeps what is left.
    mutating func keepTail(allocator: ByteBufferAllocator) {
        let tail = bytes.readableBytes
        if tail == 0 {
            release()
        } else if !isOwn {
            var own = allocator.buffer(capacity: max(tail + lastReadSize, 2 * tail))
            own.writeBuffer(&bytes)
            bytes = own
            isOwn = true
        } else if bytes.readerIndex >= tail {
            bytes.discardReadBytes()
        }
    }

    /// Empties it, holding no storage (the rest was taken elsewhere).
    mutating func release() {
        bytes = Self.noBytes
        isOwn = false
    }
}
