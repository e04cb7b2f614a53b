import NBDProtocol

/// A request that passed validation, ready for the export, by the path it takes
/// through the server (so no path meets an operation it cannot run).
public enum NBDOperation: Equatable, Sendable {
    /// Starts on the event loop when the export can do it without blocking.
    case read(offset: UInt64, length: UInt32, dontFragment: Bool)
    /// Gathered with the other WRITEs of an input pass and run as one batch.
    case write(offset: UInt64, fua: Bool)
    /// Handled on the event loop: the connection drains and closes.
    case disconnect
    /// Runs on the thread pool.
    case blocking(NBDBlockingOperation)
}

/// The operations that always run on the thread pool.
public enum NBDBlockingOperation: Equatable, Sendable {
    case writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fua: Bool)
    case trim(offset: UInt64, length: UInt32, fua: Bool)
    case flush
    case cache(offset: UInt64, length: UInt32)
    case blockStatus(offset: UInt64, length: UInt32, onlyOne: Bool)

    /// The bytes a rate limit charges: zeros that are written (NO_HOLE) cost what a
    /// write does; the rest only count as operations.
    public var limitedBytes: Int {
        if case .writeZeroes(_, let length, false, _) = self { return Int(length) }
        return 0
    }
}

/// The one place requests are checked (range, flags, permissions, negotiation). Past
/// this boundary the server only asserts. Pure.
public enum NBDRequestValidator {
    public enum Verdict: Equatable, Sendable {
        case execute(NBDOperation)
        case reject(NBDError, String)
    }

    static func allowedFlags(_ command: NBDCommand, _ session: NBDSession) -> NBDCommandFlags {
        switch command {
        case .read: session.structuredReplies ? [.fua, .dontFragment] : [.fua]
        case .writeZeroes: [.fua, .noHole, .fastZero]
        case .blockStatus: [.fua, .requestOne]
        default: [.fua]
        }
    }

    public static func validate(_ header: NBDRequestHeader, session: NBDSession) -> Verdict {
        let command = header.command
        let known: Bool
        switch command {
        case .read, .write, .disconnect, .flush, .trim, .cache, .writeZeroes, .blockStatus: known = true
        default: known = false
        }
        guard known else { return .reject(.invalid, "unknown command \(command.rawValue)") }
        let extra = header.flags.subtracting(allowedFlags(command, session))
        guard extra.isEmpty else { return .reject(.invalid, "flags \(extra.rawValue) are not valid for \(command)") }
        let fua = header.flags.contains(.fua)
        let size = session.export.size
        let (end, overflow) = header.offset.addingReportingOverflow(UInt64(header.length))
        let inBounds = !overflow && end <= size
        let isWrite = command == .write || command == .writeZeroes || command == .trim
        if isWrite && session.export.isReadOnly {
            return .reject(.permission, "export \(session.export.name) is read-only")
        }
        switch command {
        case .disconnect:
            return .execute(.disconnect)
        case .flush:
            guard header.offset == 0, header.length == 0 else { return .reject(.invalid, "FLUSH must have zero offset and length") }
            return .execute(.blocking(.flush))
        case .read, .write:
            guard Int(header.length) <= NBDLimits.maxPayload else {
                return .reject(.invalid, "\(command) of \(header.length) bytes exceeds the 32 MiB maximum")
            }
            guard inBounds else {
                return .reject(command == .write ? .noSpace : .invalid, "\(command) beyond the end of the export (\(size) bytes)")
            }
            return command == .read
                ? .execute(.read(offset: header.offset, length: header.length, dontFragment: header.flags.contains(.dontFragment)))
                : .execute(.write(offset: header.offset, fua: fua))
        case .writeZeroes:
            guard inBounds else { return .reject(.noSpace, "WRITE_ZEROES beyond the end of the export (\(size) bytes)") }
            let noHole = header.flags.contains(.noHole)
            if header.flags.contains(.fastZero) && noHole {
                // Writing allocated zeros costs as much as a write: fail fast as asked.
                return .reject(.notSupported, "fast zeroing without holes is not faster than writing")
            }
            return .execute(.blocking(.writeZeroes(offset: header.offset, length: header.length, mayTrim: !noHole, fua: fua)))
        case .trim:
            guard inBounds else { return .reject(.invalid, "TRIM beyond the end of the export (\(size) bytes)") }
            return .execute(.blocking(.trim(offset: header.offset, length: header.length, fua: fua)))
        case .cache:
            guard inBounds else { return .reject(.invalid, "CACHE beyond the end of the export (\(size) bytes)") }
            return .execute(.blocking(.cache(offset: header.offset, length: header.length)))
        case .blockStatus:
            guard !session.metaContexts.isEmpty else {
                return .reject(.invalid, "BLOCK_STATUS without a negotiated metadata context")
            }
            guard inBounds else { return .reject(.invalid, "BLOCK_STATUS beyond the end of the export (\(size) bytes)") }
            guard header.length > 0 else { return .reject(.invalid, "BLOCK_STATUS of zero bytes") }
            return .execute(.blocking(.blockStatus(offset: header.offset, length: header.length, onlyOne: header.flags.contains(.requestOne))))
        default:
            return .reject(.invalid, "unknown command \(command.rawValue)")
        }
    }
}
