import ThinSystem

/// Origin blocks between their fetch and their store, shared by every image with the same
/// origin (`Pool.fetch`): a block another request is fetching is waited for instead of
/// fetched again, and a fetched block the store worker has not mapped yet is copied from
/// here. Without it, reads that do not line up with data blocks (ext4 files start on any
/// 4 KiB, and are read in 128 KiB pieces) fetch each boundary block twice: the next read
/// arrives before the store has mapped the block.
///
/// Memory: the blocks waiting for the store worker, which is bounded
/// (`OriginStoreQueue.limit`), plus the ones being fetched.
final class OriginBlocksInFlight: Sendable {
    struct Key: Hashable, Sendable {
        var origin: String
        var block: UInt64
    }

    /// What `claim` found for one block.
    enum Claim {
        /// The caller fetches it, then `publish`es or `release`s it with this token.
        case mine
        /// Fetched already: the origin's bytes of the block.
        case ready([UInt8])
        /// Another request is fetching it: `wait` for it.
        case elsewhere
    }

    private enum Entry {
        case fetching(token: UInt64)
        case fetched([UInt8], token: UInt64)
    }

    private struct Table {
        var entries: [Key: Entry] = [:]
        var nextToken: UInt64 = 1
    }

    private let table = WaitableValue(Table())

    /// The longest a request waits for another's fetch before fetching the block itself.
    /// The fetch has bounded timeouts of its own; this only keeps a stuck one from
    /// holding others without end.
    static let longestWaitMilliseconds = 30_000

    /// For each of `blocks` of `origin`, whether the caller is to fetch it (its entry now
    /// says so, under the returned token), has it already, or is to wait for it.
    func claim(_ origin: String, _ blocks: [UInt64]) -> (token: UInt64, claims: [Claim]) {
        table.update { table in
            let token = table.nextToken
            table.nextToken &+= 1
            let claims = blocks.map { block -> Claim in
                let key = Key(origin: origin, block: block)
                switch table.entries[key] {
                case .fetched(let bytes, _): return .ready(bytes)
                case .fetching: return .elsewhere
                case nil:
                    table.entries[key] = .fetching(token: token)
                    return .mine
                }
            }
            return (token, claims)
        }
    }

    /// The caller fetched `block` (claimed under `token`): waiters get `bytes`, and so do
    /// later claims until `release`.
    func publish(_ origin: String, _ block: UInt64, _ bytes: [UInt8], token: UInt64) {
        table.update { table in
            let key = Key(origin: origin, block: block)
            guard case .fetching(token) = table.entries[key] else { return }
            table.entries[key] = .fetched(bytes, token: token)
        }
    }

    /// Forgets `block` if it is still the entry claimed under `token`: it is stored (or its
    /// fetch failed, and a waiter is to try itself).
    func release(_ origin: String, _ block: UInt64, token: UInt64) {
        table.update { table in
            let key = Key(origin: origin, block: block)
            switch table.entries[key] {
            case .fetching(token), .fetched(_, token): table.entries[key] = nil
            default: break
            }
        }
    }

    /// Waits until another request's fetch of `block` gives its bytes; nil when that fetch
    /// failed, or took longer than `longestWaitMilliseconds` (the caller fetches itself).
    /// Blocks: never call it on an event loop.
    func wait(_ origin: String, _ block: UInt64) -> [UInt8]? {
        let key = Key(origin: origin, block: block)
        let outcome = table.wait(until: { table -> [UInt8]?? in
            switch table.entries[key] {
            case .fetched(let bytes, _): return .some(bytes)
            case .fetching: return nil
            case nil: return .some(nil)
            }
        }, milliseconds: Self.longestWaitMilliseconds)
        return outcome ?? nil
    }

    /// How many blocks are being fetched or waiting for their store (for tests).
    var count: Int { table.update { $0.entries.count } }
}
