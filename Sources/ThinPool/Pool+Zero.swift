import ThinFormat
import ThinMetadata
import ThinSystem

/// Write-zeroes, trim and flush: long ranges are worked in bounded slices, so that zeroing
/// or trimming gigabytes never holds the pool lock for long.
extension Pool {
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
        // An unmapped block of an origin-backed volume reads the origin: its zeros are
        // mapped to the shared zero block instead, and partly zeroed blocks keep the
        // origin's other bytes (fetched first).
        let originBacked = try originOf(id) != nil
        if originBacked { try fetchPartialEnds(id, at: offset, count: count) }
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
        if originBacked {
            try shareZeroInSlices(id, blocks: firstWhole..<endWhole)
        } else {
            try unmapInSlices(id, blocks: firstWhole..<endWhole)
        }
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

    /// Maps whole blocks of volume `id` to the shared zero block, `sliceBlocks` per lock
    /// section: they read as zeros, not as the origin, and cost no data space.
    private func shareZeroInSlices(_ id: UInt64, blocks: Range<UInt64>) throws(PoolError) {
        var first = blocks.lowerBound
        while first < blocks.upperBound {
            let slice = first..<min(blocks.upperBound, first + Self.sliceBlocks)
            try rangeLocks.withRange(id, slice) { () throws(PoolError) in try zeroWholeBlocksHoldingRange(id, slice) }
            first = slice.upperBound
            SystemInfo.yieldProcessor()
        }
    }

    /// Maps `blocks` of image `id` to the shared zero block (`DataSpaceMap.sharedZeroBlock`).
    /// When there is none yet, the first block is zeroed through the write path (a new
    /// block that reads as zeros, or its storage released) and becomes it. The caller
    /// holds the range lock of the blocks. `fillingFromOrigin`: zeros fetched from the
    /// origin, which a snapshot takes too. Crash-safe as any write; costs metadata only,
    /// past the one block a pool zeroes once per open.
    func zeroWholeBlocksHoldingRange(_ id: UInt64, _ blocks: Range<UInt64>, fillingFromOrigin: Bool = false) throws(PoolError) {
        guard !blocks.isEmpty else { return }
        let shared = try lock.withLock { (state: inout PoolState) throws(PoolError) -> Bool in
            _ = try volume(
                id, writing: true, fillingFromOrigin: fillingFromOrigin, at: blocks.lowerBound * blockSize,
                count: UInt64(blocks.count) * blockSize, in: state)
            return try mapSharedZero(&state, id, blocks)
        }
        guard !shared else { return }
        let first = blocks.lowerBound
        try writeHoldingRange(
            id, at: first * blockSize, from: UnsafeRawBufferPointer(rebasing: zeroes.bytes[0..<Int(blockSize)]),
            forceUnitAccess: false, zeroFill: true, fillingFromOrigin: fillingFromOrigin)
        try lock.withLock { (state: inout PoolState) throws(PoolError) in
            // The range lock kept every other writer off this block, which no other image
            // maps (a new block, or one written in place): it holds zeros.
            if state.spaceMap.sharedZeroBlock == nil, let volume = state.volumes[id],
                let physical = try mapErrors({ try state.mappings.lookup(volume.record.mappingRoot, first) })
            {
                state.spaceMap.adoptSharedZero(physical)
            }
            guard blocks.count > 1 else { return }
            _ = try mapSharedZero(&state, id, first + 1..<blocks.upperBound)
        }
    }

    /// Most references the shared zero block takes before another one is zeroed (the
    /// counts are 32-bit).
    static let sharedZeroLimit: UInt32 = 1 << 31

    /// Maps `blocks` of image `id` to the shared zero block, releasing what they mapped
    /// before; false (nothing changed) when there is no shared zero block.
    private func mapSharedZero(_ state: inout PoolState, _ id: UInt64, _ blocks: Range<UInt64>) throws(PoolError) -> Bool {
        let spaceMap = state.spaceMap
        guard let zero = spaceMap.sharedZeroBlock else { return false }
        let references = try mapErrors { try spaceMap.refcount(zero) }
        guard references > 0, references < Self.sharedZeroLimit - UInt32(min(blocks.count, Int(Self.sliceBlocks) * 4)) else {
            spaceMap.forgetSharedZero()
            return false
        }
        try mapSharing(&state, id, blocks, to: zero)
        return true
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
        guard firstWhole < endWhole else { return }
        if try originOf(id) != nil {
            // Unmapping would bring the origin's bytes back: trimmed blocks share the zero block.
            return try shareZeroInSlices(id, blocks: firstWhole..<endWhole)
        }
        try unmapInSlices(id, blocks: firstWhole..<endWhole)
    }

    /// Unmaps `blocks` of volume `id`; their space returns to the pool at the next commit.
    /// It frees space, so it may use the metadata reserve.
    func unmap(_ state: inout PoolState, _ id: UInt64, blocks: Range<UInt64>) throws(PoolError) {
        let (tree, spaceMap, store) = (state.mappings, state.spaceMap, state.store)
        try state.changingMapping(of: id) { root, mapped throws(PoolError) in
            try store.usingReserve { () throws(PoolError) in
                try mapErrors {
                    root = try tree.removeAll(root, in: blocks) { (_: UInt64, physical: UInt64) throws(MetadataError) in
                        try spaceMap.decRef(physical)
                        // The count comes from disk: a wrong one is stale (check reports it
                        // and --repair recounts), never a reason to trap.
                        mapped = mapped > 0 ? mapped - 1 : 0
                    }
                }
            }
        }
    }

    /// Makes every write so far durable (a commit). Same as `commit()`.
    public func flush() throws(PoolError) { try commit() }
}
