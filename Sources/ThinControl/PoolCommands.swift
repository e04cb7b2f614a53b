import ThinPool
import ThinSystem

/// What a serving process knows that the pool does not: who is connected. The control
/// server passes one to `PoolCommands`; offline there is none.
public protocol ServedExports: AnyObject, Sendable {
    /// Open connections per export name (names with none are left out).
    func connectionCounts() -> [String: Int]

    /// The server's NBD URIs without an export name (`nbd+unix:///?socket=...`,
    /// `nbd://127.0.0.1:10809`), so that tools can copy data through it.
    var serverURIs: [String] { get }

    /// Where `--metrics` serves Prometheus metrics, if it does.
    var metricsURL: String? { get }

    /// A volume (and its snapshots) or a snapshot was renamed: its connections now count
    /// under the new name.
    func renamed(from old: String, to new: String)

    /// Refuses new connections to `names`; then, if some are connected, either closes
    /// them (`disconnect`: running requests finish, queued ones get ESHUTDOWN) or fails
    /// with `in-use`. Runs `body`, admits connections again, and returns how many were
    /// closed.
    func whileClosed(_ names: [String], disconnect: Bool, _ body: () throws(ControlError) -> Void) throws(ControlError) -> Int

    /// Sets (or, with both rates 0, lifts) the limit of exports matching the rule's
    /// pattern, for connections already open too; returns the rules now in force.
    func setLimit(_ rule: ExportLimitRule) -> [ExportLimitRule]

    /// The rate-limit rules in force, most recent last (the last match wins).
    func limits() -> [ExportLimitRule]
}

/// Runs control commands on an open pool: the one implementation behind both the
/// control socket (with `served`) and the offline CLI (without). Results are the JSON
/// documented in docs/control-api.md; the CLI prints them as they are for `--json`.
///
/// Cost and safety are those of the pool operation each command maps to; management
/// operations commit before they return, so a reply of success means it is durable.
public struct PoolCommands: Sendable {
    public let pool: Pool
    public let served: ServedExports?

    public init(pool: Pool, served: ServedExports?) {
        self.pool = pool
        self.served = served
    }

    public func perform(_ command: ControlCommand) -> ControlReply {
        do throws(ControlError) {
            return .success(try run(command))
        } catch {
            return .failure(error)
        }
    }

    func pooled<T>(_ body: () throws(PoolError) -> T) throws(ControlError) -> T {
        do throws(PoolError) {
            return try body()
        } catch {
            throw ControlError(error)
        }
    }

    /// Runs `body` with `names` closed to clients when served (see `ServedExports`).
    func closing(_ names: [String], force: Bool, _ body: () throws(PoolError) -> Void) throws(ControlError) -> Int {
        guard let served else {
            try pooled(body)
            return 0
        }
        return try served.whileClosed(names, disconnect: force) { () throws(ControlError) in try pooled(body) }
    }

    func run(_ command: ControlCommand) throws(ControlError) -> JSON {
        switch command {
        case .hello:
            return .object([
                ("protocol", .number(ControlCommand.protocolVersion)),
                ("server", .string("thinbd \(ControlEndpoint.version)")),
                ("pool", .string(pool.path)),
                ("served", .bool(served != nil)),
                ("pid", .number(UInt64(SystemInfo.processID))),
                ("uris", .array((served?.serverURIs ?? []).map { .string($0) })),
                ("metrics", served?.metricsURL.map { .string($0) } ?? .null),
            ])
        case .info:
            return infoJSON(pool.info())
        case .list:
            return listJSON()
        case .createVolume(let name, let size):
            return .object([("volume", volumeJSON(try pooled { () throws(PoolError) in try pool.createVolume(name, size: size) }))])
        case .delete(let name, let force):
            // Checked before any client is disconnected for it.
            _ = try pooled { () throws(PoolError) in try pool.volumeInfo(name) }
            let disconnected = try closing([name], force: force) { () throws(PoolError) in try pool.delete(name) }
            return .object([("deleted", .string(name)), ("disconnected", .number(UInt64(disconnected)))])
        case .rename(let from, let to):
            // Clients keep their connection: exports are bound to the volume, not its name.
            try pooled { () throws(PoolError) in try pool.rename(from, to: to) }
            served?.renamed(from: from, to: to)
            return .object([("volume", volumeJSON(try pooled { () throws(PoolError) in try pool.volumeInfo(to) })), ("renamed_from", .string(from))])
        case .resize(let name, let size, let force):
            let current = try pooled { () throws(PoolError) in try pool.volumeInfo(name) }
            var disconnected = 0
            guard current.kind != .snapshot else { throw ControlError(.readOnly("snapshot \(name)")) }
            guard size > 0, size <= Pool.maxVolumeSize else {
                throw ControlError(code: "invalid-argument", message: "volume size must be between 1 byte and 1 EiB")
            }
            if size < current.size {
                // Clients were told the old size; shrinking under them would fail their writes.
                disconnected = try closing([name], force: force) { () throws(PoolError) in try pool.resize(name, to: size) }
            } else {
                try pooled { () throws(PoolError) in try pool.resize(name, to: size) }
            }
            return .object([
                ("volume", volumeJSON(try pooled { () throws(PoolError) in try pool.volumeInfo(name) })),
                ("disconnected", .number(UInt64(disconnected))),
            ])
        case .snapshot(let name, let ifMissing):
            let (volume, created) = try pooled { () throws(PoolError) in try pool.snapshot(name, ifMissing: ifMissing) }
            return .object([("created", .bool(created)), ("volume", volumeJSON(volume))])
        case .clone(let source, let name, let ifMissing):
            let (volume, created) = try pooled { () throws(PoolError) in try pool.clone(source, as: name, ifMissing: ifMissing) }
            return .object([("created", .bool(created)), ("volume", volumeJSON(volume))])
        case .rollback(let snapshot, let force):
            // Everything that can be checked is, before any client is disconnected for it.
            guard let (volume, _) = VolumeName.splitSnapshot(snapshot) else {
                throw ControlError(.invalidName(snapshot, reason: "rollback takes VOLUME@SNAPSHOT"))
            }
            let volumeName = String(volume)
            let target = try pooled { () throws(PoolError) in try pool.volumeInfo(snapshot) }
            _ = try pooled { () throws(PoolError) in try pool.volumeInfo(volumeName) }
            guard target.kind == .snapshot, target.parent == volumeName else {
                throw ControlError(.invalidArgument("\(snapshot) is not a snapshot of volume \(volumeName)"))
            }
            let disconnected = try closing([volumeName], force: force) { () throws(PoolError) in try pool.rollback(snapshot) }
            return .object([
                ("volume", volumeJSON(try pooled { () throws(PoolError) in try pool.volumeInfo(volumeName) })),
                ("snapshot", .string(snapshot)),
                ("disconnected", .number(UInt64(disconnected))),
            ])
        case .check:
            // Served: the last commit, pinned and walked without the pool lock, so the
            // check never holds up clients. Offline: the whole state, under the lock.
            return (served == nil ? pool.check(repair: false) : pool.checkCommittedState()).json
        case .grow(let size):
            try pooled { () throws(PoolError) in try pool.grow(to: size) }
            return infoJSON(pool.info())
        case .setLimit(let rule):
            guard let served else { throw ControlError(code: "not-served", message: "limits apply to a served pool; start thinbd serve first") }
            guard !rule.pattern.isEmpty else { throw ControlError(code: "invalid-argument", message: "a limit needs an export pattern") }
            return .array(served.setLimit(rule).map(\.json))
        case .limits:
            guard let served else { throw ControlError(code: "not-served", message: "limits apply to a served pool; start thinbd serve first") }
            return .array(served.limits().map(\.json))
        case .exports:
            guard let served else { throw ControlError(code: "not-served", message: "the pool is not served") }
            let counts = served.connectionCounts()
            return .array(pool.listVolumes().map { volume in
                .object([("name", .string(volume.name)), ("connections", .number(UInt64(counts[volume.name] ?? 0)))])
            })
        }
    }

    /// Every volume, as `list` returns them.
    public func listJSON() -> JSON {
        let counts = served?.connectionCounts() ?? [:]
        return .array(pool.listVolumes().map { volumeJSON($0, connections: counts[$0.name] ?? 0) })
    }

    func volumeJSON(_ volume: VolumeInfo) -> JSON {
        volumeJSON(volume, connections: served?.connectionCounts()[volume.name] ?? 0)
    }

    /// A volume as results describe it.
    public func volumeJSON(_ volume: VolumeInfo, connections: Int) -> JSON {
        .object([
            ("name", .string(volume.name)),
            ("kind", .string(volume.kind.rawValue)),
            ("size", .number(volume.size)),
            ("mapped_bytes", .number(volume.mappedBytes)),
            ("parent", volume.parent.map { .string($0) } ?? .null),
            ("read_only", .bool(volume.isReadOnly)),
            ("ephemeral", .bool(volume.isEphemeral)),
            ("created", .number(volume.createdAt)),
            ("connections", .number(UInt64(connections))),
        ])
    }

    func infoJSON(_ info: PoolInfo) -> JSON {
        let counts = served?.connectionCounts() ?? [:]
        return .object([
            ("path", .string(info.path)),
            ("uuid", .string(info.uuidString)),
            ("engine", .string(info.engine)),
            ("served", .bool(served != nil)),
            ("block_size", .number(info.blockSize)),
            ("total_bytes", .number(info.dataTotalBytes)),
            ("used_bytes", .number(info.dataUsedBytes)),
            ("free_bytes", .number(info.dataFreeBytes)),
            ("metadata", .object([
                ("total_bytes", .number(info.metadataTotalBytes)),
                ("used_bytes", .number(info.metadataUsedBytes)),
                ("free_bytes", .number(info.metadataFreeBytes)),
            ])),
            ("file_bytes", .number(info.fileBytes)),
            ("allocated_file_bytes", info.allocatedFileBytes.map { .number($0) } ?? .null),
            ("generation", .number(info.generation)),
            ("connections", .number(UInt64(counts.values.reduce(0, +)))),
            ("volumes", .array(info.volumes.map { volumeJSON($0, connections: counts[$0.name] ?? 0) })),
        ])
    }
}

extension CheckReport {
    /// The report as `check --json` prints it.
    public var json: JSON {
        .object([
            ("clean", .bool(isClean)),
            ("damage", .array(damage.map { .string($0) })),
            ("stale", .array(fixable.map { .string($0) })),
            ("leaked_blocks", .number(leakedBlocks)),
            ("repaired", .bool(repaired)),
            ("volumes_checked", .number(UInt64(volumesChecked))),
            ("metadata_blocks_checked", .number(UInt64(metadataBlocksChecked))),
            ("block_mappings", .number(dataReferences)),
        ])
    }
}

extension ControlError {
    /// The stable code for an engine error, with its message.
    public init(_ error: PoolError) {
        let code: String
        switch error {
        case .noSuchVolume: code = "no-such-volume"
        case .noSuchFile: code = "no-such-file"
        case .volumeExists, .fileExists: code = "exists"
        case .invalidName, .invalidArgument, .outOfRange: code = "invalid-argument"
        case .readOnly: code = "read-only"
        case .noDataSpace, .noMetadataSpace: code = "no-space"
        case .corrupt, .truncated, .notAPool: code = "corrupt"
        case .inUse: code = "busy"
        case .io, .closed: code = "io"
        }
        self.init(code: code, message: error.description)
    }
}
