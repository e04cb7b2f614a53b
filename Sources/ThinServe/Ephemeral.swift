import Dispatch
import NBDServer
import ThinPool
import ThinSystem

/// `serve --ephemeral 'PATTERN=SOURCE'`: export names matching PATTERN are made on first
/// use, as a writable clone of SOURCE or as a blank volume.
public struct EphemeralRule: Sendable, Equatable {
    public enum Source: Sendable, Equatable {
        /// A clone of this volume or snapshot.
        case clone(String)
        /// An empty volume of this many bytes.
        case blank(UInt64)
    }

    public var pattern: String
    public var source: Source

    public init(pattern: String, source: Source) {
        self.pattern = pattern
        self.source = source
    }

    public func matches(_ name: String) -> Bool { ExportPattern.matches(pattern, name) }
}

/// Shell-style patterns for export names: `*` any run of characters, `?` one character,
/// everything else itself.
public enum ExportPattern {
    public static func matches(_ pattern: String, _ name: String) -> Bool {
        let p = Array(pattern.unicodeScalars)
        let n = Array(name.unicodeScalars)
        // Iterative matching with one backtrack point (the last `*`): O(|p| * |n|).
        var pi = 0
        var ni = 0
        var star: Int?
        var resume = 0
        while ni < n.count {
            if pi < p.count && (p[pi] == "?" || (p[pi] != "*" && p[pi] == n[ni])) {
                pi += 1
                ni += 1
            } else if pi < p.count && p[pi] == "*" {
                star = pi
                resume = ni
                pi += 1
            } else if let star {
                pi = star + 1
                resume += 1
                ni = resume
            } else {
                return false
            }
        }
        while pi < p.count && p[pi] == "*" { pi += 1 }
        return pi == p.count
    }
}

/// The ephemeral volumes of one server: made on first open, shared by every connection
/// that names them, deleted a grace period after the last one closes (unless kept).
///
/// Thread-safe; creation and deletion of one name are serialized under its lock, so
/// two clients racing to open a new name get the same volume, and a client arriving
/// during the grace period keeps it.
final class EphemeralVolumes: @unchecked Sendable {
    let pool: Pool
    let rules: [EphemeralRule]
    let keep: Bool
    let graceMilliseconds: Int
    private let log: @Sendable (String) -> Void
    /// Users per name, and whether the server stopped; reachable only under its lock,
    /// which creation and deletion hold too (they run off the event loops).
    private struct State {
        var users: [String: Int] = [:]
        /// Bumped on every open of a name, so that a pending deletion can tell it is stale.
        var generation: [String: UInt64] = [:]
        var stopped = false
    }
    private let state = LockedValue(State())
    /// Called after an ephemeral volume is deleted (to drop its metrics).
    var deleted: (@Sendable (String) -> Void)?

    init(pool: Pool, rules: [EphemeralRule], keep: Bool, graceMilliseconds: Int, log: @escaping @Sendable (String) -> Void) {
        self.pool = pool
        self.rules = rules
        self.keep = keep
        self.graceMilliseconds = graceMilliseconds
        self.log = log
    }

    func rule(for name: String) -> EphemeralRule? {
        guard !name.isEmpty, !name.contains("@") else { return nil }
        return rules.first { $0.matches(name) }
    }

    /// The size a new volume for `name` would have, for the handshake's reply.
    func plannedSize(of name: String) -> UInt64? {
        guard let rule = rule(for: name) else { return nil }
        switch rule.source {
        case .clone(let source): return try? pool.volumeInfo(source).size
        case .blank(let size): return size
        }
    }

    /// Makes `name` exist (if a rule covers it and it does not) and counts one more user.
    /// Returns false when no rule applies (the name is an ordinary export).
    func acquire(_ name: String) throws(PoolError) -> Bool {
        guard let rule = rule(for: name) else { return false }
        return try state.withLockedValue { (state: inout State) throws(PoolError) -> Bool in
            guard !state.stopped else { throw .io(SystemError(.shutdown, "server is shutting down")) }
            if let existing = try? pool.volumeInfo(name) {
                // An ordinary volume that happens to match is served as it is, never deleted.
                guard existing.isEphemeral || keep else { return false }
            } else {
                switch rule.source {
                case .clone(let source):
                    _ = try pool.clone(source, as: name, ifMissing: true, ephemeral: !keep)
                case .blank(let size):
                    _ = try pool.createVolume(name, size: size, ephemeral: !keep)
                }
                log("ephemeral export \(name) created (\(describe(rule.source)))")
            }
            state.users[name, default: 0] += 1
            state.generation[name, default: 0] += 1
            return true
        }
    }

    /// One user of `name` left; the last one starts the grace period.
    func release(_ name: String) {
        let keep = self.keep
        let pending = state.withLockedValue { state -> UInt64? in
            state.users[name, default: 1] -= 1
            guard state.users[name] == 0, !keep, !state.stopped else { return nil }
            return state.generation[name]
        }
        guard let pending else { return }
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(graceMilliseconds)) { [self] in
            state.withLockedValue { state in
                guard !state.stopped, state.users[name] == 0, state.generation[name] == pending else { return }
                remove(name, from: &state)
            }
        }
    }

    /// Deletes ephemeral volumes a server that did not stop cleanly left behind.
    static func removeLeftovers(of pool: Pool, log: (String) -> Void) {
        for volume in pool.listVolumes() where volume.isEphemeral {
            do {
                try pool.delete(volume.name)
                log("deleted ephemeral export \(volume.name) left by an earlier server")
            } catch {
                log("could not delete leftover ephemeral export \(volume.name): \(error)")
            }
        }
    }

    /// The server stops: every ephemeral volume goes (unless kept).
    func stop() {
        let keep = self.keep
        state.withLockedValue { state in
            state.stopped = true
            guard !keep else { return }
            for name in state.users.keys { remove(name, from: &state) }
        }
    }

    /// Under the state's lock. Only a volume still flagged ephemeral goes: one a
    /// management command deleted, or replaced or renamed since, is left alone.
    private func remove(_ name: String, from state: inout State) {
        state.users[name] = nil
        state.generation[name] = nil
        guard let volume = try? pool.volumeInfo(name), volume.isEphemeral else { return }
        do {
            try pool.delete(name)
            log("ephemeral export \(name) deleted")
            deleted?(name)
        } catch {
            log("could not delete ephemeral export \(name): \(error)")
        }
    }

    private func describe(_ source: EphemeralRule.Source) -> String {
        switch source {
        case .clone(let name): "clone of \(name)"
        case .blank(let size): "blank, \(formatBytes(size))"
        }
    }
}
