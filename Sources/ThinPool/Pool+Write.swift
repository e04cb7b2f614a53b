import ThinFormat
import ThinMetadata
import ThinSystem
import Synchronization

/// Volume writes: planned under the pool lock (in place, or into new blocks allocated up
/// front), their data I/O outside it, then mapped under it.
extension Pool {
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
        try fetchPartialEnds(id, at: offset, count: UInt64(data.count))
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
    func writeHoldingRange(
        _ id: UInt64, at offset: UInt64, from data: UnsafeRawBufferPointer, forceUnitAccess: Bool, zeroFill: Bool = false,
        fillingFromOrigin: Bool = false
    ) throws(PoolError) {
        let plan = try lock.withLock { (state: inout PoolState) throws(PoolError) -> WritePlan in
            let volume = try volume(id, writing: true, fillingFromOrigin: fillingFromOrigin, at: offset, count: UInt64(data.count), in: state)
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
                    inPlace = try Self.ownsForInPlaceWrite(physical, pathShared: pathShared, spaceMap, cachedOnly: false)
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
        guard state.volumes[id] != nil else {
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
        try state.changingMapping(of: id) { root, mapped throws(PoolError) in
            // `mappedCount` new blocks are in the tree; `holding` says whether the next one
            // already has its reference (materialized or allocated) without being mapped.
            var mappedCount = 0
            var holding = !plan.reserved
            do throws(MetadataError) {
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
    }

    /// The data I/O of one or more write plans, gathered so that it leaves in two device
    /// batches: the copy-on-write reads, then every write.
    struct WriteDataIO {
        var reads = RequestBatch()
        /// Overwrites of blocks the volume owns.
        var writes = RequestBatch()
        /// Writes into new blocks, whole or into blocks that read as zeros already.
        var newBlocks = RequestBatch()
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
                io.newBlocks.add(.write, slice, at: diskOffset(entry.target, entry.inner))
            } else {
                let scratch = buffers.take(Int(blockSize))
                if entry.current == nil { scratch.zero() }
                if let current = entry.current {
                    // The whole old block in one read (the written part is overlaid after):
                    // one I/O where reading around the write took two.
                    io.reads.add(.read, scratch.bytes, at: diskOffset(current))
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
        try mapErrors { try device.readCopySources(io.reads.requests) }
        var copies = RequestBatch()
        for (entry, scratch, data) in io.copies {
            let inner = Int(entry.inner)
            UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[inner..<inner + Int(entry.length)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[entry.dataOffset..<entry.dataOffset + Int(entry.length)]))
            copies.add(.write, scratch.bytes, at: diskOffset(entry.target))
        }
        if !io.writes.requests.isEmpty { try mapErrors { try device.perform(io.writes.requests) } }
        // New blocks go as such: the auto-commit that maps them makes them durable (and
        // not the data overwritten in place). Copies go around the page cache.
        if !io.newBlocks.requests.isEmpty { try mapErrors { try device.writeNewBlocks(io.newBlocks.requests, bypassingCache: false) } }
        if !copies.requests.isEmpty { try mapErrors { try device.writeNewBlocks(copies.requests, bypassingCache: true) } }
    }

    /// Whether `writeInPlaceWithoutBlocking` started.
    public enum NonBlockingWrite {
        /// Queued on the caller's loop queue; the completion runs there.
        case started
        /// Nothing done: the write needs the blocking path (see `writeInPlaceWithoutBlocking`).
        /// Call `write` or `writeBatch` from a thread that may block.
        case wouldBlock
    }

    /// Starts a write that only overwrites blocks volume `id` owns, without ever blocking
    /// the calling thread: for event loops, so that such a write goes from socket to disk
    /// and back without a thread hand-off. `queue` must belong to the calling thread;
    /// `completion` runs there, only after `.started`; `data` must stay valid until then.
    ///
    /// It says `.wouldBlock`, changing nothing, whenever the write needs more than data
    /// I/O or would wait: a block is unmapped, shared (or was shared by the last commit),
    /// or the shared zero block; the volume has an origin; its blocks are locked by
    /// another write or a volume operation; the pool lock is held exclusively; metadata
    /// is not cached; the device cannot queue it (O_DIRECT alignment, a queue without
    /// room); or any check fails (the blocking path then reports the error).
    ///
    /// Crash safety: as an in-place write through `write`: the data is durable after the
    /// next FLUSH (commit), and no metadata changes. The blocks' range lock is held until
    /// the data I/O completes, so snapshots and other volume operations wait for it.
    public func writeInPlaceWithoutBlocking(
        _ id: UInt64, at offset: UInt64, from data: UnsafeRawBufferPointer, queue: LoopDiskQueue?,
        completion: @escaping (PoolError?) -> Void
    ) -> NonBlockingWrite {
        guard let queue, data.count > 0, !hasFailed.load(ordering: .acquiring) else { return .wouldBlock }
        let count = UInt64(data.count)
        let range = blockRange(offset, count)
        guard let hold = rangeLocks.tryHold(id, range) else { return .wouldBlock }
        // From the state's address: a borrowed state would be copied here, per write.
        let requests = try? lock.tryWithSharedAddress { state throws(PoolError) -> [IORequest]? in
            let volume = try volumeLookup(id, writing: true, at: offset, count: count, in: state)
            guard !volume.hasOrigin else { return nil }
            return try inPlaceRequests(volume.mappingRoot, at: offset, data: data, in: state)
        }
        guard let requests = requests ?? nil else {
            rangeLocks.release(hold)
            return .wouldBlock
        }
        let locks = rangeLocks
        let started = device.startWritesWithoutBlocking(requests, on: queue) { error in
            locks.release(hold)
            completion(error.map { .io($0) })
        }
        guard case .started = started else {
            rangeLocks.release(hold)
            return .wouldBlock
        }
        return .started
    }

    /// Whether a write may overwrite mapped block `physical` in place: the mapping path
    /// holds it alone, the last commit did not share it, it is not the shared zero block
    /// (never written in place, even when one mapping holds it: others are about to share
    /// it as zeros) and its count is 1. With `cachedOnly`, an uncached refcount block
    /// throws instead of being read. The one rule for `planWrite` and the loop's writes.
    static func ownsForInPlaceWrite(_ physical: UInt64, pathShared: Bool, _ spaceMap: DataSpaceMap, cachedOnly: Bool) throws(MetadataError) -> Bool {
        guard !pathShared, !spaceMap.sharingDroppedThisTransaction(physical), !spaceMap.isSharedZero(physical) else { return false }
        return try spaceMap.refcount(physical, cachedOnly: cachedOnly) == 1
    }

    /// The device writes of `data` at `offset` when every block it touches is mapped (in
    /// the tree at `mappingRoot`), owned by that volume alone (now and in the last
    /// commit) and not the shared zero block, found in cached metadata; nil otherwise.
    private func inPlaceRequests(
        _ mappingRoot: UInt64, at offset: UInt64, data: UnsafeRawBufferPointer, in state: UnsafePointer<PoolState>
    ) throws(PoolError) -> [IORequest]? {
        let (tree, spaceMap) = (state.pointee.mappings, state.pointee.spaceMap)
        let source = UnsafeMutableRawBufferPointer(mutating: data)
        var position = offset
        let end = offset + UInt64(data.count)
        var requests: [IORequest] = []
        // One request per block touched, allocated once (appending to an empty array
        // would allocate again as it grows).
        requests.reserveCapacity(Int((end - 1) / blockSize - offset / blockSize + 1))
        do throws(MetadataError) {
            while position < end {
                let vb = position / blockSize
                let inner = position - vb * blockSize
                let length = min(blockSize - inner, end - position)
                guard let (physical, pathShared) = try tree.lookupWithSharing(mappingRoot, vb, cachedOnly: true),
                    try Self.ownsForInPlaceWrite(physical, pathShared: pathShared, spaceMap, cachedOnly: true)
                else { return nil }
                let lower = Int(position - offset)
                requests.append(
                    IORequest(.write, UnsafeMutableRawBufferPointer(rebasing: source[lower..<lower + Int(length)]), at: diskOffset(physical, inner)))
                position += length
            }
        } catch {
            // Not cached, or damage: the blocking path reads it, or reports it.
            return nil
        }
        return requests
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
        // Origin-backed volumes: partly written blocks still at the origin come here first.
        pending.removeAll { i in
            do throws(PoolError) {
                try fetchPartialEnds(writes[i].volume, at: writes[i].offset, count: UInt64(writes[i].data.count))
                return false
            } catch {
                results[i] = error
                return true
            }
        }
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
}
