import ThinFormat
import ThinPool

// The results of control commands (docs/control-api.md, "Results"): what a server sends
// back in `"result"`, and what the CLI prints for `--json`. Keys are the documented
// snake_case names; encoders sort them. Optional fields the contract allows to be null are
// `@Nullable`: written as `null`, never left out, and read back from null or a missing key.

/// A volume, snapshot or clone: in `list`, `info.volumes` and most results.
public struct VolumeSummary: Codable, Sendable, Equatable {
    public var name: String
    /// `volume`, `snapshot` or `clone`.
    public var kind: String
    public var size: UInt64
    public var mappedBytes: UInt64
    /// The volume or snapshot it came from, while that exists.
    @Nullable public var parent: String?
    public var readOnly: Bool
    /// Made by `serve --ephemeral`.
    public var ephemeral: Bool
    /// Seconds since 1970.
    public var created: UInt64
    /// NBD connections to it (0 offline).
    public var connections: UInt64
    /// The image's identity across pools and renames (null for a volume made before
    /// UUIDs existed, until the pool is next opened read-write).
    @Nullable public var uuid: String?
    /// Where its unfetched blocks come from (`thinbd clone POOL ORIGIN NAME`); null for
    /// a volume without an origin, or once hydrated.
    @Nullable public var origin: OriginSummary?

    enum CodingKeys: String, CodingKey {
        case name, kind, size, parent, ephemeral, created, connections, uuid, origin
        case mappedBytes = "mapped_bytes", readOnly = "read_only"
    }
}

/// The origin of an origin-backed volume or snapshot, as recorded at `clone`.
public struct OriginSummary: Codable, Sendable, Equatable {
    /// `nbd` or `file`.
    public var kind: String
    /// The NBD URI or the file's absolute path.
    public var address: String
    public var size: UInt64
    /// The image UUID a thinbd origin announced (null for other servers and files).
    @Nullable public var uuid: String?

    public init(kind: String, address: String, size: UInt64, uuid: String?) {
        self.kind = kind
        self.address = address
        self.size = size
        self.uuid = uuid
    }
}

extension VolumeSummary {
    public init(_ volume: VolumeInfo, connections: Int) {
        self.init(
            name: volume.name, kind: volume.kind.rawValue, size: volume.size, mappedBytes: volume.mappedBytes,
            parent: volume.parent, readOnly: volume.isReadOnly, ephemeral: volume.isEphemeral, created: volume.createdAt,
            connections: UInt64(connections), uuid: volume.uuid,
            origin: volume.origin.map { origin in
                OriginSummary(
                    kind: origin.kind == .nbd ? "nbd" : "file", address: origin.locator, size: origin.size,
                    uuid: origin.uuid == VolumeRecord.noUUID ? nil : formatUUID(origin.uuid))
            })
    }
}

/// `hello`: who answers, for which pool, and where its NBD listeners are.
public struct HelloResult: Codable, Sendable, Equatable {
    public var protocolVersion: UInt64
    /// `thinbd VERSION`.
    public var server: String
    public var pool: String
    public var served: Bool
    public var pid: UInt64
    /// NBD URIs without an export name.
    public var uris: [String]
    /// The `--metrics` URL.
    @Nullable public var metrics: String?
    /// The device and inode of the file the server has open (null for a memory pool, or
    /// from a server before these fields). A client compares them with the file now at
    /// the pool's path: a server whose file was removed or replaced must not take
    /// commands meant for the new one.
    @Nullable public var poolDevice: UInt64?
    @Nullable public var poolInode: UInt64?

    enum CodingKeys: String, CodingKey {
        case server, pool, served, pid, uris, metrics
        case protocolVersion = "protocol", poolDevice = "pool_device", poolInode = "pool_inode"
    }
}

/// `info` and `grow`: the pool's sizes, usage and volumes.
public struct PoolInfoResult: Codable, Sendable, Equatable {
    /// Space of one region of the pool file, in bytes.
    public struct Space: Codable, Sendable, Equatable {
        public var totalBytes: UInt64
        public var usedBytes: UInt64
        public var freeBytes: UInt64

        enum CodingKeys: String, CodingKey {
            case totalBytes = "total_bytes", usedBytes = "used_bytes", freeBytes = "free_bytes"
        }
    }

    public var path: String
    public var uuid: String
    public var engine: String
    public var served: Bool
    public var blockSize: UInt64
    /// Data space (the top-level `total_bytes`, `used_bytes`, `free_bytes`).
    public var totalBytes: UInt64
    public var usedBytes: UInt64
    public var freeBytes: UInt64
    public var metadata: Space
    /// The pool file's apparent size.
    public var fileBytes: UInt64
    /// What the file takes on disk, when the file system says.
    @Nullable public var allocatedFileBytes: UInt64?
    public var generation: UInt64
    /// NBD connections to all its exports.
    public var connections: UInt64
    public var volumes: [VolumeSummary]
    /// `ok`, `failed` (damage found: the pool serves reads only and commits nothing) or
    /// `needs-check` (flagged by a server that found damage). Missing from older servers.
    @Nullable public var state: String?
    /// What put the pool in fail mode.
    @Nullable public var failure: String?

    enum CodingKeys: String, CodingKey {
        case path, uuid, engine, served, metadata, generation, connections, volumes, state, failure
        case blockSize = "block_size", totalBytes = "total_bytes", usedBytes = "used_bytes", freeBytes = "free_bytes"
        case fileBytes = "file_bytes", allocatedFileBytes = "allocated_file_bytes"
    }
}

/// An entry of `exports`.
public struct ExportEntry: Codable, Sendable, Equatable {
    public var name: String
    public var connections: UInt64
}

/// `volume-create`.
public struct VolumeCreateResult: Codable, Sendable, Equatable {
    public var volume: VolumeSummary
}

/// `snapshot` and `clone`.
public struct SnapshotCloneResult: Codable, Sendable, Equatable {
    /// False when `if_missing` found it already there.
    public var created: Bool
    public var volume: VolumeSummary
}

/// `delete`.
public struct DeleteResult: Codable, Sendable, Equatable {
    public var deleted: String
    /// Clients a `force` closed.
    public var disconnected: UInt64
}

/// `rename`.
public struct RenameResult: Codable, Sendable, Equatable {
    public var volume: VolumeSummary
    public var renamedFrom: String

    enum CodingKeys: String, CodingKey {
        case volume, renamedFrom = "renamed_from"
    }
}

/// `resize`.
public struct ResizeResult: Codable, Sendable, Equatable {
    public var volume: VolumeSummary
    public var disconnected: UInt64
}

/// `rollback`.
public struct RollbackResult: Codable, Sendable, Equatable {
    public var volume: VolumeSummary
    public var snapshot: String
    public var disconnected: UInt64
}

/// `check`: the consistency check's report.
public struct CheckResult: Codable, Sendable, Equatable {
    public var clean: Bool
    /// Damage repair cannot fix.
    public var damage: [String]
    /// Counts that disagree with the trees and can be recomputed.
    public var stale: [String]
    public var leakedBlocks: UInt64
    public var repaired: Bool
    public var volumesChecked: UInt64
    public var metadataBlocksChecked: UInt64
    public var blockMappings: UInt64
    /// Volumes and snapshots that still read unfetched blocks from an origin.
    public var originBacked: [String]

    enum CodingKeys: String, CodingKey {
        case clean, damage, stale, repaired
        case leakedBlocks = "leaked_blocks", volumesChecked = "volumes_checked"
        case metadataBlocksChecked = "metadata_blocks_checked", blockMappings = "block_mappings"
        case originBacked = "origin_backed"
    }
}

extension CheckResult {
    public init(_ report: CheckReport) {
        self.init(
            clean: report.isClean, damage: report.damage, stale: report.fixable, leakedBlocks: report.leakedBlocks,
            repaired: report.repaired, volumesChecked: UInt64(report.volumesChecked),
            metadataBlocksChecked: UInt64(report.metadataBlocksChecked), blockMappings: report.dataReferences,
            originBacked: report.originBacked.map(\.name).sorted())
    }
}

/// `diff`: the byte extents whose contents may differ between two images.
public struct DiffResult: Codable, Sendable, Equatable {
    public struct Extent: Codable, Sendable, Equatable {
        public var offset: UInt64
        public var length: UInt64

        public init(offset: UInt64, length: UInt64) {
            self.offset = offset
            self.length = length
        }
    }

    public var from: String
    public var to: String
    /// False when the two share no history (then every mapped extent of either is listed).
    public var related: Bool
    public var fromSize: UInt64
    public var toSize: UInt64
    public var changedBytes: UInt64
    public var extents: [Extent]

    enum CodingKeys: String, CodingKey {
        case from, to, related, extents
        case fromSize = "from_size", toSize = "to_size", changedBytes = "changed_bytes"
    }
}

extension DiffResult {
    public init(from: String, to: String, _ differences: VolumeDifferences) {
        self.init(
            from: from, to: to, related: differences.related, fromSize: differences.fromSize, toSize: differences.toSize,
            changedBytes: differences.changedBytes,
            extents: differences.extents.map { Extent(offset: $0.lowerBound, length: UInt64($0.count)) })
    }
}

/// `hydrate`: what a step fetched and what is left.
public struct HydrateResult: Codable, Sendable, Equatable {
    public var name: String
    public var fetchedBytes: UInt64
    public var remainingBytes: UInt64
    /// Nothing is left to fetch: the origin record is dropped.
    public var complete: Bool

    public init(name: String, fetchedBytes: UInt64, remainingBytes: UInt64, complete: Bool) {
        self.name = name
        self.fetchedBytes = fetchedBytes
        self.remainingBytes = remainingBytes
        self.complete = complete
    }

    enum CodingKeys: String, CodingKey {
        case name, complete
        case fetchedBytes = "fetched_bytes", remainingBytes = "remaining_bytes"
    }
}

/// `receive`: where the receive stands after a step.
public struct ReceiveStepResult: Codable, Sendable, Equatable {
    /// The staging volume (empty once finished or aborted).
    public var staging: String
    /// `begin`: records ending at or below this image offset are already applied.
    public var appliedUpTo: UInt64
    /// `begin`: an earlier interrupted receive into the name was discarded.
    public var discardedEarlier: Bool
    /// `finish`: the snapshot made.
    @Nullable public var snapshot: VolumeSummary?

    public init(staging: String, appliedUpTo: UInt64, discardedEarlier: Bool, snapshot: VolumeSummary?) {
        self.staging = staging
        self.appliedUpTo = appliedUpTo
        self.discardedEarlier = discardedEarlier
        self.snapshot = snapshot
    }

    enum CodingKeys: String, CodingKey {
        case staging, snapshot
        case appliedUpTo = "applied_up_to", discardedEarlier = "discarded_earlier"
    }
}

/// The result of any command: which case depends on the command (`ControlCommand.decodeResult`).
/// On the wire it is just its value.
public enum ControlResult: Encodable, Sendable, Equatable {
    case hello(HelloResult)
    /// `info` and `grow`.
    case poolInfo(PoolInfoResult)
    /// `list`.
    case volumes([VolumeSummary])
    case exports([ExportEntry])
    case volumeCreated(VolumeCreateResult)
    /// `snapshot` and `clone`.
    case snapshotOrClone(SnapshotCloneResult)
    case deleted(DeleteResult)
    case renamed(RenameResult)
    case resized(ResizeResult)
    case rolledBack(RollbackResult)
    /// `limit` and `limits`: the rules in force.
    case limits([ExportLimitRule])
    case check(CheckResult)
    case differences(DiffResult)
    case received(ReceiveStepResult)
    case hydrated(HydrateResult)

    /// The result itself, to encode or to cast to its type.
    public var value: any Encodable & Sendable {
        switch self {
        case .hello(let value): value
        case .poolInfo(let value): value
        case .volumes(let value): value
        case .exports(let value): value
        case .volumeCreated(let value): value
        case .snapshotOrClone(let value): value
        case .deleted(let value): value
        case .renamed(let value): value
        case .resized(let value): value
        case .rolledBack(let value): value
        case .limits(let value): value
        case .check(let value): value
        case .differences(let value): value
        case .received(let value): value
        case .hydrated(let value): value
        }
    }

    public func encode(to encoder: Encoder) throws { try value.encode(to: encoder) }
}

extension ControlCommand {
    /// Reads this command's result: each command has one result type.
    public func decodeResult(from decoder: Decoder) throws -> ControlResult {
        switch self {
        case .hello: .hello(try HelloResult(from: decoder))
        case .info, .grow: .poolInfo(try PoolInfoResult(from: decoder))
        case .list: .volumes(try [VolumeSummary](from: decoder))
        case .exports: .exports(try [ExportEntry](from: decoder))
        case .createVolume: .volumeCreated(try VolumeCreateResult(from: decoder))
        case .snapshot, .clone, .cloneOrigin: .snapshotOrClone(try SnapshotCloneResult(from: decoder))
        case .delete: .deleted(try DeleteResult(from: decoder))
        case .rename: .renamed(try RenameResult(from: decoder))
        case .resize: .resized(try ResizeResult(from: decoder))
        case .rollback: .rolledBack(try RollbackResult(from: decoder))
        case .setLimit, .limits: .limits(try [ExportLimitRule](from: decoder))
        case .check: .check(try CheckResult(from: decoder))
        case .diff: .differences(try DiffResult(from: decoder))
        case .receive: .received(try ReceiveStepResult(from: decoder))
        case .hydrate: .hydrated(try HydrateResult(from: decoder))
        }
    }
}

/// An optional field the contract writes as `null` when it has no value. (Synthesized
/// `Codable` leaves nil out; the documented objects always have every key.) Reading takes
/// null or a missing key as nil.
@propertyWrapper
public struct Nullable<Value: Codable & Sendable & Equatable>: Codable, Sendable, Equatable {
    public var wrappedValue: Value?

    public init(wrappedValue: Value?) {
        self.wrappedValue = wrappedValue
    }

    public init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        wrappedValue = container.decodeNil() ? nil : try container.decode(Value.self)
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        if let wrappedValue {
            try container.encode(wrappedValue)
        } else {
            try container.encodeNil()
        }
    }
}

extension KeyedDecodingContainer {
    /// Synthesized `init(from:)` calls this for `@Nullable` fields: a missing key is nil, as null is.
    public func decode<Value>(_ type: Nullable<Value>.Type, forKey key: Key) throws -> Nullable<Value> {
        try decodeIfPresent(type, forKey: key) ?? Nullable(wrappedValue: nil)
    }
}
