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
/// control socket (with `served`) and the offline CLI (without). Results are the typed
/// objects of docs/control-api.md (`ControlResult`); the CLI prints them for `--json`.
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

    /// Runs `body` with `names` closed to clients when served (see `ServedExports`);
    /// returns how many clients were disconnected.
    func closing(_ names: [String], force: Bool, _ body: () throws(PoolError) -> Void) throws(ControlError) -> UInt64 {
        guard let served else {
            try pooled(body)
            return 0
        }
        return UInt64(try served.whileClosed(names, disconnect: force) { () throws(ControlError) in try pooled(body) })
    }

    /// Runs `command`; its result's case is the one `ControlCommand.decodeResult` reads.
    public func run(_ command: ControlCommand) throws(ControlError) -> ControlResult {
        switch command {
        case .hello:
            let identity = pool.fileIdentity
            return .hello(
                HelloResult(
                    protocolVersion: ControlCommand.protocolVersion, server: "thinbd \(ControlEndpoint.version)", pool: pool.path,
                    served: served != nil, pid: UInt64(SystemInfo.processID), uris: served?.serverURIs ?? [],
                    metrics: served?.metricsURL, poolDevice: identity?.device, poolInode: identity?.inode))
        case .info:
            return .poolInfo(poolInfo(pool.info()))
        case .diff(let from, let to, let window):
            let found = try pooled { () throws(PoolError) in try pool.differences(from: from.isEmpty ? nil : from, to: to, in: window) }
            return .differences(DiffResult(from: from, to: to, found))
        case .receive(let request):
            return .received(try receive(request))
        case .hydrate(let name, let window):
            let step = try pooled { () throws(PoolError) in try pool.hydrate(name, window: window) }
            return .hydrated(HydrateResult(name: name, fetchedBytes: step.fetchedBytes, remainingBytes: step.remainingBytes, complete: step.complete))
        case .cloneOrigin(let name, let origin):
            let made = try pooled { () throws(PoolError) in try pool.createOriginClone(name, origin: origin) }
            return .snapshotOrClone(SnapshotCloneResult(created: true, volume: volume(made)))
        case .list:
            return .volumes(list())
        case .createVolume(let name, let size):
            return .volumeCreated(VolumeCreateResult(volume: volume(try pooled { () throws(PoolError) in try pool.createVolume(name, size: size) })))
        case .delete(let name, let force):
            // Checked before any client is disconnected for it.
            _ = try volumeInfo(name)
            let disconnected = try closing([name], force: force) { () throws(PoolError) in try pool.delete(name) }
            return .deleted(DeleteResult(deleted: name, disconnected: disconnected))
        case .rename(let from, let to):
            // Clients keep their connection: exports are bound to the volume, not its name.
            try pooled { () throws(PoolError) in try pool.rename(from, to: to) }
            served?.renamed(from: from, to: to)
            return .renamed(RenameResult(volume: volume(try volumeInfo(to)), renamedFrom: from))
        case .resize(let name, let size, let force):
            let current = try volumeInfo(name)
            var disconnected: UInt64 = 0
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
            return .resized(ResizeResult(volume: volume(try volumeInfo(name)), disconnected: disconnected))
        case .snapshot(let name, let ifMissing):
            let (made, created) = try pooled { () throws(PoolError) in try pool.snapshot(name, ifMissing: ifMissing) }
            return .snapshotOrClone(SnapshotCloneResult(created: created, volume: volume(made)))
        case .clone(let source, let name, let ifMissing):
            let (made, created) = try pooled { () throws(PoolError) in try pool.clone(source, as: name, ifMissing: ifMissing) }
            return .snapshotOrClone(SnapshotCloneResult(created: created, volume: volume(made)))
        case .rollback(let snapshot, let force):
            // Everything that can be checked is, before any client is disconnected for it.
            guard let parts = VolumeName.splitSnapshot(snapshot) else {
                throw ControlError(.invalidName(snapshot, reason: "rollback takes VOLUME@SNAPSHOT"))
            }
            let volumeName = String(parts.volume)
            let target = try volumeInfo(snapshot)
            _ = try volumeInfo(volumeName)
            guard target.kind == .snapshot, target.parent == volumeName else {
                throw ControlError(.invalidArgument("\(snapshot) is not a snapshot of volume \(volumeName)"))
            }
            let disconnected = try closing([volumeName], force: force) { () throws(PoolError) in try pool.rollback(snapshot) }
            return .rolledBack(RollbackResult(volume: volume(try volumeInfo(volumeName)), snapshot: snapshot, disconnected: disconnected))
        case .check:
            // Served: the last commit, pinned and walked without the pool lock, so the
            // check never holds up clients. Offline: the whole state, under the lock.
            return .check(CheckResult(served == nil ? pool.check(repair: false) : pool.checkCommittedState()))
        case .grow(let size):
            try pooled { () throws(PoolError) in try pool.grow(to: size) }
            return .poolInfo(poolInfo(pool.info()))
        case .setLimit(let rule):
            guard let served else { throw ControlError(code: "not-served", message: "limits apply to a served pool; start thinbd serve first") }
            guard !rule.pattern.isEmpty else { throw ControlError(code: "invalid-argument", message: "a limit needs an export pattern") }
            return .limits(served.setLimit(rule))
        case .limits:
            guard let served else { throw ControlError(code: "not-served", message: "limits apply to a served pool; start thinbd serve first") }
            return .limits(served.limits())
        case .exports:
            guard let served else { throw ControlError(code: "not-served", message: "the pool is not served") }
            let counts = served.connectionCounts()
            return .exports(pool.listVolumes().map { ExportEntry(name: $0.name, connections: UInt64(counts[$0.name] ?? 0)) })
        }
    }

    func receive(_ request: ReceiveRequest) throws(ControlError) -> ReceiveStepResult {
        switch request.step {
        case .begin:
            // An incremental stream replaces NAME's contents: like rollback, not under
            // connected clients unless forced (they are disconnected at `finish`).
            if request.header.isIncremental, !request.force, let clients = served?.connectionCounts()[request.name], clients > 0 {
                throw ControlError(
                    code: "in-use",
                    message: "\(request.name) has \(clients) connected client\(clients == 1 ? "" : "s"); receiving replaces its contents: disconnect them, or pass --force")
            }
            let plan = try pooled { () throws(PoolError) in
                try pool.beginReceive(request.header, into: request.name, resume: request.resume, force: request.force)
            }
            return ReceiveStepResult(staging: plan.staging, appliedUpTo: plan.appliedUpTo, discardedEarlier: plan.discardedEarlier, snapshot: nil)
        case .progress:
            try pooled { () throws(PoolError) in try pool.recordReceiveProgress(staging: request.staging, appliedUpTo: request.appliedUpTo) }
            return ReceiveStepResult(staging: request.staging, appliedUpTo: request.appliedUpTo, discardedEarlier: false, snapshot: nil)
        case .finish:
            // The staging volume's connection (the receiving CLI's) is done with it; clients
            // of NAME (allowed by --force at `begin`) must not see its contents change.
            var made: VolumeInfo?
            let closed = request.header.isIncremental ? [request.staging, request.name] : [request.staging]
            _ = try closing(closed, force: true) { () throws(PoolError) in
                made = try pool.finishReceive(request.header, staging: request.staging, into: request.name)
            }
            return ReceiveStepResult(staging: "", appliedUpTo: request.header.imageSize, discardedEarlier: false, snapshot: made.map(volume))
        case .abort:
            _ = try closing([request.staging], force: true) { () throws(PoolError) in try pool.abortReceive(staging: request.staging) }
            return ReceiveStepResult(staging: "", appliedUpTo: 0, discardedEarlier: false, snapshot: nil)
        }
    }

    /// Every volume, as `list` returns them.
    public func list() -> [VolumeSummary] {
        let counts = served?.connectionCounts() ?? [:]
        return pool.listVolumes().map { VolumeSummary($0, connections: counts[$0.name] ?? 0) }
    }

    func volumeInfo(_ name: String) throws(ControlError) -> VolumeInfo {
        try pooled { () throws(PoolError) in try pool.volumeInfo(name) }
    }

    func volume(_ volume: VolumeInfo) -> VolumeSummary {
        VolumeSummary(volume, connections: served?.connectionCounts()[volume.name] ?? 0)
    }

    func poolInfo(_ info: PoolInfo) -> PoolInfoResult {
        let counts = served?.connectionCounts() ?? [:]
        return PoolInfoResult(
            path: info.path, uuid: info.uuidString, engine: info.engine, served: served != nil, blockSize: info.blockSize,
            totalBytes: info.dataTotalBytes, usedBytes: info.dataUsedBytes, freeBytes: info.dataFreeBytes,
            metadata: PoolInfoResult.Space(
                totalBytes: info.metadataTotalBytes, usedBytes: info.metadataUsedBytes, freeBytes: info.metadataFreeBytes),
            fileBytes: info.fileBytes, allocatedFileBytes: info.allocatedFileBytes, generation: info.generation,
            connections: UInt64(counts.values.reduce(0, +)), volumes: info.volumes.map { VolumeSummary($0, connections: counts[$0.name] ?? 0) },
            state: info.state, failure: info.failure?.reason)
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
        case .corrupt, .truncated, .notAPool, .failed, .needsCheck: code = "corrupt"
        case .inUse: code = "busy"
        case .io, .closed, .originUnavailable, .originMismatch: code = "io"
        }
        self.init(code: code, message: error.description)
    }
}
