import NBDProtocol
import NIOCore

/// Builds the bytes of transmission replies. Pure; the connection writes them.
public enum NBDReplyEncoder {
    /// The reply to a successful READ: a simple reply with the data, or structured
    /// chunks where unmapped ranges go out as OFFSET_HOLE (unless the client asked not to
    /// fragment). `data` holds the whole range, holes zero-filled.
    ///
    /// Returns the data when it is to be sent, unchanged, right after `out` (the common
    /// case: no copy of the payload); nil when `out` holds the whole reply.
    @discardableResult
    public static func read(
        cookie: UInt64, offset: UInt64, data: ByteBuffer, extents: [NBDExtent], structured: Bool, dontFragment: Bool,
        into out: inout ByteBuffer
    ) -> ByteBuffer? {
        guard structured else {
            out.writeNBDSimpleReply(NBDSimpleReplyHeader(error: .none, cookie: cookie))
            return data
        }
        guard data.readableBytes > 0 else {
            out.writeNBDStructuredChunk(NBDStructuredChunk(flags: .done, cookie: cookie, payload: .none))
            return nil
        }
        let hasHoles = extents.contains { $0.isHole }
        if dontFragment || !hasHoles {
            // The OFFSET_DATA chunk's header and offset; its data follows.
            out.writeNBDOffsetDataHeader(flags: .done, cookie: cookie, offset: offset, dataLength: data.readableBytes)
            return data
        }
        let end = offset + UInt64(data.readableBytes)
        var runs: [NBDExtent] = []
        for extent in extents {
            let start = max(extent.offset, offset)
            let stop = min(extent.offset + extent.length, end)
            guard stop > start else { continue }
            if let last = runs.last, last.isHole == extent.isHole, last.offset + last.length == start {
                runs[runs.count - 1].length += stop - start
            } else {
                runs.append(NBDExtent(offset: start, length: stop - start, isHole: extent.isHole))
            }
        }
        for (i, run) in runs.enumerated() {
            let flags: NBDStructuredChunk.Flags = i == runs.count - 1 ? .done : []
            if run.isHole {
                out.writeNBDStructuredChunk(NBDStructuredChunk(flags: flags, cookie: cookie, payload: .offsetHole(offset: run.offset, length: UInt32(run.length))))
            } else {
                let slice = data.getSlice(at: data.readerIndex + Int(run.offset - offset), length: Int(run.length))!
                out.writeNBDStructuredChunk(NBDStructuredChunk(flags: flags, cookie: cookie, payload: .offsetData(offset: run.offset, data: slice)))
            }
        }
        return nil
    }

    /// A success without data.
    public static func done(cookie: UInt64, into out: inout ByteBuffer) {
        out.writeNBDSimpleReply(NBDSimpleReplyHeader(error: .none, cookie: cookie))
    }

    /// An error: an ERROR chunk with a message under structured replies, else a simple reply.
    public static func error(_ error: NBDError, message: String, cookie: UInt64, structured: Bool, into out: inout ByteBuffer) {
        if structured {
            out.writeNBDStructuredChunk(NBDStructuredChunk(flags: .done, cookie: cookie, payload: .error(error, message: message)))
        } else {
            out.writeNBDSimpleReply(NBDSimpleReplyHeader(error: error, cookie: cookie))
        }
    }

    /// `base:allocation` flags for an extent: holes read as zeros.
    public static func allocationStatus(_ extent: NBDExtent) -> NBDStatusExtent {
        let flags: NBDAllocationState = extent.isHole ? [.hole, .zero] : []
        return NBDStatusExtent(offset: extent.offset, length: extent.length, flags: flags.rawValue)
    }

    /// One context's BLOCK_STATUS chunk: descriptors for `extents`, clipped to the
    /// request, merged where the flags repeat, and capped (one descriptor with REQ_ONE,
    /// 2^20 otherwise). `isLast` marks the reply's final chunk.
    public static func blockStatus(
        cookie: UInt64, contextID: UInt32, offset: UInt64, length: UInt32, extents: [NBDStatusExtent], onlyOne: Bool,
        isLast: Bool = true, into out: inout ByteBuffer
    ) {
        let end = offset + UInt64(length)
        var descriptors: [BlockStatusDescriptor] = []
        var position = offset
        for extent in extents {
            let start = max(extent.offset, position)
            let stop = min(extent.offset + extent.length, end)
            guard stop > start else { continue }
            if let last = descriptors.last, last.flags == extent.flags {
                descriptors[descriptors.count - 1].length += UInt32(stop - start)
            } else {
                descriptors.append(BlockStatusDescriptor(length: UInt32(stop - start), flags: extent.flags))
            }
            position = stop
            if descriptors.count > NBDLimits.maxBlockStatusDescriptors { break }
        }
        if descriptors.isEmpty {
            // Nothing known (zero-length request): report the requested range as data.
            descriptors = [BlockStatusDescriptor(length: max(length, 1), flags: 0)]
        }
        if onlyOne {
            descriptors = [descriptors[0]]
        } else if descriptors.count > NBDLimits.maxBlockStatusDescriptors {
            descriptors.removeLast(descriptors.count - NBDLimits.maxBlockStatusDescriptors)
        }
        out.writeNBDStructuredChunk(
            NBDStructuredChunk(flags: isLast ? .done : [], cookie: cookie, payload: .blockStatus(contextID: contextID, descriptors: descriptors)))
    }
}
