import ThinFormat
import ThinSystem

/// Where a receive starts (`Pool.beginReceive`).
public struct ReceivePlan: Sendable, Equatable {
    /// The staging volume the stream's records go to.
    public var staging: String
    /// Records that end at or below this image offset are already applied (a resume).
    public var appliedUpTo: UInt64
    /// An earlier interrupted receive into the same name was discarded to start over.
    public var discardedEarlier: Bool
}

/// `thinbd receive`: a stream is applied to a staging volume, `NAME%receive`, marked as
/// receiving in its record. Only `finishReceive` turns it into NAME and NAME@SNAP, in one
/// commit, so a stream that fails or stops part-way changes nothing else: the staging
/// volume is deleted, or kept for `--resume`, and in both cases NAME is as it was.
extension Pool {
    public static let stagingSuffix = "%receive"

    public static func stagingName(for name: String) -> String { name + stagingSuffix }

    /// Checks a stream's header against the pool and sets up its staging volume: a new
    /// empty volume for a full stream, a clone of NAME's copy of the base (found by
    /// UUID) for an incremental one. With `resume`, an interrupted receive of the same
    /// stream is continued; without it, one is discarded. `force`: an incremental stream
    /// may replace writes made to NAME after its copy of the base. Commits.
    public func beginReceive(_ header: SendStreamHeader, into name: String, resume: Bool, force: Bool) throws(PoolError) -> ReceivePlan {
        guard let (_, snapshot) = VolumeName.splitSnapshot(header.imageName) else {
            throw .invalidArgument("the stream's image name \(header.imageName) is not VOLUME@SNAPSHOT")
        }
        let staging = Self.stagingName(for: name)
        let snapshotName = "\(name)@\(snapshot)"
        let plan = try withWritableLock { state throws(PoolError) -> ReceivePlan in
            guard VolumeName.splitSnapshot(name) == nil else {
                throw .invalidName(name, reason: "receive makes a volume and its snapshot; name the volume without '@'")
            }
            if let why = VolumeName.validate(Substring(name)) ?? VolumeName.validate(Substring(staging)) {
                throw .invalidName(name, reason: why)
            }
            var discarded = false
            if let id = state.names[staging], let existing = state.volumes[id] {
                guard let progress = existing.record.receive else {
                    throw .volumeExists("\(staging) (a volume that is not a receive's staging volume)")
                }
                let same = progress.imageUUID == header.imageUUID
                    && progress.baseUUID == (header.baseUUID ?? VolumeRecord.noUUID)
                if resume && same {
                    return ReceivePlan(staging: staging, appliedUpTo: progress.appliedUpTo, discardedEarlier: false)
                }
                if resume {
                    throw .invalidArgument(
                        "the interrupted receive into \(name) was of image \(formatUUID(progress.imageUUID)); this stream carries \(header.imageName) (\(formatUUID(header.imageUUID))): run receive without --resume to discard it")
                }
                try remove(existing, from: &state)
                discarded = true
            }
            let snapshots = state.volumes.values.filter { $0.record.kind == .snapshot && $0.record.name.hasPrefix(name + "@") }
            if let copy = snapshots.first(where: { $0.record.uuid == header.imageUUID }) {
                throw .volumeExists("\(copy.record.name), which already holds \(header.imageName) (image \(formatUUID(header.imageUUID)))")
            }
            if state.names[snapshotName] != nil {
                throw .volumeExists("\(snapshotName) (another image); receive into another name, or rename that snapshot")
            }
            let receive = VolumeRecord.ReceiveState(imageUUID: header.imageUUID, baseUUID: header.baseUUID ?? VolumeRecord.noUUID)
            var record = VolumeRecord(
                id: state.superblock.nextVolumeID, kind: .volume, name: staging, virtualSize: header.imageSize,
                createdAt: SystemInfo.wallClockSeconds(), flags: VolumeRecord.receivingFlag, uuid: makeUUID(), receive: receive)
            if let baseUUID = header.baseUUID {
                let base = try findBase(of: header, uuid: baseUUID, in: name, among: snapshots, state)
                let volume = try state.volume(named: name)
                if !force && volume.record.mappingRoot != base.record.mappingRoot {
                    throw .invalidArgument(
                        "\(name) was written after \(base.record.name), the stream's base: receiving would discard those writes; pass --force to discard them, or receive into another name")
                }
                try mapErrors { try state.mappings.retain(base.record.mappingRoot) }
                record.parentID = base.record.id
                record.mappingRoot = base.record.mappingRoot
                record.mappedBlocks = base.record.mappedBlocks
                record.virtualSize = base.record.virtualSize
            } else if state.names[name] != nil {
                throw .volumeExists(
                    "\(name); a full stream makes a new volume: receive it under another name, or send an incremental stream from a snapshot \(name) has")
            }
            _ = state.add(record)
            try finishManagement(&state)
            return ReceivePlan(staging: staging, appliedUpTo: 0, discardedEarlier: discarded)
        }
        // The base may have another size than the image (the volume was resized).
        if try volumeInfo(staging).size != header.imageSize { try resize(staging, to: header.imageSize) }
        return plan
    }

    /// The snapshot of NAME that is the stream's base, or an error naming both images.
    private func findBase(
        of header: SendStreamHeader, uuid: [UInt8], in name: String, among snapshots: [VolumeState], _ state: borrowing PoolState
    ) throws(PoolError) -> VolumeState {
        let wanted = "\(header.baseName) (image \(formatUUID(uuid)))"
        guard state.names[name] != nil else {
            throw .noSuchVolume("\(name): an incremental stream applies onto \(name)'s copy of \(wanted); receive the full stream first")
        }
        if let base = snapshots.first(where: { $0.record.uuid == uuid }) { return base }
        if let (_, snap) = VolumeName.splitSnapshot(header.baseName), let id = state.names["\(name)@\(snap)"], let namesake = state.volumes[id] {
            throw .invalidArgument(
                "\(namesake.record.name) is image \(namesake.record.hasUUID ? formatUUID(namesake.record.uuid) : "without a UUID"), not the stream's base \(wanted)")
        }
        let names = snapshots.map(\.record.name).sorted()
        throw .noSuchVolume(
            "\(name) has no copy of the stream's base \(wanted); its snapshots: \(names.isEmpty ? "none" : names.joined(separator: ", "))")
    }

    /// Records that every record below `appliedUpTo` is in the staging volume, in the
    /// same commit as the data written so far (call it once those writes are done).
    public func recordReceiveProgress(staging: String, appliedUpTo: UInt64) throws(PoolError) {
        try withWritableLock { state throws(PoolError) in
            let volume = try stagingVolume(staging, in: state)
            guard appliedUpTo <= volume.record.virtualSize else { throw .outOfRange("progress \(appliedUpTo) past the image's end") }
            state.volumes[volume.record.id]?.change { $0.receive?.appliedUpTo = appliedUpTo }
            try finishManagement(&state)
        }
    }

    /// Turns a fully applied staging volume into the result, in one commit: for a full
    /// stream it becomes volume NAME; for an incremental one NAME takes its contents and
    /// it goes. Then snapshot NAME@SNAP is taken with the stream's image UUID and
    /// creation time, so the next incremental finds it as its base.
    public func finishReceive(_ header: SendStreamHeader, staging: String, into name: String) throws(PoolError) -> VolumeInfo {
        guard let (_, snapshot) = VolumeName.splitSnapshot(header.imageName) else {
            throw .invalidArgument("the stream's image name \(header.imageName) is not VOLUME@SNAPSHOT")
        }
        let snapshotName = "\(name)@\(snapshot)"
        return try withVolumeExclusive(Substring(header.isIncremental ? name : staging)) { state throws(PoolError) -> VolumeInfo in
            let source = try stagingVolume(staging, in: state)
            guard source.record.receive?.imageUUID == header.imageUUID else {
                throw .invalidArgument("\(staging) holds another stream than \(header.imageName)")
            }
            try checkNewName(snapshotName, in: state)
            let target: VolumeState
            if header.isIncremental {
                try replaceContents(of: try state.volume(named: name), with: source, in: &state)
                try remove(source, from: &state)
                target = try state.volume(named: name)
            } else {
                try checkNewName(name, in: state)
                state.names[staging] = nil
                state.names[name] = source.record.id
                state.volumes[source.record.id]?.change { record in
                    record.name = name
                    record.flags &= ~VolumeRecord.receivingFlag
                    record.receive = nil
                }
                target = try state.volume(named: name)
            }
            try mapErrors { try state.mappings.retain(target.record.mappingRoot) }
            let record = VolumeRecord(
                id: state.superblock.nextVolumeID, parentID: target.record.id, ownerID: target.record.id, kind: .snapshot,
                name: snapshotName, virtualSize: target.record.virtualSize, mappingRoot: target.record.mappingRoot,
                mappedBlocks: target.record.mappedBlocks, createdAt: header.createdAt, uuid: header.imageUUID)
            let made = state.add(record)
            try finishManagement(&state)
            return describe(made, in: state)
        }
    }

    /// Deletes a staging volume (a receive that failed, or `receive --abort`).
    public func abortReceive(staging: String) throws(PoolError) {
        try withVolumeExclusive(Substring(staging)) { state throws(PoolError) in
            try remove(try stagingVolume(staging, in: state), from: &state)
            try finishManagement(&state)
        }
    }

    private func stagingVolume(_ staging: String, in state: borrowing PoolState) throws(PoolError) -> VolumeState {
        let volume = try state.volume(named: staging)
        guard volume.record.isReceiving else { throw .invalidArgument("\(staging) is not the staging volume of a receive") }
        return volume
    }
}
