import ThinFormat
import ThinSystem

/// Failures of the metadata layer. Every one leaves the last committed state intact.
public enum MetadataError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A metadata block failed validation; it is never used.
    case corruptBlock(UInt64, BlockType, String)
    /// A pointer leads outside the metadata region.
    case pointerOutOfRange(UInt64, BlockType)
    /// The metadata region is full (the reserve is kept for deletes and commits).
    case noMetadataSpace
    /// The data region has fewer free blocks than the operation needs.
    case noDataSpace(needed: UInt64, available: UInt64)
    /// A reference count would overflow or underflow: the metadata is inconsistent.
    case refcountInvariant(String)
    case io(SystemError)
    /// A caller that must not block asked for a block the cache does not hold.
    case notCached(UInt64)

    /// Whether the error says the metadata is damaged (as opposed to full, unreadable or
    /// not cached): what puts a pool in fail mode.
    public var isDamage: Bool {
        switch self {
        case .corruptBlock, .pointerOutOfRange, .refcountInvariant: true
        case .noMetadataSpace, .noDataSpace, .io, .notCached: false
        }
    }

    public var description: String {
        switch self {
        case .corruptBlock(let n, let type, let why): "corrupt block \(n) (\(type)): \(why)"
        case .pointerOutOfRange(let n, let type): "corrupt pointer: \(type) at block \(n) is outside the metadata region"
        case .noMetadataSpace: "metadata space exhausted"
        case .noDataSpace(let needed, let available):
            "pool is out of data space (need \(needed) blocks, \(available) free)"
        case .refcountInvariant(let why): "reference count invariant broken: \(why)"
        case .io(let error): "I/O error: \(error)"
        case .notCached(let n): "metadata block \(n) is not cached"
        }
    }
}

@inline(__always)
func wrapIO<T>(_ body: () throws -> T) throws(MetadataError) -> T {
    do {
        return try body()
    } catch let error as SystemError {
        throw .io(error)
    } catch let error as MetadataError {
        throw error
    } catch {
        throw .io(SystemError(.io, "\(error)"))
    }
}
