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

    /// Runs `body` under the exclusive lock, once the pool is known to take changes.
    func withWritableLock<T>(_ body: (inout PoolState) throws(PoolError) -> T) throws(PoolError) -> T {
        try lock.withLock { (state: inout PoolState) throws(PoolError) -> T in
            guard !state.isClosed else { throw .closed }
            guard !isReadOnly else { throw .readOnly("pool \(path) (opened read-only)") }
            try refuseChangesIfFailed()
            return try body(&state)
        }
    }

    /// Runs a volume operation with the volume's whole block range locked (so writes in
    /// flight to it finish first and none start), then under the pool lock. Operations
    /// on a name that does not exist fail before locking anything.
    func withVolumeExclusive<T>(_ name: Substring, _ body: (inout PoolState) throws(PoolError) -> T) throws(PoolError) -> T {
        let name = String(name)
        let id = try lock.withSharedAccess { state throws(PoolError) in try state.volume(named: name).record.id }
        return try rangeLocks.withRange(id, 0..<UInt64.max) { () throws(PoolError) -> T in
            try withWritableLock { (state: inout PoolState) throws(PoolError) -> T in
                // While this waited for the volume's writes, a rename could have given the
                // name to another volume, whose range is not locked: act on none then.
                guard let now = state.names[name] else { throw .noSuchVolume(name) }
                guard now == id else {
                    throw .invalidArgument("\(name) was renamed or replaced while this operation waited for its writes; run it again")
                }
                return try body(&state)
            }
        }
    }

    func checkNewName(_ name: String, in state: borrowing PoolState) throws(PoolError) {
        if let (volume, snapshot) = VolumeName.splitSnapshot(name) {
            if let why = VolumeName.validate(volume) ?? VolumeName.validate(snapshot) {
                throw .invalidName(name, reason: why)
            }
        } else if let why = VolumeName.validate(Substring(name)) {
            throw .invalidName(name, reason: why)
        }
        if state.names[name] != nil { throw .volumeExists(name) }
    }

    func checkVolumeSize(_ size: UInt64) throws(PoolError) {
        guard size > 0 else { throw .invalidArgument("volume size must be greater than zero") }
        guard size <= Self.maxVolumeSize else { throw .invalidArgument("volume size must be at most 1 EiB") }
    }

    /// Finishes a management operation: commit. A failed commit puts the pool in fail
    /// mode, so the change, reported as failed, never becomes durable later.
    /// Without `commit` the change waits for the next commit (FLUSH, auto-commit): for
    /// ephemeral volumes, which do not outlive a crash anyway (the next server deletes
    /// what is left), so a CI host starting forty builds pays no forty commits.
    func finishManagement(_ state: inout PoolState, commit: Bool = true) throws(PoolError) {
        if commit { try self.commit(&state) }
    }

    /// One volume's description. Shared access: it does not wait for a commit's I/O.
    public func volumeInfo(_ name: String) throws(PoolError) -> VolumeInfo {
        try lock.withSharedAccess { state throws(PoolError) in describe(try state.volume(named: name), in: state) }
    }

    /// Every volume, sorted by name. O(volumes), shared access.
    public func listVolumes() -> [VolumeInfo] {
        lock.withSharedAccess { state in describeAll(state) }
    }

    /// Creates an empty thin volume. Its size may exceed the pool (overcommit). O(1).
    @discardableResult
    public func createVolume(_ name: String, size: UInt64) throws(PoolError) -> VolumeInfo {
        try createVolume(name, size: size, ephemeral: false)
    }

    /// `createVolume`, optionally marked ephemeral (see `VolumeInfo.isEphemeral`); an
    /// ephemeral volume is made durable by the next commit, not by one of its own.
    public func createVolume(_ name: String, size: UInt64, ephemeral: Bool) throws(PoolError) -> VolumeInfo {
        try withWritableLock { state throws(PoolError) in
            guard VolumeName.splitSnapshot(name) == nil else {
                throw .invalidName(name, reason: "volume names cannot contain '@' (that names a snapshot)")
            }
            try checkNewName(name, in: state)
            try checkVolumeSize(size)
            let record = VolumeRecord(
                id: state.superblock.nextVolumeID, kind: .volume, name: name, virtualSize: size,
                createdAt: SystemInfo.wallClockSeconds(), flags: ephemeral ? VolumeRecord.ephemeralFlag : 0, uuid: makeUUID())
            let volume = state.add(record)
            try finishManagement(&state, commit: !ephemeral)
            return describe(volume, in: state)
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
        storeFetchedOriginBlocks()
        return try withVolumeExclusive(volumeName) { state throws(PoolError) in
            if ifMissing, let existing = try? state.volume(named: fullName) { return (describe(existing, in: state), false) }
            let origin = try state.volume(named: String(volumeName))
            guard origin.record.kind == .volume else {
                throw .invalidArgument("\(volumeName) is a snapshot; snapshots are taken of volumes")
            }
            try checkNewName(fullName, in: state)
            try mapErrors { try state.mappings.retain(origin.record.mappingRoot) }
            let record = VolumeRecord(
                id: state.superblock.nextVolumeID, parentID: origin.record.id, ownerID: origin.record.id, kind: .snapshot,
                name: fullName, virtualSize: origin.record.virtualSize, mappingRoot: origin.record.mappingRoot,
                mappedBlocks: origin.record.mappedBlocks, createdAt: SystemInfo.wallClockSeconds(), uuid: makeUUID(),
                origin: origin.record.origin)
            let snapshot = state.add(record)
            try finishManagement(&state)
            return (describe(snapshot, in: state), true)
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
        storeFetchedOriginBlocks()
        return try withVolumeExclusive(Substring(sourceName)) { state throws(PoolError) in
            let source = try state.volume(named: sourceName)
            if ifMissing, let existing = try? state.volume(named: name) {
                guard existing.record.parentID == source.record.id else {
                    throw .invalidArgument("\(name) exists but is not a clone of \(sourceName)")
                }
                return (describe(existing, in: state), false)
            }
            guard VolumeName.splitSnapshot(name) == nil else {
                throw .invalidName(name, reason: "a clone is a volume; its name cannot contain '@'")
            }
            try checkNewName(name, in: state)
            try mapErrors { try state.mappings.retain(source.record.mappingRoot) }
            let record = VolumeRecord(
                id: state.superblock.nextVolumeID, parentID: source.record.id, kind: .volume, name: name,
                virtualSize: source.record.virtualSize, mappingRoot: source.record.mappingRoot,
                mappedBlocks: source.record.mappedBlocks, createdAt: SystemInfo.wallClockSeconds(),
                flags: ephemeral ? VolumeRecord.ephemeralFlag : 0, uuid: makeUUID(), origin: source.record.origin)
            let clone = state.add(record)
            try finishManagement(&state, commit: !ephemeral)
            return (describe(clone, in: state), true)
        }
    }

    /// Makes volume VOL's contents (and size) those of its snapshot `VOL@SNAP`.
    /// O(1) plus freeing the blocks only the old contents used.
    public func rollback(_ snapshotName: String) throws(PoolError) {
        guard let (volumeName, _) = VolumeName.splitSnapshot(snapshotName) else {
            throw .invalidName(snapshotName, reason: "rollback takes VOLUME@SNAPSHOT")
        }
        try withVolumeExclusive(volumeName) { state throws(PoolError) in
            let snapshot = try state.volume(named: snapshotName)
            let volume = try state.volume(named: String(volumeName))
            guard snapshot.record.kind == .snapshot, snapshot.record.ownerID == volume.record.id else {
                throw .invalidArgument("\(snapshotName) is not a snapshot of volume \(volumeName)")
            }
            try replaceContents(of: volume, with: snapshot, in: &state)
            try finishManagement(&state)
        }
    }

    /// Gives `volume` the contents and size of `source` (sharing its mapping tree) and
    /// releases what only its old contents used. No commit.
    func replaceContents(of volume: VolumeState, with source: VolumeState, in state: inout PoolState) throws(PoolError) {
        let mappings = state.mappings
        try state.store.usingReserve { () throws(PoolError) in
            try mapErrors {
                try mappings.retain(source.record.mappingRoot)
                try mappings.release(volume.record.mappingRoot)
            }
        }
        state.volumes[volume.record.id]?.change { record in
            record.mappingRoot = source.record.mappingRoot
            record.mappedBlocks = source.record.mappedBlocks
            record.virtualSize = source.record.virtualSize
        }
    }

    /// Deletes a volume or snapshot. Blocks it shares stay for the others; the rest
    /// return to the pool. Its snapshots stay (named as before); its clones stay.
    /// Cost: O(blocks only it referenced).
    public func delete(_ name: String) throws(PoolError) {
        // Origin blocks this volume fetched and the store worker has not stored yet go in
        // first: stored, they are shared with its ancestors (`storeFetched`); once it is
        // gone they would be dropped and fetched again by the next reader (an ephemeral
        // job's clone deleted right after its job, then the next job).
        NonBlockingThread.assertMayBlock("deleting a volume")
        storeFetchedOriginBlocks()
        try withVolumeExclusive(Substring(name)) { state throws(PoolError) in
            let victim = try state.volume(named: name)
            try remove(victim, from: &state)
            try finishManagement(&state, commit: !victim.record.isEphemeral)
        }
    }

    /// Waits until the origin blocks fetched so far are stored, and so shared with the
    /// ancestors that still read them from the origin (`storeFetched`). A snapshot or
    /// clone taken after it has them: the next ephemeral job, cloned from a source the
    /// last job's reads warmed, fetches none of them again. Free when no origin-backed
    /// volume exists; otherwise up to the store worker's backlog (at most
    /// `OriginStoreQueue.limit` blocks). Never on an event loop.
    private func storeFetchedOriginBlocks() {
        guard origins.withLockedValue({ $0.mayHaveOriginVolumes }) else { return }
        NonBlockingThread.assertMayBlock("waiting for fetched origin blocks to be stored")
        originStore.drain()
    }

    /// Takes `victim` out of the catalog and releases its blocks (those it shared stay
    /// with the others); snapshots and clones of it forget it. No commit.
    func remove(_ victim: VolumeState, from state: inout PoolState) throws(PoolError) {
        let id = victim.record.id
        let (store, mappings, volumeTable) = (state.store, state.mappings, state.volumeTable)
        var tableRoot = state.volumeTableRoot
        do {
            // Whatever the release did, the table root it left is the one to keep.
            defer { state.volumeTableRoot = tableRoot }
            try store.usingReserve { () throws(PoolError) in
                try mapErrors {
                    try mappings.release(victim.record.mappingRoot)
                    if victim.recordBlock != 0 {
                        let (root, removed) = try volumeTable.remove(tableRoot, id)
                        tableRoot = root
                        if let removed { try store.decRef(removed, .volumeRecord) }
                    }
                }
            }
        }
        state.volumes[id] = nil
        state.names[victim.record.name] = nil
        let related = state.volumes.compactMap { otherID, other in
            other.record.parentID == id || other.record.ownerID == id ? otherID : nil
        }
        for otherID in related {
            state.volumes[otherID]?.change { record in
                if record.parentID == id { record.parentID = 0 }
                if record.ownerID == id { record.ownerID = 0 }
            }
        }
    }

    /// Renames a volume (its snapshots follow: `OLD@S` becomes `NEW@S`) or a snapshot
    /// (within its volume: `VOL@OLD` to `VOL@NEW`). An ephemeral volume becomes ordinary.
    public func rename(_ oldName: String, to newName: String) throws(PoolError) {
        try withWritableLock { state throws(PoolError) in
            let target = try state.volume(named: oldName)
            if target.record.kind == .snapshot {
                guard let (oldVolume, _) = VolumeName.splitSnapshot(oldName),
                    let (newVolume, _) = VolumeName.splitSnapshot(newName), oldVolume == newVolume
                else {
                    throw .invalidName(newName, reason: "a snapshot keeps its volume: rename \(oldName) to \(VolumeName.splitSnapshot(oldName).map { String($0.volume) } ?? "VOL")@NEWNAME")
                }
            } else if VolumeName.splitSnapshot(newName) != nil {
                throw .invalidName(newName, reason: "volume names cannot contain '@'")
            }
            try checkNewName(newName, in: state)
            var renames: [(id: UInt64, oldName: String, newName: String)] = [(target.record.id, oldName, newName)]
            if target.record.kind == .volume {
                for other in state.volumes.values where other.record.ownerID == target.record.id {
                    guard let (_, snap) = VolumeName.splitSnapshot(other.record.name) else { continue }
                    let renamed = "\(newName)@\(snap)"
                    if state.names[renamed] != nil { throw .volumeExists(renamed) }
                    renames.append((other.record.id, other.record.name, renamed))
                }
            }
            for rename in renames {
                state.names[rename.oldName] = nil
                state.names[rename.newName] = rename.id
                state.volumes[rename.id]?.change { $0.name = rename.newName }
            }
            // A renamed ephemeral volume is one somebody wants: it becomes ordinary, so
            // no server deletes it (by its old name's rules, or as a leftover).
            state.volumes[target.record.id]?.change { $0.flags &= ~VolumeRecord.ephemeralFlag }
            try finishManagement(&state)
        }
    }

    /// Grows or shrinks a volume. Shrinking unmaps every block past the new end and
    /// zeroes the tail of the last partial block, so growing again reads zeros.
    public func resize(_ name: String, to newSize: UInt64) throws(PoolError) {
        try withVolumeExclusive(Substring(name)) { state throws(PoolError) in
            let volume = try state.volume(named: name)
            let id = volume.record.id
            guard volume.record.kind == .volume else { throw .readOnly("snapshot \(name)") }
            try checkVolumeSize(newSize)
            if newSize < volume.record.virtualSize {
                let store = state.store
                try store.usingReserve { () throws(PoolError) in
                    let tail = newSize % blockSize
                    if tail != 0 {
                        try zero(&state, id, from: newSize, count: blockSize - tail, unmapWholeBlocks: true)
                    }
                    let firstGone = (newSize + blockSize - 1) / blockSize
                    try unmap(&state, id, blocks: firstGone..<UInt64.max)
                }
            }
            state.volumes[id]?.change { $0.virtualSize = newSize }
            try finishManagement(&state)
        }
    }

    /// Grows the pool's data region to `newSize` bytes (rounded down to whole blocks).
    /// The backing file is extended sparsely.
    public func grow(to newSize: UInt64) throws(PoolError) {
        try withWritableLock { state throws(PoolError) in
            try grow(&state, to: newSize)
            try finishManagement(&state)
        }
    }

    /// `grow` without the commit. The new size is committed with the next transaction
    /// (until then a crash leaves the old size: the file's extra sparse bytes are unused).
    func grow(_ state: inout PoolState, to newSize: UInt64) throws(PoolError) {
        let (spaceMap, store) = (state.spaceMap, state.store)
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
