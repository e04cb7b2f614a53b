import FoundationEssentials

/// Splits the control socket's byte stream into lines (requests and replies are one
/// JSON object per line, ended by "\n"). No I/O: bytes go in as they arrive, in any
/// pieces, and whole lines come out.
public struct ControlLineFramer: Sendable {
    /// Requests longer than this are refused: no request needs more, and a peer that
    /// never sends a newline must not grow the server's buffer without bound.
    public static let maxLineBytes = 1 << 20
    /// Replies (a `list` of many volumes) may be longer; the client still has a bound.
    public static let maxReplyBytes = 256 << 20

    private var buffer: [UInt8] = []
    private var scanned = 0
    public let limit: Int

    public init(limit: Int = ControlLineFramer.maxLineBytes) {
        self.limit = limit
    }

    public mutating func append<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 {
        buffer.append(contentsOf: bytes)
    }

    /// The next whole line (without its "\n", and without a "\r" before it), or nil
    /// until one has arrived.
    public mutating func nextLine() throws(ControlError) -> String? {
        guard let end = buffer[scanned...].firstIndex(of: UInt8(ascii: "\n")) else {
            scanned = buffer.count
            if buffer.count > limit {
                throw .invalidRequest("line longer than \(limit) bytes")
            }
            return nil
        }
        var line = buffer[..<end]
        if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
        let text = String(validating: line, as: UTF8.self)
        buffer.removeSubrange(...end)
        scanned = 0
        guard let text else { throw .invalidRequest("line is not UTF-8") }
        return text
    }

    /// Bytes received that do not yet make a whole line.
    public var bufferedBytes: Int { buffer.count }
}

extension ControlCommand {
    /// The request as one line, ready to send.
    public var line: String { ControlJSON.line(self) + "\n" }

    /// Parses a request line: anything but a valid request (not JSON, nested too deep, not
    /// an object, a missing or mistyped argument) is an `invalid-request` error, never a
    /// crash.
    public init(line: String) throws(ControlError) {
        do {
            self = try JSONDecoder().decode(ControlCommand.self, from: Data(line.utf8))
        } catch let error as ControlError {
            throw error
        } catch {
            throw .invalidRequest(ControlJSON.describe(error))
        }
    }

    /// Parses a request from its bytes, which must be UTF-8 throughout (the decoder itself
    /// does not look inside strings it skips).
    public init(bytes: [UInt8]) throws(ControlError) {
        guard let line = String(validating: bytes, as: UTF8.self) else { throw .invalidRequest("a request is UTF-8 text") }
        try self.init(line: line)
    }
}

extension ControlReply {
    public var line: String { ControlJSON.line(self) + "\n" }

    /// Parses a reply line to `command`: its result is read as that command's result type.
    /// A reply that is not what the protocol says is a `ControlError` with code `io`.
    public init(line: String, answering command: ControlCommand) throws(ControlError) {
        let decoder = JSONDecoder()
        decoder.userInfo[Self.commandKey] = command
        do {
            self = try decoder.decode(ControlReply.self, from: Data(line.utf8))
        } catch let error as ControlError {
            throw error
        } catch {
            throw ControlError(code: "io", message: "the server's reply to \(command.name) does not follow the protocol: \(ControlJSON.describe(error))")
        }
    }
}
