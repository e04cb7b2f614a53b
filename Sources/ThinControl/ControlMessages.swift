import ThinFormat
import ThinPool
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
    /// The extents whose contents may differ between two volumes or snapshots; `from`
    /// empty compares with an empty image (everything `to` maps). `window`: only the
    /// blocks that meet this byte range (`offset` and `length` on the wire).
    case diff(from: String, to: String, window: Range<UInt64>? = nil)
    /// One step of `thinbd receive` (see `ReceiveRequest`).
    case receive(ReceiveRequest)
    /// A volume whose unmapped blocks come from an image outside the pool, which the
    /// caller reached (`thinbd clone POOL URI NAME`).
    case cloneOrigin(name: String, origin: VolumeRecord.Origin)
    /// Fetches the unfetched blocks of origin-backed volume `name` that meet `window`;
    /// drops the origin once nothing is left (`thinbd hydrate` sends it window by window).
    case hydrate(name: String, window: Range<UInt64>)

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
        case .diff: "diff"
        case .receive: "receive"
        case .cloneOrigin: "clone-origin"
        case .hydrate: "hydrate"
        }
    }

    /// Whether the command changes the pool (a read-only pool refuses it).
    public var modifiesPool: Bool {
        switch self {
        // Limits change the server, not the pool.
        case .hello, .info, .list, .check, .exports, .setLimit, .limits, .diff: false
        default: true
        }
    }

    /// The volumes and snapshots the command names, in request order (for the log).
    public var subjects: [String] {
        switch self {
        case .createVolume(let name, _), .delete(let name, _), .resize(let name, _, _), .snapshot(let name, _),
            .rollback(let name, _):
            [name]
        case .rename(let from, let to), .diff(let from, let to, _): [from, to]
        case .receive(let request): [request.name]
        case .cloneOrigin(let name, let origin): [origin.locator, name]
        case .hydrate(let name, _): [name]
        case .clone(let source, let name, _): [source, name]
        case .hello, .info, .list, .check, .grow, .exports, .setLimit, .limits: []
        }
    }
}

/// A failed control request: a stable code for programs and a message for people.
public struct ControlError: Error, Equatable, Sendable, CustomStringConvertible, Codable {
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

    enum CodingKeys: String, CodingKey {
        case code, message
    }

    /// A server's error object; what it leaves out is filled in, so that it still fails.
    public init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        code = (try? container.decodeIfPresent(String.self, forKey: .code)) ?? "io"
        message = (try? container.decodeIfPresent(String.self, forKey: .message)) ?? "the server gave no reason"
    }
}

/// A reply: one JSON object on one line, `{"ok": true, "result": ...}` or
/// `{"ok": false, "error": {"code": ..., "message": ...}}`.
public enum ControlReply: Equatable, Sendable {
    case success(ControlResult)
    case failure(ControlError)

    /// The result, as the type its command returns (`HelloResult` for `hello`,
    /// `[VolumeSummary]` for `list`, ...: see `ControlCommand.decodeResult`), or the
    /// error the reply carries.
    public func result<Value>(as _: Value.Type = Value.self) throws(ControlError) -> Value {
        switch self {
        case .failure(let error):
            throw error
        case .success(let result):
            guard let value = result.value as? Value else {
                throw ControlError(code: "io", message: "expected a \(Value.self) result, got \(type(of: result.value))")
            }
            return value
        }
    }
}

/// A per-export rate limit: exports whose names match `pattern` (`*` and `?`) share
/// their own token buckets of `operationsPerSecond` requests and `bytesPerSecond`
/// bytes (0: no limit on that one).
public struct ExportLimitRule: Equatable, Sendable, Codable {
    public var pattern: String
    public var operationsPerSecond: UInt64
    public var bytesPerSecond: UInt64

    public init(pattern: String, operationsPerSecond: UInt64, bytesPerSecond: UInt64) {
        self.pattern = pattern
        self.operationsPerSecond = operationsPerSecond
        self.bytesPerSecond = bytesPerSecond
    }

    enum CodingKeys: String, CodingKey {
        case pattern, operationsPerSecond = "iops", bytesPerSecond = "bytes_per_second"
    }
}

/// One step of `thinbd receive` through a server: `begin` sets up the staging volume
/// (`Pool.beginReceive`), `progress` commits what was written to it, `finish` turns it
/// into NAME and NAME@SNAP, `abort` deletes it. Every step carries the stream's header.
public struct ReceiveRequest: Equatable, Sendable {
    public enum Step: String, Sendable {
        case begin, progress, finish, abort
    }

    public var step: Step
    /// The volume the stream goes to.
    public var name: String
    public var header: SendStreamHeader
    /// The staging volume (`progress`, `finish`, `abort`).
    public var staging: String
    /// `progress`: every record below this image offset is written.
    public var appliedUpTo: UInt64
    public var resume: Bool
    public var force: Bool

    public init(
        step: Step, name: String, header: SendStreamHeader, staging: String = "", appliedUpTo: UInt64 = 0, resume: Bool = false,
        force: Bool = false
    ) {
        self.step = step
        self.name = name
        self.header = header
        self.staging = staging
        self.appliedUpTo = appliedUpTo
        self.resume = resume
        self.force = force
    }

    fileprivate init(_ request: RequestReader) throws(ControlError) {
        let stepName = try request.string(.step)
        guard let step = Step(rawValue: stepName) else { throw .invalidRequest("receive: unknown step \"\(stepName)\"") }
        let size = try request.number(.size)
        let blockSize = try request.number(.blockSize)
        guard size > 0, size <= Pool.maxVolumeSize, blockSize <= UInt64(UInt32.max) else {
            throw .invalidRequest("receive: size or block_size out of range")
        }
        let header = SendStreamHeader(
            imageSize: size, blockSize: UInt32(blockSize), imageUUID: try request.uuid(.imageUUID, optional: false)!,
            baseUUID: try request.uuid(.baseUUID, optional: true), createdAt: try request.number(.created),
            imageName: try request.string(.imageName), baseName: try request.string(.baseName))
        self.init(
            step: step, name: try request.string(.name), header: header, staging: try request.string(.staging),
            appliedUpTo: try request.number(.appliedUpTo), resume: try request.flag(.resume), force: try request.flag(.force))
    }
}

// MARK: The wire form of requests

extension ControlCommand: Codable {
    /// `command` and every argument key of every command.
    enum Key: String, CodingKey {
        case command, name, size, force, source, pattern, iops, from, to, offset, length, step, resume, staging, created
        case newName = "new_name", ifMissing = "if_missing", bytesPerSecond = "bytes_per_second"
        case imageUUID = "image_uuid", baseUUID = "base_uuid", imageName = "image_name", baseName = "base_name"
        case blockSize = "block_size", appliedUpTo = "applied_up_to"
        case originKind = "origin_kind", origin, originSize = "origin_size", originUUID = "origin_uuid"
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.container(keyedBy: Key.self)
        try container.encode(self.name, forKey: .command)
        switch self {
        case .hello, .info, .list, .check, .exports, .limits:
            break
        case .createVolume(let name, let size):
            try container.encode(name, forKey: .name)
            try container.encode(size, forKey: .size)
        case .delete(let name, let force), .rollback(let name, let force):
            try container.encode(name, forKey: .name)
            try container.encode(force, forKey: .force)
        case .rename(let from, let to):
            try container.encode(from, forKey: .name)
            try container.encode(to, forKey: .newName)
        case .resize(let name, let size, let force):
            try container.encode(name, forKey: .name)
            try container.encode(size, forKey: .size)
            try container.encode(force, forKey: .force)
        case .snapshot(let name, let ifMissing):
            try container.encode(name, forKey: .name)
            try container.encode(ifMissing, forKey: .ifMissing)
        case .clone(let source, let name, let ifMissing):
            try container.encode(source, forKey: .source)
            try container.encode(name, forKey: .name)
            try container.encode(ifMissing, forKey: .ifMissing)
        case .grow(let size):
            try container.encode(size, forKey: .size)
        case .setLimit(let rule):
            try container.encode(rule.pattern, forKey: .pattern)
            try container.encode(rule.operationsPerSecond, forKey: .iops)
            try container.encode(rule.bytesPerSecond, forKey: .bytesPerSecond)
        case .diff(let from, let to, let window):
            try container.encode(from, forKey: .from)
            try container.encode(to, forKey: .to)
            if let window {
                try container.encode(window.lowerBound, forKey: .offset)
                try container.encode(UInt64(window.count), forKey: .length)
            }
        case .receive(let request):
            try container.encode(request.step.rawValue, forKey: .step)
            try container.encode(request.name, forKey: .name)
            try container.encode(request.staging, forKey: .staging)
            try container.encode(request.header.imageSize, forKey: .size)
            try container.encode(UInt64(request.header.blockSize), forKey: .blockSize)
            try container.encode(formatUUID(request.header.imageUUID), forKey: .imageUUID)
            try container.encode(request.header.baseUUID.map(formatUUID) ?? "", forKey: .baseUUID)
            try container.encode(request.header.imageName, forKey: .imageName)
            try container.encode(request.header.baseName, forKey: .baseName)
            try container.encode(request.header.createdAt, forKey: .created)
            try container.encode(request.appliedUpTo, forKey: .appliedUpTo)
            try container.encode(request.resume, forKey: .resume)
            try container.encode(request.force, forKey: .force)
        case .cloneOrigin(let name, let origin):
            try container.encode(name, forKey: .name)
            try container.encode(origin.kind == .nbd ? "nbd" : "file", forKey: .originKind)
            try container.encode(origin.locator, forKey: .origin)
            try container.encode(origin.size, forKey: .originSize)
            try container.encode(origin.uuid == VolumeRecord.noUUID ? "" : formatUUID(origin.uuid), forKey: .originUUID)
        case .hydrate(let name, let window):
            try container.encode(name, forKey: .name)
            try container.encode(window.lowerBound, forKey: .offset)
            try container.encode(UInt64(window.count), forKey: .length)
        }
    }

    /// Reads a request; unknown keys are ignored (later versions may add optional ones),
    /// flags left out are false, and anything missing or mistyped throws a `ControlError`
    /// with code `invalid-request` naming the command and the key.
    public init(from decoder: Decoder) throws {
        let request = try RequestReader(decoder)
        switch request.command {
        case "hello": self = .hello
        case "info": self = .info
        case "list": self = .list
        case "volume-create": self = .createVolume(name: try request.string(.name), size: try request.number(.size))
        case "delete": self = .delete(name: try request.string(.name), force: try request.flag(.force))
        case "rename": self = .rename(from: try request.string(.name), to: try request.string(.newName))
        case "resize": self = .resize(name: try request.string(.name), size: try request.number(.size), force: try request.flag(.force))
        case "snapshot": self = .snapshot(name: try request.string(.name), ifMissing: try request.flag(.ifMissing))
        case "clone":
            self = .clone(source: try request.string(.source), name: try request.string(.name), ifMissing: try request.flag(.ifMissing))
        case "rollback": self = .rollback(snapshot: try request.string(.name), force: try request.flag(.force))
        case "check": self = .check
        case "grow": self = .grow(size: try request.number(.size))
        case "exports": self = .exports
        case "limit":
            self = .setLimit(
                ExportLimitRule(
                    pattern: try request.string(.pattern), operationsPerSecond: try request.number(.iops),
                    bytesPerSecond: try request.number(.bytesPerSecond)))
        case "limits": self = .limits
        case "diff":
            var window: Range<UInt64>?
            if let offset = try request.optionalNumber(.offset) {
                let length = try request.optionalNumber(.length) ?? 0
                let (end, overflow) = offset.addingReportingOverflow(length)
                guard !overflow else { throw ControlError.invalidRequest("diff: offset + length overflows") }
                window = offset..<end
            }
            self = .diff(from: try request.string(.from), to: try request.string(.to), window: window)
        case "receive": self = .receive(try ReceiveRequest(request))
        case "hydrate":
            let offset = try request.number(.offset)
            let (end, overflow) = offset.addingReportingOverflow(try request.number(.length))
            guard !overflow else { throw ControlError.invalidRequest("hydrate: offset + length overflows") }
            self = .hydrate(name: try request.string(.name), window: offset..<end)
        case "clone-origin":
            let kind: VolumeRecord.Origin.Kind
            switch try request.string(.originKind) {
            case "nbd": kind = .nbd
            case "file": kind = .file
            default: throw ControlError.invalidRequest("clone-origin: origin_kind is nbd or file")
            }
            let size = try request.number(.originSize)
            let locator = try request.string(.origin)
            guard size > 0, size <= Pool.maxVolumeSize, !locator.isEmpty, locator.utf8.count <= VolumeRecord.Origin.maxLocatorBytes else {
                throw ControlError.invalidRequest("clone-origin: origin or origin_size out of range")
            }
            let uuid = try request.uuid(.originUUID, optional: true) ?? VolumeRecord.noUUID
            self = .cloneOrigin(name: try request.string(.name), origin: VolumeRecord.Origin(kind: kind, locator: locator, size: size, uuid: uuid))
        default: throw ControlError.invalidRequest("unknown command \"\(request.command)\"")
        }
    }
}

/// A request's keyed container and command name: every argument read through it that is
/// missing or of the wrong type (a negative, fractional or too large number too) becomes
/// an `invalid-request` error naming the command and the key.
fileprivate struct RequestReader {
    let container: KeyedDecodingContainer<ControlCommand.Key>
    let command: String

    init(_ decoder: Decoder) throws(ControlError) {
        do {
            container = try decoder.container(keyedBy: ControlCommand.Key.self)
        } catch {
            throw .invalidRequest("a request is a JSON object")
        }
        do {
            command = try container.decode(String.self, forKey: .command)
        } catch {
            throw .invalidRequest("the request has no \"command\" string")
        }
    }

    func string(_ key: ControlCommand.Key) throws(ControlError) -> String { try argument(key, "a string") }

    func number(_ key: ControlCommand.Key) throws(ControlError) -> UInt64 { try argument(key, "a whole number") }

    /// A whole number that may be left out (or null).
    func optionalNumber(_ key: ControlCommand.Key) throws(ControlError) -> UInt64? {
        do {
            return try container.decodeIfPresent(UInt64.self, forKey: key)
        } catch {
            throw .invalidRequest("\(command): \"\(key.stringValue)\" must be a whole number")
        }
    }

    /// A UUID in its text form; "" (or left out, for `optional`) is none.
    func uuid(_ key: ControlCommand.Key, optional: Bool) throws(ControlError) -> [UInt8]? {
        let text = optional ? ((try? container.decodeIfPresent(String.self, forKey: key)) ?? "") : try string(key)
        if optional && text.isEmpty { return nil }
        guard let bytes = parseUUID(text) else { throw .invalidRequest("\(command): \"\(key.stringValue)\" is not a UUID") }
        return bytes
    }

    private func argument<Value: Decodable>(_ key: ControlCommand.Key, _ kind: String) throws(ControlError) -> Value {
        do {
            return try container.decode(Value.self, forKey: key)
        } catch {
            throw .invalidRequest("\(command) needs \"\(key.stringValue)\" (\(kind))")
        }
    }

    /// A flag: false when left out (or null).
    func flag(_ key: ControlCommand.Key) throws(ControlError) -> Bool {
        do {
            return try container.decodeIfPresent(Bool.self, forKey: key) ?? false
        } catch {
            throw .invalidRequest("\"\(key.stringValue)\" must be true or false")
        }
    }
}

// MARK: The wire form of replies

extension ControlReply: Codable {
    enum Key: String, CodingKey {
        case ok, result, error
    }

    /// The `userInfo` key under which a decoder must hold the `ControlCommand` a reply
    /// answers: its result is read as that command's result type.
    public static let commandKey = CodingUserInfoKey(rawValue: "thinbd.control.command")!

    public func encode(to encoder: Encoder) throws {
        var container = encoder.container(keyedBy: Key.self)
        switch self {
        case .success(let result):
            try container.encode(true, forKey: .ok)
            try container.encode(result, forKey: .result)
        case .failure(let error):
            try container.encode(false, forKey: .ok)
            try container.encode(error, forKey: .error)
        }
    }

    /// Reads a reply to the command in `decoder.userInfo[ControlReply.commandKey]`. A reply
    /// without `"ok"` is a `ControlError` with code `io`.
    public init(from decoder: Decoder) throws {
        guard let command = decoder.userInfo[Self.commandKey] as? ControlCommand else {
            throw DecodingError.dataCorrupted(
                .init(codingPath: decoder.codingPath, debugDescription: "a reply is read for the command it answers (userInfo[ControlReply.commandKey])"))
        }
        let container = try decoder.container(keyedBy: Key.self)
        guard let ok = try? container.decode(Bool.self, forKey: .ok) else {
            throw ControlError(code: "io", message: "the server's reply has no \"ok\"")
        }
        if ok {
            self = .success(try command.decodeResult(from: container.superDecoder(forKey: .result)))
        } else {
            self = .failure(try container.decodeIfPresent(ControlError.self, forKey: .error) ?? ControlError(code: "io", message: "the server gave no reason"))
        }
    }
}
