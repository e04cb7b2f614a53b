import ThinFormat
import ThinMetadata
import ThinSystem

/// Volume management. Each operation validates its arguments, changes the in-memory
/// state, and commits before returning: a volume, snapshot or clone that an operation
/// reported is durable. Ephemeral volumes are the exception: they are made and deleted
/// without a commit of their own (they do not outlive a crash; the next commit takes
/// them along).
extension Pool {
    /// Largest virtual size of a volume (the NBD size field is 64-bit; keep block math safe).
    public static let maxVolumeSize: UInt64 = 1 << 60

    func withWritableLock<T>(_ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        try lock.withLock { () throws(PoolError) -> T in
            guard !isClosed else { throw .closed }
            guard !isReadOnly else { throw .readOnly("pool \(path) (opened read-only)") }
            try refuseChangesIfFailed()
            return try body()
        }
    }

    /// Runs a volume operation with the volume's whole block range locked (so writes in
    /// flight to it finish first and none start), then under the pool lock. Operations
    /// on a name that does not exist fail before locking anything.
    func withVolumeExclusive<T>(_ name: Substring, _ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        let id = try lock.withLock { () throws(PoolError) in try state(named: String(name)).record.id }
        return try rangeLocks.withRange(id, 0..<UInt64.max) { () throws(PoolError) -> T in
            try withWritableLock(body)
        }
    }

    func state(named name: String) throws(PoolError) -> VolumeState {
        guard let id = names[name], let state = volumes[id] else { throw .noSuchVolume(name) }
        return state
    }

    func checkNewName(_ name: String) throws(PoolError) {
        if let (volume, snapshot) = VolumeName.splitSnapshot(name) {
            if let why = VolumeName.validate(volume) ?? VolumeName.validate(snapshot) {
                throw .invalidName(name, reason: why)
            }
        } else if let why = VolumeName.validate(Substring(name)) {
            throw .invalidName(name, reason: why)
        }
        if names[name] != nil { throw .volumeExists(name) }
    }

    func checkVolumeSize(_ size: UInt64) throws(PoolError) {
        guard size > 0 else { throw .invalidArgument("volume size must be greater than zero") }
        guard size <= Self.maxVolumeSize else { throw .invalidArgument("volume size must be at most 1 EiB") }
    }

    func addVolume(_ record: VolumeRecord) -> VolumeState {
        let state = VolumeState(record: record, recordBlock: 0, dirty: true)
        volumes[record.id] = state
        names[record.name] = record.id
        superblock.nextVolumeID = record.id + 1
        return state
    }

    /// Finishes a management operation: commit, and on failure report it unchanged
    /// as far as the caller is concerned (the in-memory state is reloaded on next open).
    /// Without `commit` the change waits for the next commit (FLUSH, auto-commit): for
    /// ephemeral volumes, which do not outlive a crash anyway (the next server deletes
    /// what is left), so a CI host starting forty builds pays no forty commits.
    func finishManagement(commit: Bool = true) throws(PoolError) {
        if commit { try commitLocked() }
    }

    /// One volume's description. Shared access: it does not wait for a commit's I/O.
    public func volumeInfo(_ name: String) throws(PoolError) -> VolumeInfo {
        try lock.withSharedAccess { () throws(PoolError) in describe(try state(named: name)) }
    }

    /// Every volume, sorted by name. O(volumes), shared access.
    public func listVolumes() -> [VolumeInfo] {
        lock.withSharedAccess { volumes.values.map { describe($0) }.sorted { $0.name < $1.name } }
    }

    /// Creates an empty thin volume. Its size may exceed the pool (overcommit). O(1).
    @discardableResult
    public func createVolume(_ name: String, size: UInt64) throws(PoolError) -> VolumeInfo {
        try createVolume(name, size: size, ephemeral: false)
    }

    /// `createVolume`, optionally marked ephemeral (see `VolumeInfo.isEphemeral`); an
    /// ephemeral volume is made durable by the next commit, not by one of its own.
    public func createVolume(_ name: String, size: UInt64, ephemeral: Bool) throws(PoolError) -> VolumeInfo {
        try withWritableLock { () throws(PoolError) in
            guard VolumeName.splitSnapshot(name) == nil else {
                throw .invalidName(name, reason: "volume names cannot contain '@' (that names a snapshot)")
            }
            try checkNewName(name)
            try checkVolumeSize(size)
            let record = VolumeRecord(
                id: superblock.nextVolumeID, kind: .volume, name: name, virtualSize: size,
                createdAt: SystemInfo.wallClockSeconds(), flags: ephemeral ? VolumeRecord.ephemeralFlag : 0)
            let state = addVolume(record)
            try finishManagement(commit: !ephemeral)
            return describe(state)
        }
    }

    /// Takes a read-only snapshot `VOL@SNAP` of volume VOL. O(1) in the volume's size:
    /// it shares the mapping root and adds one reference to it.
    @discardableResult
    public func snapshot(_ fullName: String) throws(PoolError) -> VolumeInfo {
        try snapshot(fullName, ifMissing: false).volume
    }

    /// Takes snapshot `VOL@SNAP` unless it exists already; `created` says which. The
    /// check and the creation are one step, so callers racing in this process (or, with
    /// the pool lock, in others) create it exactly once.
    public func snapshot(_ fullName: String, ifMissing: Bool) throws(PoolError) -> (volume: VolumeInfo, created: Bool) {
        guard let (volumeName, _) = VolumeName.splitSnapshot(fullName) else {
            throw .invalidName(fullName, reason: "a snapshot is named VOLUME@SNAPSHOT")
        }
        return try withVolumeExclusive(volumeName) { () throws(PoolError) in
            if ifMissing, let existing = try? state(named: fullName) { return (describe(existing), false) }
            let origin = try state(named: String(volumeName))
            guard origin.record.kind == .volume else {
                throw .invalidArgument("\(volumeName) is a snapshot; snapshots are taken of volumes")
            }
            try checkNewName(fullName)
            try mapErrors { try mappings.retain(origin.record.mappingRoot) }
            let record = VolumeRecord(
                id: superblock.nextVolumeID, parentID: origin.record.id, ownerID: origin.record.id, kind: .snapshot,
                name: fullName, virtualSize: origin.record.virtualSize, mappingRoot: origin.record.mappingRoot,
                mappedBlocks: origin.record.mappedBlocks, createdAt: SystemInfo.wallClockSeconds())
            let state = addVolume(record)
            try finishManagement()
            return (describe(state), true)
        }
    }

    /// Creates writable volume `name` from a volume or snapshot. O(1), like a snapshot.
    @discardableResult
    public func clone(_ sourceName: String, as name: String) throws(PoolError) -> VolumeInfo {
        try clone(sourceName, as: name, ifMissing: false).volume
    }

    /// Clones `sourceName` as `name` unless a clone of it by that name exists already
    /// (`created` says which); a volume of that name with another origin is an error.
    /// Check and creation are one step, as for `snapshot(_:ifMissing:)`. An ephemeral
    /// clone is made durable by the next commit, not by one of its own.
    public func clone(_ sourceName: String, as name: String, ifMissing: Bool, ephemeral: Bool = false) throws(PoolError) -> (volume: VolumeInfo, created: Bool) {
        try withVolumeExclusive(Substring(sourceName)) { () throws(PoolError) in
            let source = try state(named: sourceName)
            if ifMissing, let existing = try? state(named: name) {
                guard existing.record.parentID == source.record.id else {
                    throw .invalidArgument("\(name) exists but is not a clone of \(sourceName)")
                }
                return (describe(existing), false)
            }
            guard VolumeName.splitSnapshot(name) == nil else {
                throw .invalidName(name, reason: "a clone is a volume; its name cannot contain '@'")
            }
            try checkNewName(name)
            try mapErrors { try mappings.retain(source.record.mappingRoot) }
            let record = VolumeRecord(
                id: superblock.nextVolumeID, parentID: source.record.id, kind: .volume, name: name,
                virtualSize: source.record.virtualSize, mappingRoot: source.record.mappingRoot,
                mappedBlocks: source.record.mappedBlocks, createdAt: SystemInfo.wallClockSeconds(),
                flags: ephemeral ? VolumeRecord.ephemeralFlag : 0)
            let state = addVolume(record)
            try finishManagement(commit: !ephemeral)
            return (describe(state), true)
        }
    }

    /// Makes volume VOL's contents (and size) those of its snapshot `VOL@SNAP`.
    /// O(1) plus freeing the blocks only the old contents used.
    public func rollback(_ snapshotName: String) throws(PoolError) {
        guard let (volumeName, _) = VolumeName.splitSnapshot(snapshotName) else {
            throw .invalidName(snapshotName, reason: "rollback takes VOLUME@SNAPSHOT")
        }
        try withVolumeExclusive(volumeName) { () throws(PoolError) in
            let snapshot = try state(named: snapshotName)
            let volume = try state(named: String(volumeName))
            guard snapshot.record.kind == .snapshot, snapshot.record.ownerID == volume.record.id else {
                throw .invalidArgument("\(snapshotName) is not a snapshot of volume \(volumeName)")
            }
            try store.usingReserve { () throws(PoolError) in
                try mapErrors {
                    try mappings.retain(snapshot.record.mappingRoot)
                    try mappings.release(volume.record.mappingRoot)
                }
            }
            volume.record.mappingRoot = snapshot.record.mappingRoot
            volume.record.mappedBlocks = snapshot.record.mappedBlocks
            volume.record.virtualSize = snapshot.record.virtualSize
            volume.dirty = true
            try finishManagement()
        }
    }

    /// Deletes a volume or snapshot. Blocks it shares stay for the others; the rest
    /// return to the pool. Its snapshots stay (named as before); its clones stay.
    /// Cost: O(blocks only it referenced).
    public func delete(_ name: String) throws(PoolError) {
        try withVolumeExclusive(Substring(name)) { () throws(PoolError) in
            let victim = try state(named: name)
            let id = victim.record.id
            try store.usingReserve { () throws(PoolError) in
                try mapErrors {
                    try mappings.release(victim.record.mappingRoot)
                    if victim.recordBlock != 0 {
                        let (root, removed) = try volumeTable.remove(volumeTableRoot, id)
                        volumeTableRoot = root
                        if let removed { try store.decRef(removed, .volumeRecord) }
                    }
                }
            }
            volumes[id] = nil
            names[name] = nil
            for other in volumes.values {
                if other.record.parentID == id {
                    other.record.parentID = 0
                    other.dirty = true
                }
                if other.record.ownerID == id {
                    other.record.ownerID = 0
                    other.dirty = true
                }
            }
            try finishManagement(commit: !victim.record.isEphemeral)
        }
    }

    /// Renames a volume (its snapshots follow: `OLD@S` becomes `NEW@S`) or a snapshot
    /// (within its volume: `VOL@OLD` to `VOL@NEW`). An ephemeral volume becomes ordinary.
    public func rename(_ oldName: String, to newName: String) throws(PoolError) {
        try withWritableLock { () throws(PoolError) in
            let target = try state(named: oldName)
            if target.record.kind == .snapshot {
                guard let (oldVolume, _) = VolumeName.splitSnapshot(oldName),
                    let (newVolume, _) = VolumeName.splitSnapshot(newName), oldVolume == newVolume
                else {
                    throw .invalidName(newName, reason: "a snapshot keeps its volume: rename \(oldName) to \(VolumeName.splitSnapshot(oldName).map { String($0.volume) } ?? "VOL")@NEWNAME")
                }
            } else if VolumeName.splitSnapshot(newName) != nil {
                throw .invalidName(newName, reason: "volume names cannot contain '@'")
            }
            try checkNewName(newName)
            var renames: [(VolumeState, String)] = [(target, newName)]
            if target.record.kind == .volume {
                for other in volumes.values where other.record.ownerID == target.record.id {
                    guard let (_, snap) = VolumeName.splitSnapshot(other.record.name) else { continue }
                    let renamed = "\(newName)@\(snap)"
                    if names[renamed] != nil { throw .volumeExists(renamed) }
                    renames.append((other, renamed))
                }
            }
            for (state, name) in renames {
                names[state.record.name] = nil
                state.record.name = name
                names[name] = state.record.id
                state.dirty = true
            }
            // A renamed ephemeral volume is one somebody wants: it becomes ordinary, so
            // no server deletes it (by its old name's rules, or as a leftover).
            target.record.flags &= ~VolumeRecord.ephemeralFlag
            try finishManagement()
        }
    }

    /// Grows or shrinks a volume. Shrinking unmaps every block past the new end and
    /// zeroes the tail of the last partial block, so growing again reads zeros.
    public func resize(_ name: String, to newSize: UInt64) throws(PoolError) {
        try withVolumeExclusive(Substring(name)) { () throws(PoolError) in
            let volume = try state(named: name)
            guard volume.record.kind == .volume else { throw .readOnly("snapshot \(name)") }
            try checkVolumeSize(newSize)
            if newSize < volume.record.virtualSize {
                try store.usingReserve { () throws(PoolError) in
                    let tail = newSize % blockSize
                    if tail != 0 {
                        try zeroLocked(volume, from: newSize, count: blockSize - tail, unmapWholeBlocks: true)
                    }
                    let firstGone = (newSize + blockSize - 1) / blockSize
                    try unmapLocked(volume, blocks: firstGone..<UInt64.max)
                }
            }
            volume.record.virtualSize = newSize
            volume.dirty = true
            try finishManagement()
        }
    }

    /// Grows the pool's data region to `newSize` bytes (rounded down to whole blocks).
    /// The backing file is extended sparsely.
    public func grow(to newSize: UInt64) throws(PoolError) {
        try withWritableLock { () throws(PoolError) in
            try growLocked(to: newSize)
            try finishManagement()
        }
    }

    /// `grow` without the commit; needs the pool lock. The new size is committed with
    /// the next transaction (until then a crash leaves the old size: the file's extra
    /// sparse bytes are unused).
    func growLocked(to newSize: UInt64) throws(PoolError) {
        do {
            let newBlocks = newSize / blockSize
            guard newBlocks >= spaceMap.dataBlocks else {
                throw .invalidArgument("pools only grow: \(newSize) bytes is less than the current \(spaceMap.dataBlocks * blockSize)")
            }
            guard newBlocks > spaceMap.dataBlocks else { return }
            let metadataBytes = store.regionBlocks * UInt64(MetadataLayout.blockSize)
            guard metadataBytes / newBlocks >= PoolGeometry.minimumMetadataBytesPerDataBlock else {
                throw .invalidArgument(
                    "the metadata region (\(metadataBytes) bytes) is too small for \(newBlocks) data blocks; create a new pool with a larger --metadata-size")
            }
            guard newBlocks < 1 << 40 else { throw .invalidArgument("pool size is too large") }
            try mapErrors { try device.setSize(dataOffset + newBlocks * blockSize) }
            spaceMap.resize(to: newBlocks)
        }
    }
}
