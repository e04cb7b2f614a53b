import ThinFormat
import ThinMetadata
import ThinSystem

/// A run of a volume's address space, as reported by `Pool.extents`.
public struct Extent: Equatable, Sendable {
    public var offset: UInt64
    public var length: UInt64
    /// False for holes: unmapped space that reads as zeros.
    public var isMapped: Bool

    public init(offset: UInt64, length: UInt64, isMapped: Bool) {
        self.offset = offset
        self.length = length
        self.isMapped = isMapped
    }
}

/// Builds a batch of device requests, merging a request into the previous one when
/// both the disk range and the memory range continue it.
struct RequestBatch {
    var requests: [IORequest] = []

    mutating func add(_ kind: IORequest.Kind, _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        guard buffer.count > 0 else { return }
        if let last = requests.last, last.kind == kind, last.offset + UInt64(last.buffer.count) == offset,
            let lastBase = last.buffer.baseAddress, lastBase + last.buffer.count == buffer.baseAddress
        {
            requests[requests.count - 1].buffer = UnsafeMutableRawBufferPointer(start: lastBase, count: last.buffer.count + buffer.count)
            return
        }
        requests.append(IORequest(kind, buffer, at: offset))
    }
}

/// The volume I/O API: read, write (Pool+Write.swift), write-zeroes, trim and flush
/// (Pool+Zero.swift) and extents at any byte offset and length. Every request is
/// validated once, by `volume(_:writing:at:count:in:)` at its entry; past that
/// boundary the engine only asserts.
extension Pool {
    /// The id of a volume or snapshot, for the I/O calls.
    public func volumeID(_ name: String) throws(PoolError) -> UInt64 {
        try lock.withSharedAccess { state throws(PoolError) in try state.volume(named: name).record.id }
    }

    /// Volume `id`, checked for the request: the pool is open, the volume exists, and
    /// for `writing`, the pool, its state and the volume all take writes.
    /// `fillingFromOrigin`: the write stores blocks fetched from the origin, which a
    /// snapshot may take too (it read those bytes from the origin already).
    func volume(_ id: UInt64, writing: Bool, fillingFromOrigin: Bool = false, in state: borrowing PoolState) throws(PoolError) -> VolumeState {
        try withUnsafePointer(to: state) { (state) throws(PoolError) in
            try volume(id, writing: writing, fillingFromOrigin: fillingFromOrigin, in: state)
        }
    }

    /// `volume(_:writing:in:)` from the state's address (`PoolLock.withSharedAddress`:
    /// the hot paths, where passing the state itself would copy it).
    func volume(
        _ id: UInt64, writing: Bool, fillingFromOrigin: Bool = false, in state: UnsafePointer<PoolState>
    ) throws(PoolError) -> VolumeState {
        guard !state.pointee.isClosed else { throw .closed }
        guard let volume = state.pointee.volumes[id] else { throw .noSuchVolume("#\(id)") }
        if writing {
            if isReadOnly { throw .readOnly("pool \(path) (opened read-only)") }
            try refuseChangesIfFailed()
            if volume.record.kind == .snapshot && !fillingFromOrigin { throw .readOnly("snapshot \(volume.record.name)") }
        }
        return volume
    }

    /// `volume(_:writing:in:)` for a request of `count` bytes at `offset`, which must
    /// lie inside the volume (without overflow).
    func volume(
        _ id: UInt64, writing: Bool, fillingFromOrigin: Bool = false, at offset: UInt64, count: UInt64, in state: borrowing PoolState
    ) throws(PoolError) -> VolumeState {
        try withUnsafePointer(to: state) { (state) throws(PoolError) in
            try volume(id, writing: writing, fillingFromOrigin: fillingFromOrigin, at: offset, count: count, in: state)
        }
    }

    /// The same from the state's address (see `volume(_:writing:fillingFromOrigin:in:)`).
    func volume(
        _ id: UInt64, writing: Bool, fillingFromOrigin: Bool = false, at offset: UInt64, count: UInt64,
        in state: UnsafePointer<PoolState>
    ) throws(PoolError) -> VolumeState {
        let volume = try self.volume(id, writing: writing, fillingFromOrigin: fillingFromOrigin, in: state)
        let (end, overflow) = offset.addingReportingOverflow(count)
        guard !overflow, end <= volume.record.virtualSize else {
            throw .outOfRange("request at \(offset) for \(count) bytes is beyond the end of \(volume.record.name) (\(volume.record.virtualSize) bytes)")
        }
        return volume
    }

    /// `volume(_:writing:at:count:in:)` for the per-request paths (reads, and writes in
    /// place): the same checks, but only the volume's lookup fields come back, copied
    /// without reference counting. When a check fails, the full version runs to throw
    /// its error.
    @inline(__always)
    func volumeLookup(
        _ id: UInt64, writing: Bool, at offset: UInt64, count: UInt64, in state: UnsafePointer<PoolState>
    ) throws(PoolError) -> VolumeLookup {
        if let lookup = state.pointee.volumes.lookup(id), !state.pointee.isClosed,
            !writing || (!isReadOnly && !hasFailed.load(ordering: .acquiring) && !lookup.isSnapshot)
        {
            let (end, overflow) = offset.addingReportingOverflow(count)
            if !overflow && end <= lookup.virtualSize { return lookup }
        }
        return VolumeLookup(try volume(id, writing: writing, at: offset, count: count, in: state).record)
    }

    @inline(__always)
    func diskOffset(_ physical: UInt64, _ inner: UInt64 = 0) -> UInt64 { dataOffset + physical * blockSize + inner }

    // MARK: Read

    /// Reads `buffer.count` bytes at `offset`; unmapped ranges read as zeros. Returns
    /// the mapped and unmapped runs of the range (what NBD sends as data and hole chunks).
    /// Cost: one tree walk for the range and one batched device submission.
    ///
    /// The mapping is looked up under the pool lock; the data is read after it is
    /// released, so reads from many connections reach the disk together.
    @discardableResult
    public func read(_ id: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(PoolError) -> [Extent] {
        let plan = try planRead(id, at: offset, into: buffer)!
        do {
            // planRead entered the gate under the pool lock, before any commit that frees the
            // planned blocks, so that commit waits for this read before handing them out.
            defer { ioGate.leave(plan.ticket) }
            if !plan.requests.isEmpty { try mapErrors { try device.perform(plan.requests) } }
        }
        // Out of the gate: a fetch may wait on the network, and commits must not.
        guard let fill = plan.origin else { return plan.runs.extents }
        try fetch(fill.runs, from: fill.record, volume: id, keep: fill.keep, into: buffer, at: offset)
        return Self.markingOrigin(plan.runs.extents, fill.record)
    }

    /// Like `read`, but returns once the disk reads are submitted; `completion` runs when
    /// they are done, on the device's completion thread (or before returning, for holes,
    /// errors and synchronous devices). `buffer` must stay valid until then.
    /// May wait for the pool lock; never waits for the disk.
    public func readAsync(
        _ id: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
        completion: @escaping @Sendable (Result<[Extent], PoolError>) -> Void
    ) {
        let plan: ReadPlan
        do {
            plan = try planRead(id, at: offset, into: buffer)!
        } catch {
            completion(.failure(error))
            return
        }
        if plan.origin != nil {
            // Unfetched origin blocks: this thread may block, so the read runs here whole.
            ioGate.leave(plan.ticket)
            completion(Result { () throws(PoolError) in try read(id, at: offset, into: buffer) })
            return
        }
        let gate = ioGate
        let (ticket, extents) = (plan.ticket, plan.runs.extents)
        device.submit(plan.requests) { error in
            gate.leave(ticket)
            completion(error.map { .failure(.io($0)) } ?? .success(extents))
        }
    }

    /// The outcome of `readWithoutBlocking`. Its extents are those of `read`, except
    /// that a range mapped throughout gives none (no list to allocate per read).
    public enum NonBlockingRead {
        /// Done (holes, or data the device had at hand); the completion is not called.
        case completed(Result<[Extent], PoolError>)
        /// Queued on the caller's loop queue; the completion runs there.
        case started
        /// Nothing done: it would have waited (lock, uncached metadata, disk without a
        /// queue with room). Call `read` or `readAsync` from a thread that may block.
        case wouldBlock
    }

    /// Starts a read without ever blocking the calling thread: for event loops, so that
    /// a read goes from socket to disk and back without a thread hand-off. `queue` must
    /// belong to the calling thread; `completion` runs there (only after `.started`),
    /// and `buffer` must stay valid until then. The extents it reports are empty when
    /// the whole range is mapped (see `NonBlockingRead`). Cost: as `read`, minus the
    /// waits.
    public func readWithoutBlocking(
        _ id: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, queue: LoopDiskQueue?,
        completion: @escaping (Result<[Extent], PoolError>) -> Void
    ) -> NonBlockingRead {
        let plan: ReadPlan?
        do {
            plan = try planRead(id, at: offset, into: buffer, blocking: false)
        } catch {
            return .completed(.failure(error))
        }
        guard let plan else { return .wouldBlock }
        if plan.origin != nil {
            // Fetching from the origin may wait on the network: never on an event loop.
            ioGate.leave(plan.ticket)
            return .wouldBlock
        }
        let gate = ioGate
        let (ticket, extents) = (plan.ticket, plan.runs.extentsUnlessAllMapped)
        guard !plan.requests.isEmpty else {
            gate.leave(ticket)
            return .completed(.success(extents))
        }
        switch device.startReadsWithoutBlocking(plan.requests, on: queue, completion: { error in
            gate.leave(ticket)
            completion(error.map { .failure(.io($0)) } ?? .success(extents))
        }) {
        case .started:
            return .started
        case .completed(let error):
            gate.leave(ticket)
            return .completed(error.map { .failure(.io($0)) } ?? .success(extents))
        case .wouldBlock:
            gate.leave(ticket)
            return .wouldBlock
        }
    }

    private typealias ReadPlan = (requests: [IORequest], runs: ExtentList, ticket: DrainGate.Ticket, origin: OriginFill?)

    /// What a read of an origin-backed volume must fetch: unmapped ranges below the
    /// origin's size; `keep` when the fetched blocks are stored (volumes, not snapshots).
    private struct OriginFill {
        var record: VolumeRecord.Origin
        var runs: [Range<UInt64>]
        var keep: Bool
    }

    /// Looks the range up and zeroes the holes in `buffer`; on success the caller holds
    /// the I/O gate and must leave it once the planned requests are done. Non-blocking
    /// plans return nil where a blocking one would wait.
    private func planRead(
        _ id: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, blocking: Bool = true
    ) throws(PoolError) -> ReadPlan? {
        // Shared access: reads plan side by side, and during a commit's I/O.
        // From the state's address: a borrowed state would be copied here, per read.
        func plan(_ state: UnsafePointer<PoolState>) throws(PoolError) -> ReadPlan? {
            let volume = try volumeLookup(id, writing: false, at: offset, count: UInt64(buffer.count), in: state)
            var found: (requests: [IORequest], runs: ExtentList) = ([], ExtentList())
            if buffer.count > 0 {
                do throws(MetadataError) {
                    found = try lookUpRead(volume.mappingRoot, in: state.pointee.mappings, at: offset, into: buffer, cachedOnly: !blocking)
                } catch {
                    if case .notCached = error { return nil }
                    throw noticing(PoolError(error))
                }
            }
            let origin = volume.hasOrigin ? state.pointee.volumes[id]?.record.origin : nil
            let fill = origin.flatMap { origin -> OriginFill? in
                let runs = Self.originRuns(found.runs.extents, origin)
                return runs.isEmpty ? nil : OriginFill(record: origin, runs: runs, keep: !isReadOnly)
            }
            // Entered under the lock, so before any commit that frees these blocks.
            return (found.requests, found.runs, ioGate.enter(), fill)
        }
        if blocking { return try lock.withSharedAddress(plan) }
        return try lock.tryWithSharedAddress(plan) ?? nil
    }

    private func lookUpRead(
        _ mappingRoot: UInt64, in mappings: BTree, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, cachedOnly: Bool
    ) throws(MetadataError) -> (requests: [IORequest], runs: ExtentList) {
        let end = offset + UInt64(buffer.count)
        var batch = RequestBatch()
        var runs = ExtentList()
        var zeroFrom = 0
        let blocks = (offset / blockSize)..<((end + blockSize - 1) / blockSize)
        try mappings.forEach(mappingRoot, in: blocks, cachedOnly: cachedOnly) { (vb: UInt64, physical: UInt64) -> Bool in
            let start = max(offset, vb * blockSize)
            let stop = min(end, (vb + 1) * blockSize)
            let lower = Int(start - offset)
            let upper = Int(stop - offset)
            if zeroFrom < lower {
                UnsafeMutableRawBufferPointer(rebasing: buffer[zeroFrom..<lower]).initializeMemory(as: UInt8.self, repeating: 0)
                runs.add(offset + UInt64(zeroFrom), start, mapped: false)
            }
            batch.add(.read, UnsafeMutableRawBufferPointer(rebasing: buffer[lower..<upper]), at: diskOffset(physical, start - vb * blockSize))
            runs.add(start, stop, mapped: true)
            zeroFrom = upper
            return true
        }
        if zeroFrom < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[zeroFrom...]).initializeMemory(as: UInt8.self, repeating: 0)
            runs.add(offset + UInt64(zeroFrom), end, mapped: false)
        }
        return (batch.requests, runs)
    }

    // MARK: Extents

    /// Mapped and unmapped runs covering `offset..<offset+count`, in order, merged.
    /// Unmapped runs read as zeros. Cost: one tree walk over the range.
    public func extents(_ id: UInt64, at offset: UInt64, count: UInt64) throws(PoolError) -> [Extent] {
        try lock.withSharedAccess { state throws(PoolError) in
            let volume = try volume(id, writing: false, at: offset, count: count, in: state)
            guard count > 0 else { return [] }
            let end = offset + count
            var runs = ExtentList()
            var covered = offset
            _ = try mapErrors {
                try state.mappings.forEach(volume.record.mappingRoot, in: (offset / blockSize)..<((end + blockSize - 1) / blockSize)) { (vb: UInt64, _: UInt64) -> Bool in
                    let start = max(offset, vb * blockSize)
                    let stop = min(end, (vb + 1) * blockSize)
                    runs.add(covered, start, mapped: false)
                    runs.add(start, stop, mapped: true)
                    covered = stop
                    return true
                }
            }
            runs.add(covered, end, mapped: false)
            return Self.markingOrigin(runs.extents, volume.record.origin)
        }
    }
}

/// Builds a list of extents, merging a run into the previous one when it continues it
/// with the same state.
/// Runs added in order, neighbours of the same kind merged. While every run so far is
/// mapped and they follow each other, only their span is kept: a read of data alone,
/// the common case, allocates no list (`extentsUnlessAllMapped`).
struct ExtentList {
    private var list: [Extent] = []
    /// The merged mapped runs while `list` is empty.
    private var mappedSpan: Range<UInt64>?

    mutating func add(_ start: UInt64, _ stop: UInt64, mapped: Bool) {
        guard stop > start else { return }
        if list.isEmpty {
            if mapped, mappedSpan == nil || mappedSpan?.upperBound == start {
                mappedSpan = (mappedSpan?.lowerBound ?? start)..<stop
                return
            }
            if let span = mappedSpan {
                list.append(Extent(offset: span.lowerBound, length: UInt64(span.count), isMapped: true))
                mappedSpan = nil
            }
        }
        if let last = list.last, last.isMapped == mapped, last.offset + last.length == start {
            list[list.count - 1].length += stop - start
        } else {
            list.append(Extent(offset: start, length: stop - start, isMapped: mapped))
        }
    }

    /// Every run, in order.
    var extents: [Extent] {
        guard let span = mappedSpan else { return list }
        return [Extent(offset: span.lowerBound, length: UInt64(span.count), isMapped: true)]
    }

    /// Every run, or none when they are all mapped (and follow each other): what
    /// `readWithoutBlocking` reports, without allocating for the common case.
    var extentsUnlessAllMapped: [Extent] { list }
}

/// What `Pool.differences(from:to:)` found.
public struct VolumeDifferences: Sendable, Equatable {
    /// Byte ranges whose contents may differ, in order, merged: whole data blocks that
    /// are mapped in one image and not the other, or mapped to different data.
    public var extents: [Range<UInt64>]
    /// The two images come from one lineage (one is the other's snapshot, clone or
    /// origin, through any number of steps). Unrelated images share nothing: their
    /// differences are everything either one maps.
    public var related: Bool
    public var fromSize: UInt64
    public var toSize: UInt64

    /// Bytes in `extents`.
    public var changedBytes: UInt64 { extents.reduce(0) { $0 + UInt64($1.count) } }
}

extension Pool {
    /// The extents whose contents may differ between two volumes or snapshots. Cost:
    /// the metadata of the subtrees a change copied (shared subtrees are skipped unread),
    /// not the images' size; shared access, so I/O and commits go on meanwhile.
    public func differences(from fromName: String, to toName: String) throws(PoolError) -> VolumeDifferences {
        try differences(from: Optional(fromName), to: toName)
    }

    /// `differences(from:to:)`, where a nil `fromName` stands for an empty image (every
    /// mapped extent of `toName` is listed: what a full `send` copies), limited to the
    /// byte range `window` (whole blocks that meet it) when one is given.
    public func differences(from fromName: String?, to toName: String, in window: Range<UInt64>? = nil) throws(PoolError) -> VolumeDifferences {
        try lock.withSharedAccess { state throws(PoolError) in
            guard !state.isClosed else { throw .closed }
            let from = try fromName.map { (name) throws(PoolError) in try state.volume(named: name) }
            let to = try state.volume(named: toName)
            var extents: [Range<UInt64>] = []
            let blockSize = self.blockSize
            // Only keys inside the larger image count: a damaged tree's stray keys beyond it
            // are never turned into byte offsets (sizes are at most 2^60: no overflow).
            let size = max(from?.record.virtualSize ?? 0, to.record.virtualSize)
            var blocks = 0..<(size / blockSize + (size % blockSize == 0 ? 0 : 1))
            if let window {
                let first = min(window.lowerBound, size) / blockSize
                let end = min(window.upperBound, size)
                blocks = blocks.clamped(to: first..<max(first, end / blockSize + (end % blockSize == 0 ? 0 : 1)))
            }
            let fromOrigin = Self.originBlocks(from?.record, to.record, in: blocks, blockSize: blockSize)
            if !fromOrigin.isEmpty { extents.append(fromOrigin.lowerBound * blockSize..<fromOrigin.upperBound * blockSize) }
            try mapErrors {
                try state.mappings.differences(from?.record.mappingRoot ?? 0, to.record.mappingRoot, in: blocks) { (run: Range<UInt64>) throws(MetadataError) in
                    let rest = max(run.lowerBound, fromOrigin.upperBound)..<max(run.upperBound, fromOrigin.upperBound)
                    if !rest.isEmpty { extents.append(rest.lowerBound * blockSize..<rest.upperBound * blockSize) }
                }
            }
            let related = from.map { lineage(of: $0, in: state).contains(where: lineage(of: to, in: state).contains) } ?? true
            return VolumeDifferences(
                extents: extents, related: related, fromSize: from?.record.virtualSize ?? 0, toSize: to.record.virtualSize)
        }
    }

    /// The snapshots `changedExtents` may compare volume `name` against: every snapshot
    /// of its family (those whose lineage shares a volume with its own), by name and id,
    /// sorted by name. Cost: one lineage walk per snapshot, under shared access.
    public func comparableSnapshots(of name: String) throws(PoolError) -> [(name: String, id: UInt64)] {
        try lock.withSharedAccess { state throws(PoolError) in
            guard !state.isClosed else { throw .closed }
            let family = lineage(of: try state.volume(named: name), in: state)
            return state.volumes.values
                .filter { $0.record.kind == .snapshot && !lineage(of: $0, in: state).isDisjoint(with: family) }
                .map { (name: $0.record.name, id: $0.record.id) }
                .sorted { $0.name < $1.name }
        }
    }

    /// The blocks of `blocks` that may differ between `from` and `to` because their
    /// unmapped blocks mean different things: one reads them from an origin the other
    /// does not share (an empty `from` shares none). Empty when both have the same origin
    /// or neither has one; else from the range's start to the larger origin's end.
    static func originBlocks(_ from: VolumeRecord?, _ to: VolumeRecord, in blocks: Range<UInt64>, blockSize: UInt64) -> Range<UInt64> {
        guard from?.origin != to.origin else { return blocks.lowerBound..<blocks.lowerBound }
        let originBytes = max(from?.origin?.size ?? 0, to.origin?.size ?? 0)
        let end = min(blocks.upperBound, max(blocks.lowerBound, (originBytes + blockSize - 1) / blockSize))
        return blocks.lowerBound..<end
    }

    /// The runs of `count` bytes at `offset` of volume `id` whose contents may differ
    /// from snapshot `baseID` (`isMapped` true) or are the same (false), covering the
    /// range in order. Whole data blocks: a run may start and end inside a block only at
    /// the range's ends. Cost: the walk of `differences` limited to the range's blocks;
    /// shared access. A deleted base is `invalidArgument` (EINVAL to a client: its
    /// context names nothing now); ids are never reused, so a base deleted and named
    /// again is not taken for the old one.
    public func changedExtents(_ id: UInt64, since baseID: UInt64, at offset: UInt64, count: UInt64) throws(PoolError) -> [Extent] {
        try lock.withSharedAccess { state throws(PoolError) in
            let volume = try volume(id, writing: false, at: offset, count: count, in: state)
            guard let base = state.volumes[baseID] else {
                throw .invalidArgument("the base snapshot (volume id \(baseID)) was deleted after it was chosen")
            }
            guard count > 0 else { return [] }
            let end = offset + count
            var runs = ExtentList()
            var covered = offset
            let blocks = (offset / blockSize)..<((end + blockSize - 1) / blockSize)
            let fromOrigin = Self.originBlocks(base.record, volume.record, in: blocks, blockSize: blockSize)
            if !fromOrigin.isEmpty {
                covered = min(end, fromOrigin.upperBound * blockSize)
                runs.add(offset, covered, mapped: true)
            }
            try mapErrors {
                try state.mappings.differences(base.record.mappingRoot, volume.record.mappingRoot, in: blocks) { (run: Range<UInt64>) throws(MetadataError) in
                    let start = max(covered, run.lowerBound * blockSize)
                    let stop = min(end, run.upperBound * blockSize)
                    guard stop > start else { return }
                    runs.add(covered, start, mapped: false)
                    runs.add(start, stop, mapped: true)
                    covered = stop
                }
            }
            runs.add(covered, end, mapped: false)
            return runs.extents
        }
    }

    /// Ids of the volume, its snapshots' owner and every origin it came from (bounded:
    /// a cycle of damaged ids cannot loop).
    private func lineage(of volume: VolumeState, in state: borrowing PoolState) -> Set<UInt64> {
        var seen: Set<UInt64> = []
        var pending = [volume.record.id]
        while let id = pending.popLast(), seen.count <= state.volumes.count {
            guard seen.insert(id).inserted, let record = state.volumes[id]?.record else { continue }
            for next in [record.parentID, record.ownerID] where next != 0 { pending.append(next) }
        }
        return seen
    }
}
