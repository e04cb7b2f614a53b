import NIOCore

/// A connection's transmission replies written since it last handed bytes to the
/// channel. The small replies of a pass or a completion round (WRITE acknowledgements,
/// errors, the answers of off-loop work, structured reads with holes) accumulate here
/// and reach the channel as one buffer: one channel write and at most one allocation
/// per flush, not one of each per reply. (A plain read's header travels in front of
/// its data instead.)
///
/// Whoever appends must hand the batch over before, or as part of, the connection's
/// next flush (`take`, then `rewind` once the flush is done), or the replies wait.
/// Order inside a batch is the order of appends, so a read's header can be appended
/// right before its data is written after the batch.
struct ReplyBatch {
    /// Appended to by the reply encoders. Bytes before the reader index were handed to
    /// the channel already and are never handed over again.
    var bytes = ByteBuffer()

    var isEmpty: Bool { bytes.readableBytes == 0 }

    /// What was appended since the last `take`, for one channel write; nil when nothing
    /// was. The storage stays shared with the channel until the channel has written it;
    /// an append meanwhile moves to new storage (copy-on-write), never over those bytes.
    mutating func take() -> ByteBuffer? {
        guard bytes.readableBytes > 0 else { return nil }
        let out = bytes
        bytes.moveReaderIndex(to: bytes.writerIndex)
        return out
    }

    /// Called after a flush: starts the storage over. When the channel wrote and let go
    /// of the bytes (the usual case: the socket took them), the same memory is reused;
    /// otherwise `clear` gives new storage and the channel keeps the old.
    /// Storage that grew past this (a burst of error messages) is let go at the rewind.
    mutating func rewind() {
        guard bytes.readableBytes == 0, bytes.writerIndex > 0 else { return }
        if bytes.capacity > Self.retainedCapacity {
            bytes = ByteBuffer()
        } else {
            bytes.clear()
        }
    }

    static let retainedCapacity = 64 * 1024

    /// Replies larger than this (BLOCK_STATUS with many descriptors) are written on their
    /// own after the batch rather than copied into it.
    static let largestBatched = 4096
}

/// A connection's replies waiting to leave, in order: the batch of small ones, and
/// buffers that go out as they are (read data with its header in front, large replies)
/// between them. The owner takes them all at each flush (`take`), then rewinds the
/// batch once the transport let go of what it was given.
///
/// Cost: no allocation once `pending` has grown to the most buffers one flush carries.
struct ReplyQueue {
    var batch = ReplyBatch()
    /// Buffers to write before the batch's bytes not yet taken; a batch slice among them
    /// holds replies appended before the buffer that follows it.
    private(set) var pending: [ByteBuffer] = []

    /// Queues `buffer` after every reply appended so far.
    mutating func append(afterBatch buffer: ByteBuffer) {
        if let replies = batch.take() { pending.append(replies) }
        pending.append(buffer)
    }

    /// Hands everything queued to `write`, in order.
    mutating func take(_ write: (ByteBuffer) -> Void) {
        if !pending.isEmpty {
            for buffer in pending { write(buffer) }
            pending.removeAll(keepingCapacity: true)
        }
        if let replies = batch.take() { write(replies) }
    }
}
