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

/// The volume I/O API: read, write, write-zeroes, trim, flush and extents at any byte
/// offset and length. Requests are validated here, once; past this boundary the
/// engine only asserts.
extension Pool {
    /// The id of a volume or snapshot, for the I/O calls.
    public func volumeID(_ name: String) throws(PoolError) -> UInt64 {
        try lock.withSharedAccess { state throws(PoolError) in try state.volume(named: name).record.id }
    }

    /// Volume `id`, checked for the request: the pool is open, the volume exists, and
    /// for `writing`, the pool, its state and the volume all take writes.
    func volume(_ id: UInt64, writing: Bool, in state: borrowing PoolState) throws(PoolError) -> VolumeState {
        guard !state.isClosed else { throw .closed }
        guard let volume = state.volumes[id] else { throw .noSuchVolume("#\(id)") }
        if writing {
            if isReadOnly { throw .readOnly("pool \(path) (opened read-only)") }
            try refuseChangesIfFailed()
            if volume.record.kind == .snapshot { throw .readOnly("snapshot \(volume.record.name)") }
        }
        return volume
    }

    /// `volume(_:writing:in:)` for a request of `count` bytes at `offset`, which must
    /// lie inside the volume (without overflow).
    func volume(_ id: UInt64, writing: Bool, at offset: UInt64, count: UInt64, in state: borrowing PoolState) throws(PoolError) -> VolumeState {
        let volume = try self.volume(id, writing: writing, in: state)
        let (end, overflow) = offset.addingReportingOverflow(count)
        guard !overflow, end <= volume.record.virtualSize else {
            throw .outOfRange("request at \(offset) for \(count) bytes is beyond the end of \(volume.record.name) (\(volume.record.virtualSize) bytes)")
        }
        return volume
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
        // planRead entered the gate under the pool lock, before any commit that frees the
        // planned blocks, so that commit waits for this read before handing them out.
        defer { ioGate.leave(plan.ticket) }
        if !plan.requests.isEmpty { try mapErrors { try device.perform(plan.requests) } }
        return plan.extents
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
        let gate = ioGate
        let (ticket, extents) = (plan.ticket, plan.extents)
        device.submit(plan.requests) { error in
            gate.leave(ticket)
            completion(error.map { .failure(.io($0)) } ?? .success(extents))
        }
    }

    /// The outcome of `readWithoutBlocking`.
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
    /// and `buffer` must stay valid until then. Cost: as `read`, minus the waits.
    public func readWithoutBlocking(
        _ id: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, queue: AIOLoopQueue?,
        completion: @escaping (Result<[Extent], PoolError>) -> Void
    ) -> NonBlockingRead {
        let plan: ReadPlan?
        do {
            plan = try planRead(id, at: offset, into: buffer, blocking: false)
        } catch {
            return .completed(.failure(error))
        }
        guard let plan else { return .wouldBlock }
        let gate = ioGate
        let (ticket, extents) = (plan.ticket, plan.extents)
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

    private typealias ReadPlan = (requests: [IORequest], extents: [Extent], ticket: DrainGate.Ticket)

    /// Looks the range up and zeroes the holes in `buffer`; on success the caller holds
    /// the I/O gate and must leave it once the planned requests are done. Non-blocking
    /// plans return nil where a blocking one would wait.
    private func planRead(
        _ id: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, blocking: Bool = true
    ) throws(PoolError) -> ReadPlan? {
        // Shared access: reads plan side by side, and during a commit's I/O.
        func plan(_ state: borrowing PoolState) throws(PoolError) -> ReadPlan? {
            let volume = try volume(id, writing: false, at: offset, count: UInt64(buffer.count), in: state)
            var found: (requests: [IORequest], extents: [Extent]) = ([], [])
            if buffer.count > 0 {
                do throws(MetadataError) {
                    found = try lookUpRead(volume, in: state.mappings, at: offset, into: buffer, cachedOnly: !blocking)
                } catch {
                    if case .notCached = error { return nil }
                    throw noticing(PoolError(error))
                }
            }
            // Entered under the lock, so before any commit that frees these blocks.
            return (found.requests, found.extents, ioGate.enter())
        }
        if blocking { return try lock.withSharedAccess(plan) }
        return try lock.tryWithSharedAccess(plan) ?? nil
    }

    private func lookUpRead(
        _ volume: VolumeState, in mappings: BTree, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, cachedOnly: Bool
    ) throws(MetadataError) -> (requests: [IORequest], extents: [Extent]) {
        let end = offset + UInt64(buffer.count)
        var batch = RequestBatch()
        var runs = ExtentList()
        var zeroFrom = 0
        let blocks = (offset / blockSize)..<((end + blockSize - 1) / blockSize)
        try mappings.forEach(volume.record.mappingRoot, in: blocks, cachedOnly: cachedOnly) { (vb: UInt64, physical: UInt64) -> Bool in
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
        return (batch.requests, runs.extents)
    }

    // MARK: Write

    /// Writes `data` at `offset`. Blocks shared with a snapshot or clone are copied first
    /// (only the part the write does not cover is read; a whole-block write copies
    /// nothing). Throws `.noDataSpace` before changing anything when the pool lacks the
    /// blocks. Durable after the next commit.
    ///
    /// With `forceUnitAccess` (NBD's FUA flag) the write, and everything before it, is
    /// durable when this returns: the pool commits.
    public func write(_ id: UInt64, at offset: UInt64, from data: UnsafeRawBufferPointer, forceUnitAccess: Bool = false) throws(PoolError) {
        guard data.count > 0 else {
            try lock.withLock { (state: inout PoolState) throws(PoolError) in
                _ = try volume(id, writing: true, at: offset, count: 0, in: state)
                if forceUnitAccess { try commit(&state) }
            }
            return
        }
        // Writes to different blocks run their data I/O in parallel; overlapping ones and
        // volume operations wait for each other on the range lock.
        try rangeLocks.withRange(id, blockRange(offset, UInt64(data.count))) { () throws(PoolError) in
            try writeHoldingRange(id, at: offset, from: data, forceUnitAccess: forceUnitAccess)
        }
    }

    /// `write` for a caller that holds the range lock of the blocks written.
    ///
    /// `zeroFill`: `data` is all zeros, so new blocks that are known to read as zeros
    /// (above the zero mark) and are wholly covered, or were unmapped, get no data I/O
    /// at all, and other whole blocks have their storage released (a hole in the pool
    /// file, made durable by the commit's barrier like a write): write-zeroes without
    /// holes then costs metadata, not bandwidth. The blocks stay allocated in the pool.
    private func writeHoldingRange(
        _ id: UInt64, at offset: UInt64, from data: UnsafeRawBufferPointer, forceUnitAccess: Bool, zeroFill: Bool = false
    ) throws(PoolError) {
        let plan = try lock.withLock { (state: inout PoolState) throws(PoolError) -> WritePlan in
            let volume = try volume(id, writing: true, at: offset, count: UInt64(data.count), in: state)
            return try planWrite(&state, volume, at: offset, count: UInt64(data.count), reserveOnly: true)
        }
        var entries = plan.entries
        if zeroFill {
            let blockSize = self.blockSize
            entries.removeAll { entry in
                !entry.inPlace && entry.targetReadsZero && (entry.current == nil || entry.length == blockSize)
            }
            // Whole blocks are zeroed by releasing their storage (they then read as
            // zeros) instead of writing zeros; where the host cannot, zeros are written.
            var runs: [(start: UInt64, blocks: UInt64, entries: [Int])] = []
            for (index, entry) in entries.enumerated() where entry.length == blockSize {
                let physical = entry.inPlace ? entry.current! : entry.target
                if let last = runs.last, last.start + last.blocks == physical {
                    runs[runs.count - 1].blocks += 1
                    runs[runs.count - 1].entries.append(index)
                } else {
                    runs.append((physical, 1, [index]))
                }
            }
            var released = Set<Int>()
            for run in runs where device.discard(at: diskOffset(run.start), length: run.blocks * blockSize) {
                released.formUnion(run.entries)
            }
            entries = entries.enumerated().filter { !released.contains($0.offset) }.map(\.element)
        }
        // No gate needed: the range lock keeps every block this touches referenced.
        do throws(PoolError) {
            try writeData(entries, data: data, zeroMark: plan.zeroMark)
        } catch {
            lock.withLock { state in abandonWrite(&state, plan) }
            throw error
        }
        // The range lock kept the volume from being deleted or resized meanwhile.
        try lock.withLock { (state: inout PoolState) throws(PoolError) in
            try applyWrite(&state, id, plan)
            if forceUnitAccess { try commit(&state) }
        }
    }

    struct BlockWrite {
        var virtual: UInt64
        var inner: UInt64
        var length: UInt64
        var dataOffset: Int
        var current: UInt64?
        var target: UInt64 = 0
        var inPlace: Bool
        /// The new block reads as zeros already (never written since creation, or its
        /// storage released after it was freed): nothing around the data needs writing.
        var targetReadsZero = false
    }

    /// What a write will do, decided under the pool lock: per block, write in place or
    /// into a newly allocated block (copying the rest of a shared block first).
    struct WritePlan {
        var entries: [BlockWrite] = []
        var allocated: [UInt64] = []
        /// The new blocks are only reserved (the data I/O runs outside the lock, and a
        /// commit in between must not record them as used).
        var reserved = false
        /// Blocks at or above this read as zeros (never written).
        var zeroMark: UInt64 = 0
    }

    /// Writes under the pool lock from start to end (write-zeroes and shrink use it; the
    /// caller holds the range lock for the blocks).
    func writeHoldingLock(_ state: inout PoolState, _ id: UInt64, at offset: UInt64, from data: UnsafeRawBufferPointer) throws(PoolError) {
        guard let volume = state.volumes[id] else { throw .noSuchVolume("#\(id)") }
        let plan = try planWrite(&state, volume, at: offset, count: UInt64(data.count))
        do {
            try writeData(plan.entries, data: data, zeroMark: plan.zeroMark)
        } catch {
            abandonWrite(&state, plan)
            throw error
        }
        try applyWrite(&state, id, plan)
    }

    /// Decides each block's fate and allocates every new block up front, so a full pool
    /// fails the write before any change.
    func planWrite(_ state: inout PoolState, _ volume: VolumeState, at offset: UInt64, count: UInt64, reserveOnly: Bool = false) throws(PoolError) -> WritePlan {
        let (tree, spaceMap) = (state.mappings, state.spaceMap)
        var plan = WritePlan()
        plan.reserved = reserveOnly
        var position = offset
        let end = offset + count
        try mapErrors {
            while position < end {
                let vb = position / blockSize
                let inner = position - vb * blockSize
                let length = min(blockSize - inner, end - position)
                var current: UInt64?
                var inPlace = false
                if let (physical, pathShared) = try tree.lookupWithSharing(volume.record.mappingRoot, vb) {
                    current = physical
                    if !pathShared && !spaceMap.sharingDroppedThisTransaction(physical) {
                        inPlace = try spaceMap.refcount(physical) == 1
                    }
                }
                plan.entries.append(BlockWrite(virtual: vb, inner: inner, length: length, dataOffset: Int(position - offset), current: current, inPlace: inPlace))
                position += length
            }
        }
        let needed = plan.entries.lazy.filter { !$0.inPlace }.count
        plan.zeroMark = spaceMap.highWater
        if needed > 0 {
            let firstNew = plan.entries.first { !$0.inPlace }!.virtual
            let hint: UInt64? = try mapErrors {
                guard firstNew > 0, let previous = try tree.lookup(volume.record.mappingRoot, firstNew - 1) else { return nil }
                return previous + 1
            }
            let runs: [Range<UInt64>]
            do throws(PoolError) {
                runs = try mapErrors { try spaceMap.allocate(UInt64(needed), near: hint, reserveOnly: reserveOnly) }
            } catch {
                // With an autogrow policy, a full pool grows instead of failing the write.
                guard case .noDataSpace = error, try growForPolicy(&state, atLeast: UInt64(needed)) != nil else { throw error }
                runs = try mapErrors { try spaceMap.allocate(UInt64(needed), near: hint, reserveOnly: reserveOnly) }
            }
            plan.allocated.reserveCapacity(needed)
            for run in runs { plan.allocated.append(contentsOf: run) }
            var next = 0
            for i in plan.entries.indices where !plan.entries[i].inPlace {
                let target = plan.allocated[next]
                plan.entries[i].target = target
                // Taken out of the known-zero set either way: the write may put data there.
                let released = state.knownZero.remove(target)
                plan.entries[i].targetReadsZero = target >= plan.zeroMark || released
                next += 1
            }
        }
        return plan
    }

    /// Returns a failed write's new blocks.
    func abandonWrite(_ state: inout PoolState, _ plan: WritePlan) {
        for block in plan.allocated {
            if plan.reserved { state.spaceMap.unreserve(block) } else { try? state.spaceMap.decRef(block) }
        }
    }

    /// Maps the written blocks into volume `id` and releases the ones they replaced.
    func applyWrite(_ state: inout PoolState, _ id: UInt64, _ plan: WritePlan) throws(PoolError) {
        guard let volume = state.volumes[id] else {
            abandonWrite(&state, plan)
            throw .noSuchVolume("#\(id)")
        }
        for entry in plan.entries where !entry.inPlace {
            if entry.current == nil {
                state.statistics.newBlocks += 1
            } else {
                state.statistics.copyOnWriteBlocks += 1
            }
        }
        let (tree, spaceMap) = (state.mappings, state.spaceMap)
        var root = volume.record.mappingRoot
        var mapped = volume.record.mappedBlocks
        defer {
            state.volumes[id]?.change { record in
                record.mappingRoot = root
                record.mappedBlocks = mapped
            }
        }
        // `mappedCount` new blocks are in the tree; `holding` says whether the next one
        // already has its reference (materialized or allocated) without being mapped.
        var mappedCount = 0
        var holding = !plan.reserved
        do {
            for entry in plan.entries where !entry.inPlace {
                if plan.reserved {
                    try spaceMap.materialize(entry.target)
                    holding = true
                }
                let (newRoot, replaced) = try tree.insert(root, entry.virtual, entry.target)
                root = newRoot
                mappedCount += 1
                holding = !plan.reserved
                if let replaced { try spaceMap.decRef(replaced) } else { mapped &+= 1 }
            }
        } catch {
            for (index, block) in plan.allocated.enumerated().dropFirst(mappedCount) {
                if index == mappedCount && holding || !plan.reserved {
                    try? spaceMap.decRef(block)
                } else {
                    spaceMap.unreserve(block)
                }
            }
            throw noticing(PoolError(error))
        }
    }

    /// The data I/O of one or more write plans, gathered so that it leaves in two device
    /// batches: the copy-on-write reads, then every write.
    struct WriteDataIO {
        var reads = RequestBatch()
        var writes = RequestBatch()
        var copies: [(entry: BlockWrite, buffer: AlignedBuffer, data: UnsafeRawBufferPointer)] = []
    }

    /// Writes the data blocks of a plan: in place, into fresh blocks, or copy-on-write.
    func writeData(_ plan: [BlockWrite], data: UnsafeRawBufferPointer, zeroMark: UInt64) throws(PoolError) {
        var io = WriteDataIO()
        addWriteData(plan, data: data, zeroMark: zeroMark, to: &io)
        try performWriteData(&io)
    }

    func addWriteData(_ plan: [BlockWrite], data: UnsafeRawBufferPointer, zeroMark: UInt64, to io: inout WriteDataIO) {
        let source = UnsafeMutableRawBufferPointer(mutating: data)
        for entry in plan {
            let slice = UnsafeMutableRawBufferPointer(rebasing: source[entry.dataOffset..<entry.dataOffset + Int(entry.length)])
            if entry.inPlace {
                io.writes.add(.write, slice, at: diskOffset(entry.current!, entry.inner))
            } else if entry.length == blockSize || (entry.current == nil && entry.targetReadsZero) {
                // A whole block, or a fresh block that is known to read as zeros.
                io.writes.add(.write, slice, at: diskOffset(entry.target, entry.inner))
            } else {
                let scratch = buffers.take(Int(blockSize))
                if entry.current == nil { scratch.zero() }
                if let current = entry.current {
                    let head = Int(entry.inner)
                    let tail = Int(entry.inner + entry.length)
                    io.reads.add(.read, UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[0..<head]), at: diskOffset(current))
                    io.reads.add(.read, UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[tail...]), at: diskOffset(current, UInt64(tail)))
                }
                io.copies.append((entry, scratch, data))
            }
        }
    }

    /// Runs gathered data I/O; the copy buffers go back to the pool whatever happens.
    func performWriteData(_ io: inout WriteDataIO) throws(PoolError) {
        defer {
            for copy in io.copies { buffers.give(copy.buffer) }
            io.copies.removeAll()
        }
        try mapErrors { try device.perform(io.reads.requests) }
        for (entry, scratch, data) in io.copies {
            let inner = Int(entry.inner)
            UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[inner..<inner + Int(entry.length)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[entry.dataOffset..<entry.dataOffset + Int(entry.length)]))
            io.writes.add(.write, scratch.bytes, at: diskOffset(entry.target))
        }
        try mapErrors { try device.perform(io.writes.requests) }
    }

    /// One write of a `writeBatch`.
    public struct BatchedWrite {
        public var volume: UInt64
        public var offset: UInt64
        public var data: UnsafeRawBufferPointer
        public var forceUnitAccess: Bool

        public init(volume: UInt64, offset: UInt64, data: UnsafeRawBufferPointer, forceUnitAccess: Bool = false) {
            self.volume = volume
            self.offset = offset
            self.data = data
            self.forceUnitAccess = forceUnitAccess
        }
    }

    /// Runs many writes as `write` would, each with its own outcome (nil: done), but
    /// together: one range-lock acquisition, one pool-lock section to plan them all, their
    /// data in two device batches, one section to map them, and at most one commit (when
    /// any asked for FUA). Writes that overlap an earlier one of the batch run in a later
    /// round, after it. Cost per batch instead of per write; meant for a server that
    /// gathers the writes its connections sent in one pass.
    public func writeBatch(_ writes: [BatchedWrite]) -> [PoolError?] {
        var results = [PoolError?](repeating: nil, count: writes.count)
        var pending = Array(writes.indices)
        while !pending.isEmpty {
            var round: [Int] = []
            var ranges: [(owner: UInt64, range: Range<UInt64>)] = []
            var later: [Int] = []
            for i in pending {
                let range = blockRange(writes[i].offset, UInt64(writes[i].data.count))
                if ranges.contains(where: { $0.owner == writes[i].volume && $0.range.overlaps(range) }) {
                    later.append(i)
                } else {
                    ranges.append((writes[i].volume, range))
                    round.append(i)
                }
            }
            rangeLocks.withRanges(ranges) { writeRound(round, of: writes, into: &results) }
            pending = later
        }
        return results
    }

    /// One round of `writeBatch`, holding the range locks of all its writes.
    private func writeRound(_ round: [Int], of writes: [BatchedWrite], into results: inout [PoolError?]) {
        var planned: [(index: Int, plan: WritePlan)] = []
        lock.withLock { state in
            for i in round {
                let (id, offset, count) = (writes[i].volume, writes[i].offset, UInt64(writes[i].data.count))
                do throws(PoolError) {
                    let volume = try volume(id, writing: true, at: offset, count: count, in: state)
                    planned.append((i, try planWrite(&state, volume, at: offset, count: count, reserveOnly: true)))
                } catch {
                    results[i] = error
                }
            }
        }
        var io = WriteDataIO()
        for (i, plan) in planned {
            addWriteData(plan.entries, data: writes[i].data, zeroMark: plan.zeroMark, to: &io)
        }
        do throws(PoolError) {
            try performWriteData(&io)
        } catch {
            // Which write failed is not known: undo all and let each find its own outcome.
            lock.withLock { state in for entry in planned { abandonWrite(&state, entry.plan) } }
            for (i, _) in planned {
                do throws(PoolError) {
                    // The round holds this write's range lock already.
                    try writeHoldingRange(writes[i].volume, at: writes[i].offset, from: writes[i].data, forceUnitAccess: writes[i].forceUnitAccess)
                } catch let failure {
                    results[i] = failure
                }
            }
            return
        }
        lock.withLock { state in
            var commitFailure: PoolError?
            for (i, plan) in planned {
                do throws(PoolError) {
                    try applyWrite(&state, writes[i].volume, plan)
                } catch {
                    results[i] = error
                }
            }
            if planned.contains(where: { writes[$0.index].forceUnitAccess && results[$0.index] == nil }) {
                do throws(PoolError) { try commit(&state) } catch { commitFailure = error }
                if let commitFailure {
                    for (i, _) in planned where writes[i].forceUnitAccess && results[i] == nil { results[i] = commitFailure }
                }
            }
        }
    }

    // MARK: Zeroes, trim, flush

    /// Makes the range read as zeros. Whole blocks are unmapped (unless `mayUnmap` is
    /// false, then zeros are written and the space stays allocated); partial blocks that
    /// are mapped get zeros written into them.
    ///
    /// Works in bounded slices (`sliceBlocks` blocks unmapped, or `zeroes.count` bytes
    /// written, per pool-lock section), and writes its zeros outside the pool lock, so
    /// zeroing gigabytes never stalls other volumes' I/O or a commit. Not atomic: a
    /// failure part-way (a full pool, a volume deleted meanwhile) leaves the slices done
    /// zeroed, which NBD allows for a failed request.
    public func writeZeroes(_ id: UInt64, at offset: UInt64, count: UInt64, mayUnmap: Bool = true) throws(PoolError) {
        try lock.withSharedAccess { state throws(PoolError) in
            _ = try volume(id, writing: true, at: offset, count: count, in: state)
            guard count > 0 else { return }
            // Fail before changing anything when the zeros might need more blocks than
            // are free: at most the two partial ends, or every block when nothing is unmapped.
            let touched = (offset + count - 1) / blockSize - offset / blockSize + 1
            let worstCase = mayUnmap ? min(2, touched) : touched
            if state.spaceMap.freeBlocks < worstCase && state.autoGrow == nil {
                throw .noDataSpace("pool is out of data space (write-zeroes may need \(worstCase) blocks, \(state.spaceMap.freeBlocks) free)")
            }
        }
        guard count > 0 else { return }
        let end = offset + count
        guard mayUnmap else {
            try writeZeroBytes(id, from: offset, to: end)
            return
        }
        let firstWhole = (offset + blockSize - 1) / blockSize
        let endWhole = end / blockSize
        guard firstWhole < endWhole else {
            try zeroMappedPartial(id, from: offset, to: end)
            return
        }
        try zeroMappedPartial(id, from: offset, to: firstWhole * blockSize)
        try unmapInSlices(id, blocks: firstWhole..<endWhole)
        try zeroMappedPartial(id, from: endWhole * blockSize, to: end)
    }

    /// Blocks one lock section of a trim or write-zeroes unmaps at most.
    static let sliceBlocks: UInt64 = 256

    /// Writes zeros over `start..<end` through the ordinary write path, a slice at a time
    /// (skipping the data I/O of new blocks that read as zeros already).
    private func writeZeroBytes(_ id: UInt64, from start: UInt64, to end: UInt64) throws(PoolError) {
        var position = start
        while position < end {
            let length = min(UInt64(zeroes.count), end - position)
            try rangeLocks.withRange(id, blockRange(position, length)) { () throws(PoolError) in
                try writeHoldingRange(
                    id, at: position, from: UnsafeRawBufferPointer(rebasing: zeroes.bytes[0..<Int(length)]),
                    forceUnitAccess: false, zeroFill: true)
            }
            position += length
            // Between slices, lookups that waited for the lock get their turn first.
            SystemInfo.yieldProcessor()
        }
    }

    /// Writes zeros into the mapped blocks of `start..<end`, a range that covers no
    /// whole block (at most parts of two), one block at a time; unmapped parts already
    /// read as zeros.
    private func zeroMappedPartial(_ id: UInt64, from start: UInt64, to end: UInt64) throws(PoolError) {
        var position = start
        while position < end {
            let length = min(blockSize - position % blockSize, end - position)
            try rangeLocks.withRange(id, blockRange(position, length)) { () throws(PoolError) in
                let mapped = try lock.withSharedAccess { state throws(PoolError) -> Bool in
                    let volume = try volume(id, writing: true, at: position, count: length, in: state)
                    return try mapErrors { try state.mappings.lookup(volume.record.mappingRoot, position / blockSize) != nil }
                }
                guard mapped else { return }
                try writeHoldingRange(
                    id, at: position, from: UnsafeRawBufferPointer(rebasing: zeroes.bytes[0..<Int(length)]), forceUnitAccess: false)
            }
            position += length
        }
    }

    /// Unmaps whole blocks, `sliceBlocks` per lock section.
    private func unmapInSlices(_ id: UInt64, blocks: Range<UInt64>) throws(PoolError) {
        var first = blocks.lowerBound
        while first < blocks.upperBound {
            let slice = first..<min(blocks.upperBound, first + Self.sliceBlocks)
            try rangeLocks.withRange(id, slice) { () throws(PoolError) in
                try lock.withLock { (state: inout PoolState) throws(PoolError) in
                    _ = try volume(id, writing: true, at: slice.lowerBound * blockSize, count: UInt64(slice.count) * blockSize, in: state)
                    try unmap(&state, id, blocks: slice)
                }
            }
            first = slice.upperBound
            SystemInfo.yieldProcessor()
        }
    }

    /// The virtual blocks a byte range touches (everything when it overflows: the range
    /// check then refuses the request).
    func blockRange(_ offset: UInt64, _ count: UInt64) -> Range<UInt64> {
        let (end, overflow) = offset.addingReportingOverflow(count)
        guard !overflow, count > 0 else { return 0..<UInt64.max }
        return (offset / blockSize)..<((end - 1) / blockSize + 1)
    }

    /// Zeroes a range of volume `id` under the exclusive lock (resize uses it for the
    /// tail of the last block).
    func zero(_ state: inout PoolState, _ id: UInt64, from offset: UInt64, count: UInt64, unmapWholeBlocks: Bool) throws(PoolError) {
        guard count > 0 else { return }
        let end = offset + count
        // Fail before changing anything when the zeros might need more blocks than are
        // free: at most the two partial ends, or every block when nothing is unmapped.
        let worstCase = unmapWholeBlocks ? min(2, (end - 1) / blockSize - offset / blockSize + 1) : (end - 1) / blockSize - offset / blockSize + 1
        if state.spaceMap.freeBlocks < worstCase {
            throw .noDataSpace("pool is out of data space (write-zeroes may need \(worstCase) blocks, \(state.spaceMap.freeBlocks) free)")
        }
        let firstWhole = (offset + blockSize - 1) / blockSize
        let endWhole = end / blockSize
        if unmapWholeBlocks && firstWhole < endWhole {
            try unmap(&state, id, blocks: firstWhole..<endWhole)
            try zeroPartial(&state, id, from: offset, to: min(end, firstWhole * blockSize))
            try zeroPartial(&state, id, from: max(offset, endWhole * blockSize), to: end)
        } else if unmapWholeBlocks {
            try zeroPartial(&state, id, from: offset, to: end)
        } else {
            var position = offset
            while position < end {
                let length = min(blockSize - position % blockSize, end - position)
                let zeros = UnsafeRawBufferPointer(rebasing: state.zeroScratch.bytes[0..<Int(length)])
                try writeHoldingLock(&state, id, at: position, from: zeros)
                position += length
            }
        }
    }

    /// Writes zeros into the mapped blocks of a range that spans at most part of two blocks.
    private func zeroPartial(_ state: inout PoolState, _ id: UInt64, from start: UInt64, to end: UInt64) throws(PoolError) {
        var position = start
        while position < end {
            let length = min(blockSize - position % blockSize, end - position)
            guard let volume = state.volumes[id] else { throw .noSuchVolume("#\(id)") }
            let mapped = try mapErrors { try state.mappings.lookup(volume.record.mappingRoot, position / blockSize) != nil }
            if mapped {
                let zeros = UnsafeRawBufferPointer(rebasing: state.zeroScratch.bytes[0..<Int(length)])
                try writeHoldingLock(&state, id, at: position, from: zeros)
            }
            position += length
        }
    }

    /// Discards whole blocks in the range (partial blocks are left as they are); they
    /// then read as zeros and their space returns to the pool at the next commit.
    /// Sliced like `writeZeroes`, so a huge trim never holds the pool lock for long.
    public func trim(_ id: UInt64, at offset: UInt64, count: UInt64) throws(PoolError) {
        try lock.withSharedAccess { state throws(PoolError) in
            _ = try volume(id, writing: true, at: offset, count: count, in: state)
        }
        let firstWhole = (offset + blockSize - 1) / blockSize
        let endWhole = (offset + count) / blockSize
        if firstWhole < endWhole { try unmapInSlices(id, blocks: firstWhole..<endWhole) }
    }

    /// Unmaps `blocks` of volume `id`; their space returns to the pool at the next commit.
    /// It frees space, so it may use the metadata reserve.
    func unmap(_ state: inout PoolState, _ id: UInt64, blocks: Range<UInt64>) throws(PoolError) {
        guard let volume = state.volumes[id] else { throw .noSuchVolume("#\(id)") }
        let (tree, spaceMap) = (state.mappings, state.spaceMap)
        var mapped = volume.record.mappedBlocks
        var root = volume.record.mappingRoot
        defer {
            state.volumes[id]?.change { record in
                record.mappedBlocks = mapped
                record.mappingRoot = root
            }
        }
        try state.store.usingReserve { () throws(PoolError) in
            try mapErrors {
                root = try tree.removeAll(root, in: blocks) { (_: UInt64, physical: UInt64) throws(MetadataError) in
                    try spaceMap.decRef(physical)
                    // The count comes from disk: a wrong one is stale (check reports it and
                    // --repair recounts), never a reason to trap.
                    mapped = mapped > 0 ? mapped - 1 : 0
                }
            }
        }
    }

    /// Makes every write so far durable (a commit). Same as `commit()`.
    public func flush() throws(PoolError) { try commit() }

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
            return runs.extents
        }
    }
}

/// Builds a list of extents, merging a run into the previous one when it continues it
/// with the same state.
struct ExtentList {
    var extents: [Extent] = []

    mutating func add(_ start: UInt64, _ stop: UInt64, mapped: Bool) {
        guard stop > start else { return }
        if let last = extents.last, last.isMapped == mapped, last.offset + last.length == start {
            extents[extents.count - 1].length += stop - start
        } else {
            extents.append(Extent(offset: start, length: stop - start, isMapped: mapped))
        }
    }
}
