/// One request of the control protocol (docs/control-api.md): what the CLI asks a
/// running `thinbd serve`, and what it runs itself on a pool nobody serves.
///
/// On the wire a request is one JSON object on one line, `{"command": NAME, ...}`, with
/// the arguments as further keys (snake_case).
public enum ControlCommand: Equatable, Sendable {
    /// Protocol version, server and pool identity.
    case hello
    case info
    case list
    case createVolume(name: String, size: UInt64)
    /// `force` disconnects the clients of `name` first (otherwise they make it fail).
    case delete(name: String, force: Bool)
    case rename(from: String, to: String)
    /// Shrinking a volume with clients needs `force` (which disconnects them).
    case resize(name: String, size: UInt64, force: Bool)
    case snapshot(name: String, ifMissing: Bool)
    case clone(source: String, name: String, ifMissing: Bool)
    /// Rolling back a volume with clients needs `force` (which disconnects them).
    case rollback(snapshot: String, force: Bool)
    /// A read-only check; repair needs the pool offline.
    case check
    case grow(size: UInt64)
    /// The served exports and their connection counts (served pools only).
    case exports
    /// Sets the rate limit of exports matching a pattern (0 = no limit), served pools only.
    case setLimit(ExportLimitRule)
    /// The rate-limit rules in force (served pools only).
    case limits

    /// The protocol version this build speaks; bumped only for incompatible changes.
    public static let protocolVersion: UInt64 = 1

    public var name: String {
        switch self {
        case .hello: "hello"
        case .info: "info"
        case .list: "list"
        case .createVolume: "volume-create"
        case .delete: "delete"
        case .rename: "rename"
        case .resize: "resize"
        case .snapshot: "snapshot"
        case .clone: "clone"
        case .rollback: "rollback"
        case .check: "check"
        case .grow: "grow"
        case .exports: "exports"
        case .setLimit: "limit"
        case .limits: "limits"
        }
    }

    /// Whether the command changes the pool (a read-only pool refuses it).
    public var modifiesPool: Bool {
        switch self {
        // Limits change the server, not the pool.
        case .hello, .info, .list, .check, .exports, .setLimit, .limits: false
        default: true
        }
    }

    public var json: JSON {
        var fields: [(String, JSON)] = [("command", .string(name))]
        switch self {
        case .hello, .info, .list, .check, .exports, .limits: break
        case .setLimit(let rule): fields += rule.fields
        case .createVolume(let name, let size): fields += [("name", .string(name)), ("size", .number(size))]
        case .delete(let name, let force): fields += [("name", .string(name)), ("force", .bool(force))]
        case .rename(let from, let to): fields += [("name", .string(from)), ("new_name", .string(to))]
        case .resize(let name, let size, let force):
            fields += [("name", .string(name)), ("size", .number(size)), ("force", .bool(force))]
        case .snapshot(let name, let ifMissing): fields += [("name", .string(name)), ("if_missing", .bool(ifMissing))]
        case .clone(let source, let name, let ifMissing):
            fields += [("source", .string(source)), ("name", .string(name)), ("if_missing", .bool(ifMissing))]
        case .rollback(let snapshot, let force): fields += [("name", .string(snapshot)), ("force", .bool(force))]
        case .grow(let size): fields += [("size", .number(size))]
        }
        return .object(fields)
    }

    /// Reads a request; unknown keys are ignored (later versions may add optional ones),
    /// missing or mistyped ones are a `ControlError` with code `invalid-request`.
    public init(json: JSON) throws(ControlError) {
        guard case .object = json else { throw .invalidRequest("a request is a JSON object") }
        guard let command = json["command"]?.stringValue else { throw .invalidRequest("the request has no \"command\" string") }
        func string(_ key: String) throws(ControlError) -> String {
            guard let value = json[key]?.stringValue else { throw .invalidRequest("\(command) needs \"\(key)\" (a string)") }
            return value
        }
        func number(_ key: String) throws(ControlError) -> UInt64 {
            guard let value = json[key]?.numberValue else { throw .invalidRequest("\(command) needs \"\(key)\" (a whole number)") }
            return value
        }
        func flag(_ key: String) throws(ControlError) -> Bool {
            guard let value = json[key] else { return false }
            guard let bool = value.boolValue else { throw .invalidRequest("\"\(key)\" must be true or false") }
            return bool
        }
        switch command {
        case "hello": self = .hello
        case "info": self = .info
        case "list": self = .list
        case "volume-create": self = .createVolume(name: try string("name"), size: try number("size"))
        case "delete": self = .delete(name: try string("name"), force: try flag("force"))
        case "rename": self = .rename(from: try string("name"), to: try string("new_name"))
        case "resize": self = .resize(name: try string("name"), size: try number("size"), force: try flag("force"))
        case "snapshot": self = .snapshot(name: try string("name"), ifMissing: try flag("if_missing"))
        case "clone": self = .clone(source: try string("source"), name: try string("name"), ifMissing: try flag("if_missing"))
        case "rollback": self = .rollback(snapshot: try string("name"), force: try flag("force"))
        case "check": self = .check
        case "grow": self = .grow(size: try number("size"))
        case "exports": self = .exports
        case "limit":
            self = .setLimit(
                ExportLimitRule(
                    pattern: try string("pattern"), operationsPerSecond: try number("iops"),
                    bytesPerSecond: try number("bytes_per_second")))
        case "limits": self = .limits
        default: throw .invalidRequest("unknown command \"\(command)\"")
        }
    }
}

/// A failed control request: a stable code for programs and a message for people.
public struct ControlError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Stable codes (docs/control-api.md): `invalid-request`, `no-such-volume`, `exists`,
    /// `invalid-argument`, `in-use`, `read-only`, `no-space`, `corrupt`, `busy`,
    /// `not-served`, `io`, `unreachable`.
    public var code: String
    public var message: String

    public init(code: String, message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    public static func invalidRequest(_ message: String) -> ControlError { ControlError(code: "invalid-request", message: message) }

    public var json: JSON { .object([("code", .string(code)), ("message", .string(message))]) }
}

/// A reply: one JSON object on one line, `{"ok": true, "result": ...}` or
/// `{"ok": false, "error": {"code": ..., "message": ...}}`.
public enum ControlReply: Equatable, Sendable {
    case success(JSON)
    case failure(ControlError)

    public var json: JSON {
        switch self {
        case .success(let result): .object([("ok", .bool(true)), ("result", result)])
        case .failure(let error): .object([("ok", .bool(false)), ("error", error.json)])
        }
    }

    public init(json: JSON) throws(ControlError) {
        guard let ok = json["ok"]?.boolValue else { throw ControlError(code: "io", message: "the server's reply has no \"ok\"") }
        if ok {
            self = .success(json["result"] ?? .null)
        } else {
            let error = json["error"]
            self = .failure(
                ControlError(
                    code: error?["code"]?.stringValue ?? "io",
                    message: error?["message"]?.stringValue ?? "the server gave no reason"))
        }
    }
}

/// A per-export rate limit: exports whose names match `pattern` (`*` and `?`) share
/// their own token buckets of `operationsPerSecond` requests and `bytesPerSecond`
/// bytes (0: no limit on that one).
public struct ExportLimitRule: Equatable, Sendable {
    public var pattern: String
    public var operationsPerSecond: UInt64
    public var bytesPerSecond: UInt64

    public init(pattern: String, operationsPerSecond: UInt64, bytesPerSecond: UInt64) {
        self.pattern = pattern
        self.operationsPerSecond = operationsPerSecond
        self.bytesPerSecond = bytesPerSecond
    }

    var fields: [(String, JSON)] {
        [("pattern", .string(pattern)), ("iops", .number(operationsPerSecond)), ("bytes_per_second", .number(bytesPerSecond))]
    }

    public var json: JSON { .object(fields) }
}
