import NIOCore

/// Splits the bytes a client sends into messages, one phase at a time:
///
/// ```
///  clientFlags ──► options ──(server enters transmission)──► transmission
/// ```
///
/// A pure value: feed it the connection's accumulated bytes; it consumes whole messages
/// only. Oversized option and WRITE payloads are skipped byte by byte so the stream stays
/// in sync, and reported so the server can answer with an error; lengths past the
/// discard limits throw `.excessive` (the connection should be closed).
public struct NBDServerParser: Sendable {
    public enum Phase: Sendable { case clientFlags, options, transmission }

    public enum Message: Equatable, Sendable {
        case clientFlags(NBDClientFlags)
        case option(NBDOptionRequest)
        /// An option whose payload exceeded `NBDLimits.maxOptionPayload`; it was skipped.
        case oversizedOption(NBDOption, length: UInt32)
        case request(NBDRequest)
        /// A WRITE whose payload exceeded `NBDLimits.maxPayload`; it was skipped.
        case oversizedWrite(NBDRequestHeader)
    }

    public private(set) var phase: Phase = .clientFlags
    /// Payload bytes still to skip.
    private var discarding = 0

    public init() {}

    /// Called by the server once the handshake ends (NBD_OPT_GO acknowledged or
    /// NBD_OPT_EXPORT_NAME answered).
    public mutating func enterTransmission() { phase = .transmission }

    /// The next complete message, or nil when more bytes are needed.
    public mutating func next(_ buffer: inout ByteBuffer) throws(NBDDecodingError) -> Message? {
        if discarding > 0 {
            let skipped = min(discarding, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: skipped)
            discarding -= skipped
            if discarding > 0 { return nil }
        }
        switch phase {
        case .clientFlags:
            guard let flags = buffer.readNBDClientFlags() else { return nil }
            phase = .options
            return .clientFlags(flags)
        case .options:
            guard let (option, length) = try buffer.peekNBDOptionHeader() else { return nil }
            if Int(length) > NBDLimits.maxOptionPayload {
                guard Int(length) <= NBDLimits.maxDiscardableOption else {
                    throw .excessive("option payload of \(length) bytes")
                }
                buffer.moveReaderIndex(forwardBy: 16)
                discarding = Int(length)
                let skipped = min(discarding, buffer.readableBytes)
                buffer.moveReaderIndex(forwardBy: skipped)
                discarding -= skipped
                return .oversizedOption(option, length: length)
            }
            return try buffer.readNBDOptionRequest().map { .option($0) }
        case .transmission:
            guard let header = try buffer.peekNBDRequestHeader() else { return nil }
            guard header.command == .write else {
                buffer.moveReaderIndex(forwardBy: NBDRequestHeader.size)
                return .request(NBDRequest(header: header))
            }
            let length = Int(header.length)
            if length > NBDLimits.maxPayload {
                guard length <= NBDLimits.maxDiscardablePayload else {
                    throw .excessive("write payload of \(length) bytes")
                }
                buffer.moveReaderIndex(forwardBy: NBDRequestHeader.size)
                discarding = length
                let skipped = min(discarding, buffer.readableBytes)
                buffer.moveReaderIndex(forwardBy: skipped)
                discarding -= skipped
                return .oversizedWrite(header)
            }
            guard buffer.readableBytes >= NBDRequestHeader.size + length else { return nil }
            buffer.moveReaderIndex(forwardBy: NBDRequestHeader.size)
            return .request(NBDRequest(header: header, payload: buffer.readSlice(length: length)!))
        }
    }
}
