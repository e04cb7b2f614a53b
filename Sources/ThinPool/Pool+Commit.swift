import ThinFormat
import ThinMetadata
import ThinSystem

/// Transactions: every change since the last commit is made durable at once, or not at
/// all. A commit writes the dirty metadata blocks (never over a block the last commit
/// uses), syncs, writes the superblock into the other slot and syncs again.
extension Pool {
    /// Makes every write and change so far durable (a FLUSH). Cost: one write per dirty
    /// metadata block, two barriers (fdatasync), one superblock write.
    ///
    /// Crash safety: after a crash at any moment, open finds either the previous commit
    /// or this one, complete. A commit that fails puts the pool in fail mode: nothing
    /// after it is committed (see `failingOnCommitError`).
    public func commit() throws(PoolError) {
        try lock.withLock { (state: inout PoolState) throws(PoolError) in try commit(&state) }
    }

    /// A commit for the background (auto-commit), as dm-thin does it: it makes durable
    /// what it maps and no more. Data overwritten in place becomes durable at the next
    /// FLUSH, as on a disk with a write cache, and a crash before then leaves the pool
    /// consistent; the commit's barriers are the device's lighter ones
    /// (`writeWithNewBlocksBarrier`), which on ext4 and XFS write back only the new
    /// blocks, not every dirty page. The new blocks are written back first, outside
    /// the pool lock, so that the barriers under it, which writes wait for, have little
    /// left to do. When only data was overwritten in place (or nothing happened) it
    /// does nothing.
    ///
    /// Crash safety: every block a commit maps holds, after a crash, what it was
    /// written with when the commit began (or later data); data overwritten in place
    /// since the last FLUSH may read as before.
    public func commitInBackground() throws(PoolError) {
        if failure != nil {
            // Nothing commits in fail mode; the flag, when damage calls for it, goes out once.
            if needsCheckFlagPending { lock.withLock { state in flagNeedsCheck(&state) } }
            return
        }
        let pending = lock.withSharedAccess { state in !state.isClosed && !isReadOnly && state.hasUncommittedChanges }
        guard pending else { return }
        try failingOnCommitError { () throws(PoolError) in try mapErrors { try device.writeBackNewBlocks() } }
        try lock.withLock { (state: inout PoolState) throws(PoolError) in try commit(&state, newBlocksOnly: true) }
    }

    /// Commits under the exclusive lock the caller holds. `newBlocksOnly`: the
    /// auto-commit's lighter barriers (see `commitInBackground`).
    func commit(_ state: inout PoolState, newBlocksOnly: Bool = false) throws(PoolError) {
        guard !state.isClosed else { throw .closed }
        guard !isReadOnly else { return }
        if let failure {
            // Damage found: nothing more is committed (it would spread), and a FLUSH
            // that cannot make data durable must not report success.
            flagNeedsCheck(&state)
            throw .failed(failure)
        }
        try failingOnCommitError { () throws(PoolError) in try writeCommit(&state, newBlocksOnly: newBlocksOnly) }
    }

    /// Writes volume records and the space map index into metadata blocks (no I/O).
    /// A commit must always be possible, so it may use the metadata reserve.
    func prepareCommit(_ state: inout PoolState) throws(PoolError) {
        try state.store.usingReserve { () throws(PoolError) in
            try mapErrors {
                let table = state.volumeTable
                let dirty = state.volumes.compactMap { id, volume in volume.dirty ? id : nil }
                for id in dirty {
                    var volume = state.volumes[id]!
                    let block: MetadataBlock
                    if volume.recordBlock == 0 {
                        block = try state.store.allocate(.volumeRecord)
                    } else {
                        block = try state.store.shadow(volume.recordBlock, .volumeRecord).block
                    }
                    volume.record.encode(into: block.bytes)
                    if block.number != volume.recordBlock {
                        state.volumeTableRoot = try table.insert(state.volumeTableRoot, id, block.number).root
                        volume.recordBlock = block.number
                    }
                    volume.dirty = false
                    state.volumes[id] = volume
                }
                try state.spaceMap.flushIndex()
            }
        }
    }

    private func writeCommit(_ state: inout PoolState, newBlocksOnly: Bool) throws(PoolError) {
        try prepareCommit(&state)
        let resized = state.superblock.dataBlocks != state.spaceMap.dataBlocks
        guard state.store.hasUncommittedChanges || resized else {
            // Only in-place data writes since the last commit: they need the barrier
            // alone, and reads go on meanwhile; the auto-commit leaves them to FLUSH.
            guard !newBlocksOnly else { return }
            let device = self.device
            try lock.admittingReaders { _ throws(PoolError) in try mapErrors { try device.barrier() } }
            return
        }
        let freed = state.spaceMap.blocksPendingFree
        var next = state.superblock
        next.spaceMapRoot = state.spaceMap.indexRoot
        next.volumeTableRoot = state.volumeTableRoot
        next.dataBlocks = state.spaceMap.dataBlocks
        next.dataHighWater = state.spaceMap.highWater
        next.committedAt = SystemInfo.wallClockSeconds()
        let poolLock = lock
        try mapErrors {
            // A resize changes the file's size: the full barrier, for file systems'
            // sake (it is rare).
            try state.store.commit(&next, newBlocksOnly: newBlocksOnly && !resized) { (io: () throws(MetadataError) -> Void) throws(MetadataError) in
                // Reads may look mappings up while the blocks are written and synced.
                try poolLock.admittingReaders { _ throws(MetadataError) in try io() }
            }
        }
        state.superblock = next
        state.statistics.commits += 1
        // Reads running outside the lock may still use blocks freed in this transaction:
        // wait for those (only those; later reads go on) before the blocks can be reused.
        let gate = ioGate
        lock.admittingReaders { _ in gate.waitForEarlierHolders() }
        state.spaceMap.transactionCommitted()
        // Releasing storage is host I/O: lookups go on meanwhile (the mutex keeps the
        // freed blocks from being handed out before their storage is released).
        if !freed.isEmpty {
            let released = lock.admittingReaders { _ in discardFreedData(freed) }
            for blocks in released { state.knownZero.insert(blocks) }
        }
    }

    /// Returns freed data blocks' storage to the host file system (best effort) and the
    /// runs it released, which now read as zeros. Only after commit: until then the
    /// previous commit may still map them.
    private func discardFreedData(_ freed: BlockNumberSet) -> [Range<UInt64>] {
        var released: [Range<UInt64>] = []
        func release(_ blocks: Range<UInt64>) {
            guard !blocks.isEmpty, device.discard(at: diskOffset(blocks.lowerBound), length: UInt64(blocks.count) * blockSize) else { return }
            released.append(blocks)
        }
        var start: UInt64 = 0
        var length: UInt64 = 0
        for block in freed.sorted() {
            if length > 0 && start + length == block {
                length += 1
                continue
            }
            release(start..<start + length)
            start = block
            length = 1
        }
        release(start..<start + length)
        return released
    }

    /// Commits and releases the file. Further calls fail with `.closed`.
    public func close() throws(PoolError) {
        // Fetched origin blocks still waiting to be stored go in with the last commit.
        originWarmer.drain()
        originStore.drain()
        try lock.withLock { (state: inout PoolState) throws(PoolError) in
            guard !state.isClosed else { return }
            // In fail mode the last commit stays the pool's state; only the flag goes out.
            defer {
                state.isClosed = true
                // Nothing can enter any more (closed under the lock): wait for what runs.
                ioGate.waitForEarlierHolders()
                device.close()
            }
            if failure == nil { try commit(&state) } else { flagNeedsCheck(&state) }
        }
    }

    /// Releases the file without committing (what a crash would leave, for tests).
    public func abandon() {
        lock.withLock { state in
            guard !state.isClosed else { return }
            state.isClosed = true
            device.close()
        }
    }
}
