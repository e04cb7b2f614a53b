import NBDServer
import NIOConcurrencyHelpers
import ThinControl

/// `serve --limit` and the control socket's `limit`: rate-limit rules by export-name
/// pattern, and one shared `NBDRateLimit` per export name with connections, so every
/// connection to one export draws from the same buckets.
///
/// The last rule that matches a name wins, so a rule for one name set after a wildcard
/// overrides it. Changing a rule changes the limiters of connections already open.
/// Limiters exist only while their export has connections (nothing piles up as
/// ephemeral names come and go). Thread-safe; every call is O(rules + open exports)
/// under a short lock.
final class ExportLimits: Sendable {
    private struct State {
        var rules: [ExportLimitRule]
        var active: [String: (limit: NBDRateLimit, users: Int)] = [:]
    }

    private let state: NIOLockedValueBox<State>

    init(rules: [ExportLimitRule]) {
        state = NIOLockedValueBox(State(rules: rules))
    }

    private static func rates(for name: String, in rules: [ExportLimitRule]) -> NBDRateLimit.Rates {
        guard let rule = rules.last(where: { ExportPattern.matches($0.pattern, name) }) else {
            return NBDRateLimit.Rates(operationsPerSecond: 0, bytesPerSecond: 0)
        }
        return NBDRateLimit.Rates(operationsPerSecond: rule.operationsPerSecond, bytesPerSecond: rule.bytesPerSecond)
    }

    /// The limiter of export `name` for one more connection (unlimited when no rule
    /// matches, so that a rule set later applies to it too). Pair with `release`.
    func acquire(_ name: String) -> NBDRateLimit {
        state.withLockedValue { state in
            if let entry = state.active[name] {
                state.active[name] = (entry.limit, entry.users + 1)
                return entry.limit
            }
            let limit = NBDRateLimit(Self.rates(for: name, in: state.rules))
            state.active[name] = (limit, 1)
            return limit
        }
    }

    func release(_ name: String) {
        state.withLockedValue { state in
            guard let entry = state.active[name] else { return }
            state.active[name] = entry.users > 1 ? (entry.limit, entry.users - 1) : nil
        }
    }

    /// Adds or replaces the rule for `rule.pattern` (both rates 0 removes it) and
    /// applies the result to every open export; returns the rules now in force.
    func set(_ rule: ExportLimitRule) -> [ExportLimitRule] {
        state.withLockedValue { state in
            state.rules.removeAll { $0.pattern == rule.pattern }
            if rule.operationsPerSecond != 0 || rule.bytesPerSecond != 0 { state.rules.append(rule) }
            for (name, entry) in state.active { entry.limit.set(Self.rates(for: name, in: state.rules)) }
            return state.rules
        }
    }

    var rules: [ExportLimitRule] { state.withLockedValue { $0.rules } }
}
