import ThinFormat
import ThinMetadata
import ThinSystem

/// Everything a pool operation can refuse. Messages name the problem; `errnoCode` is
/// what an NBD client would see.
public enum PoolError: Error, Equatable, Sendable, CustomStringConvertible {
    case notAPool(path: String, reason: String)
    case noSuchFile(String)
    case corrupt(String)
    case truncated(expected: UInt64, actual: UInt64)
    case inUse(path: String, holder: Int32?)
    case fileExists(String)
    case noSuchVolume(String)
    case volumeExists(String)
    case invalidName(String, reason: String)
    case invalidArgument(String)
    case readOnly(String)
    case outOfRange(String)
    case noDataSpace(String)
    case noMetadataSpace
    case io(SystemError)
    case closed
    /// Fail mode: damage was found, or a commit failed, while the pool was open; it serves
    /// reads and commits nothing more until it is reopened (repaired first, for damage).
    case failed(PoolFailure)
    /// The pool was flagged for a check when damage was found; a read-write open needs
    /// `check --repair` first, or `force`.
    case needsCheck(path: String, reason: String)
    /// An origin-backed volume's origin cannot be reached.
    case originUnavailable(String)
    /// An origin-backed volume's origin answers, but with another image than the one
    /// recorded (its size or UUID differ): nothing is read from it.
    case originMismatch(String)

    public var description: String {
        switch self {
        case .notAPool(let path, let reason): "\(path) is not a thinbd pool (\(reason))"
        case .noSuchFile(let path): "\(path): no such file"
        case .corrupt(let why): "pool is corrupt: \(why)"
        case .truncated(let expected, let actual):
            "pool file is truncated: expected at least \(expected) bytes, found \(actual)"
        case .inUse(let path, let holder):
            if let holder, let command = SystemInfo.commandLine(of: holder) {
                command.contains("serve")
                    ? "pool \(path) is in use by thinbd serve (pid \(holder))"
                    : "pool \(path) is in use by process \(holder) (\(command.joined(separator: " ")))"
            } else {
                "pool \(path) is in use by another process"
            }
        case .fileExists(let path): "\(path) already exists"
        case .noSuchVolume(let name): "no such volume or snapshot: \(name)"
        case .volumeExists(let name): "a volume or snapshot named \(name) already exists"
        case .invalidName(let name, let reason): "invalid name '\(name)': \(reason)"
        case .invalidArgument(let why): why
        case .readOnly(let what): "\(what) is read-only"
        case .outOfRange(let why): why
        case .noDataSpace(let why): why
        case .noMetadataSpace: "pool is out of metadata space"
        case .io(let error): "I/O error: \(error)"
        case .closed: "pool is closed"
        case .failed(let failure) where failure.kind == .damage:
            "pool is in fail mode after finding damage (\(failure.reason)): it serves reads only; stop it and run thinbd check --repair"
        case .failed(let failure):
            "pool is in fail mode (\(failure.reason)): it serves reads only and commits nothing more; reopen it to serve its last commit"
        case .originUnavailable(let why): "origin unavailable: \(why)"
        case .originMismatch(let why): "origin is another image: \(why)"
        case .needsCheck(let path, let reason):
            "pool \(path) needs a check: \(reason); run thinbd check --repair \(path) (or open it with --force)"
        }
    }

    /// The errno an NBD reply carries for this failure.
    public var errnoCode: SystemError.Code {
        switch self {
        case .noDataSpace, .noMetadataSpace: .noSpace
        case .readOnly: .permission
        case .outOfRange, .invalidArgument, .invalidName: .invalidArgument
        case .io(let error): error.code
        case .closed: .shutdown
        default: .io
        }
    }

    init(_ error: MetadataError) {
        switch error {
        case .corruptBlock, .pointerOutOfRange, .refcountInvariant: self = .corrupt(error.description)
        case .noMetadataSpace: self = .noMetadataSpace
        case .noDataSpace: self = .noDataSpace(error.description)
        case .io(let e): self = .io(e)
        case .notCached: self = .io(SystemError(.wouldBlock, error.description))
        }
    }
}

@inline(__always)
func mapErrors<T>(_ body: () throws -> T) throws(PoolError) -> T {
    do {
        return try body()
    } catch let error as PoolError {
        throw error
    } catch let error as MetadataError {
        throw PoolError(error)
    } catch let error as SystemError {
        throw .io(error)
    } catch {
        throw .io(SystemError(.io, "\(error)"))
    }
}
