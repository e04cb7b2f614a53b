import Dispatch
import ThinFormat
import ThinMetadata
import ThinSystem

/// The image behind an origin-backed volume, as the layer that can reach it (NBD, a
/// file) opens it for the engine.
public protocol VolumeOrigin: AnyObject, Sendable {
    /// Reads `buffer.count` bytes at `offset`, inside the origin's size. May block on the
    /// network, within the origin's own bounded timeouts; throws `originUnavailable`.
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(PoolError)

    /// The parts of `range` the origin is known to read as zeros (an NBD server's
    /// `base:allocation`), in order, so that they need not be fetched. May ask the origin
    /// once per large window, and remember; never fails (nothing known: empty).
    func zeroRanges(in range: Range<UInt64>) -> [Range<UInt64>]
}

extension VolumeOrigin {
    public func zeroRanges(in range: Range<UInt64>) -> [Range<UInt64>] { [] }
}

/// Opens origins for a pool (`Pool.setOriginOpener`).
public protocol OriginOpener: AnyObject, Sendable {
    /// Reaches `origin` and checks that it is the image recorded: the same size and, when
    /// recorded, the same UUID. A different image is refused with `originUnavailable`
    /// saying what differs, before anything is read from it.
    func open(_ origin: VolumeRecord.Origin) throws(PoolError) -> VolumeOrigin
}

/// A change in whether an origin can be used, for the serving layer's log: it went
/// down or turned out to be another image (`problem`), or it is reachable again (nil).
/// Reported once per change, not per failed read.
public struct OriginEvent: Sendable {
    public var locator: String
    public var problem: PoolError?
}

/// How the pool reaches origins, and the ones it reached.
struct OriginCatalog {
    var opener: OriginOpener?
    var open: [String: VolumeOrigin] = [:]
    var fetchedBytes: UInt64 = 0
    var errors: UInt64 = 0
    /// False while the pool has never held an origin-backed volume since open: then
    /// writes skip the check for unfetched partial blocks (one uncontended lock).
    var mayHaveOriginVolumes = false
    /// Whether the last origin request succeeded (nil: none made since open).
    var lastRequestSucceeded: Bool?
    /// Origins whose last request failed (keys), so an outage is reported once.
    var down: Set<String> = []
    /// Origins that failed to open: until `until` (monotonic ns), using them fails at
    /// once with `error` instead of trying again. `backoff` doubles (to 10 s) with each
    /// failed attempt; a different image waits the longest.
    var refused: [String: (error: PoolError, until: UInt64, backoff: UInt64)] = [:]
    var onChange: (@Sendable (OriginEvent) -> Void)?

    static func key(_ origin: VolumeRecord.Origin) -> String {
        "\(origin.kind.rawValue) \(origin.size) \(formatUUID(origin.uuid)) \(origin.locator)"
    }

    static let firstBackoff: UInt64 = 500_000_000
    static let longestBackoff: UInt64 = 10_000_000_000
}

/// A serial worker that stores fetched origin blocks, so that the read that fetched them
/// returns at once. Bounded: past `limit` waiting blocks, the fetching read stores its
/// own (and waits), so memory cannot grow without end.
final class OriginStoreQueue: Sendable {
    private let queue = DispatchQueue(label: "thinbd.origin-store")
    private let waiting = LockedValue(0)
    static let limit = 256

    /// Runs `store` on the worker, or here when too many wait (or, with `dropWhenFull`,
    /// not at all: for work that only saves a later fetch).
    func submit(dropWhenFull: Bool = false, _ store: @escaping @Sendable () -> Void) {
        let queued = waiting.withLockedValue { count -> Bool in
            guard count < Self.limit else { return false }
            count += 1
            return true
        }
        guard queued else {
            if !dropWhenFull { store() }
            return
        }
        queue.async { [waiting] in
            store()
            waiting.withLockedValue { $0 -= 1 }
        }
    }

    /// Returns once every store submitted before it is done.
    func drain() { queue.sync {} }
}

extension Pool {
    /// Sets how this pool reaches the origins of origin-backed volumes (the serving or
    /// CLI layer does, at open). Without one, reading an unfetched block fails.
    public func setOriginOpener(_ opener: OriginOpener) {
        origins.withLockedValue { $0.opener = opener }
    }

    /// Origin bytes fetched and failed requests since open, and whether the last
    /// request succeeded (nil: none made).
    public var originStatistics: (fetchedBytes: UInt64, errors: UInt64, up: Bool?) {
        origins.withLockedValue { ($0.fetchedBytes, $0.errors, $0.lastRequestSucceeded) }
    }

    /// Calls `handler` when an origin goes down, turns out to be another image, or comes
    /// back. It runs on the thread that noticed (a request's, never an event loop's).
    public func onOriginChange(_ handler: @escaping @Sendable (OriginEvent) -> Void) {
        origins.withLockedValue { $0.onChange = handler }
    }

    /// The opened origin for `record`, opening (and checking) it on first use. The
    /// opener runs outside every lock: it may wait on the network. After a failed open,
    /// attempts fail at once until a backoff passes.
    func reach(_ record: VolumeRecord.Origin) throws(PoolError) -> VolumeOrigin {
        let key = OriginCatalog.key(record)
        let now = SystemInfo.monotonicNanoseconds()
        let (known, opener, refusal) = origins.withLockedValue { catalog in
            (catalog.open[key], catalog.opener, catalog.refused[key].flatMap { now < $0.until ? $0.error : nil })
        }
        if let refusal { throw refusal }
        if let known { return known }
        guard let opener else {
            throw .originUnavailable("\(record.locator): this process was not given a way to reach origins")
        }
        let opened: VolumeOrigin
        do throws(PoolError) {
            opened = try opener.open(record)
        } catch {
            originFailed(record, error)
            throw error
        }
        let (winner, report, handler) = origins.withLockedValue { catalog in
            catalog.refused[key] = nil
            let winner = catalog.open[key] ?? opened
            catalog.open[key] = winner
            return (winner, catalog.down.remove(key) != nil, catalog.onChange)
        }
        if report { handler?(OriginEvent(locator: record.locator, problem: nil)) }
        return winner
    }

    /// Counts a failed origin request and reports the origin down (once per outage). A
    /// failed open, or another image found, makes further attempts wait a backoff.
    func originFailed(_ record: VolumeRecord.Origin, _ error: PoolError) {
        let key = OriginCatalog.key(record)
        let now = SystemInfo.monotonicNanoseconds()
        let (report, handler) = origins.withLockedValue { catalog in
            catalog.errors += 1
            catalog.lastRequestSucceeded = false
            let mismatch = if case .originMismatch = error { true } else { false }
            if mismatch || catalog.open[key] == nil {
                // The connections are dropped; the next attempt opens (and checks) again.
                catalog.open[key] = nil
                let backoff = mismatch
                    ? OriginCatalog.longestBackoff
                    : min((catalog.refused[key]?.backoff ?? OriginCatalog.firstBackoff / 2) * 2, OriginCatalog.longestBackoff)
                catalog.refused[key] = (error, now &+ backoff, backoff)
            }
            return (catalog.down.insert(key).inserted, catalog.onChange)
        }
        if report { handler?(OriginEvent(locator: record.locator, problem: error)) }
    }

    /// Counts `bytes` fetched from `record` and reports the origin back if it was down.
    func originSucceeded(_ record: VolumeRecord.Origin, bytes: UInt64) {
        let (report, handler) = origins.withLockedValue { catalog in
            catalog.fetchedBytes += bytes
            catalog.lastRequestSucceeded = true
            return (catalog.down.remove(OriginCatalog.key(record)) != nil, catalog.onChange)
        }
        if report { handler?(OriginEvent(locator: record.locator, problem: nil)) }
    }

    /// Why volume or snapshot `name` cannot be opened for clients now: its origin was
    /// found to be another image (nil otherwise; an origin that is merely down does not
    /// stop clients from using what is local). Takes no lock a request waits on long.
    public func originRefusal(of name: String) -> PoolError? {
        guard origins.withLockedValue({ $0.mayHaveOriginVolumes }) else { return nil }
        guard let record = try? lock.withSharedAccess({ state throws(PoolError) in try state.volume(named: name).record.origin }) else {
            return nil
        }
        let key = OriginCatalog.key(record)
        return origins.withLockedValue { catalog in
            guard let refusal = catalog.refused[key], case .originMismatch = refusal.error else { return nil }
            return refusal.error
        }
    }

    /// Opens (and so checks) the origin of every origin-backed volume and snapshot, so
    /// that an unreachable or different origin is reported at start, not at the first
    /// read. Blocks up to the opener's timeouts: run it off the serving threads.
    public func probeOrigins() {
        let records = (try? lock.withSharedAccess { state throws(PoolError) in
            Set(state.volumes.values.compactMap { $0.record.origin })
        }) ?? []
        for record in records { _ = try? reach(record) }
    }

    /// Creates volume `name` whose unmapped blocks read from `origin` (its size is the
    /// origin's). The caller has reached the origin and checked it. Commits.
    @discardableResult
    public func createOriginClone(_ name: String, origin: VolumeRecord.Origin) throws(PoolError) -> VolumeInfo {
        guard origin.locator.utf8.count <= VolumeRecord.Origin.maxLocatorBytes else {
            throw .invalidArgument("the origin's address is longer than \(VolumeRecord.Origin.maxLocatorBytes) bytes")
        }
        return try withWritableLock { state throws(PoolError) in
            guard VolumeName.splitSnapshot(name) == nil else {
                throw .invalidName(name, reason: "a clone is a volume; its name cannot contain '@'")
            }
            try checkNewName(name, in: state)
            try checkVolumeSize(origin.size)
            let record = VolumeRecord(
                id: state.superblock.nextVolumeID, kind: .volume, name: name, virtualSize: origin.size,
                createdAt: SystemInfo.wallClockSeconds(), uuid: makeUUID(), origin: origin)
            let volume = state.add(record)
            origins.withLockedValue { $0.mayHaveOriginVolumes = true }
            try finishManagement(&state)
            return describe(volume, in: state)
        }
    }

    /// The byte ranges of `extents` that are unmapped but come from `origin` (below its size).
    static func originRuns(_ extents: [Extent], _ origin: VolumeRecord.Origin) -> [Range<UInt64>] {
        extents.compactMap { extent in
            guard !extent.isMapped, extent.offset < origin.size else { return nil }
            return extent.offset..<min(extent.offset + extent.length, origin.size)
        }
    }

    /// Which of `count` blocks from `first` lie wholly inside `zeros`.
    static func zeroBlocks(_ zeros: [Range<UInt64>], first: UInt64, count: Int, blockSize: UInt64) -> [Bool] {
        var result = [Bool](repeating: false, count: count)
        for range in zeros {
            let from = (range.lowerBound + blockSize - 1) / blockSize
            let to = range.upperBound / blockSize
            guard to > from else { continue }
            for block in max(from, first)..<min(to, first + UInt64(count)) { result[Int(block - first)] = true }
        }
        return result
    }

    /// `extents` with the ranges the origin provides reported as data.
    static func markingOrigin(_ extents: [Extent], _ origin: VolumeRecord.Origin?) -> [Extent] {
        guard let origin else { return extents }
        var list = ExtentList()
        for extent in extents {
            let end = extent.offset + extent.length
            if extent.isMapped || extent.offset >= origin.size {
                list.add(extent.offset, end, mapped: extent.isMapped)
            } else {
                list.add(extent.offset, min(end, origin.size), mapped: true)
                list.add(min(end, origin.size), end, mapped: false)
            }
        }
        return list.extents
    }

    /// Fills `runs` of `buffer` (which holds the bytes at `offset`) from the origin, in
    /// whole blocks. With `keep`, each block is handed to the store worker, which maps it
    /// into volume `id` (or the nearest ancestor that still reads it from the origin,
    /// `storeFetched`). A block another request is fetching, or has fetched but not yet
    /// stored, is taken from it (`OriginBlocksInFlight`), not fetched again.
    /// Returns the bytes read from the origin (blocks it said were zeros, and blocks taken
    /// from other requests, are not).
    @discardableResult
    func fetch(
        _ runs: [Range<UInt64>], from record: VolumeRecord.Origin, volume id: UInt64, keep: Bool,
        into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64
    ) throws(PoolError) -> UInt64 {
        let origin = try reach(record)
        var fetchedBytes: UInt64 = 0
        let key = OriginCatalog.key(record)
        let chunkBlocks: UInt64 = max(1, (4 << 20) / blockSize)
        for run in runs {
            var block = run.lowerBound / blockSize
            let endBlock = (run.upperBound + blockSize - 1) / blockSize
            while block < endBlock {
                let count = min(chunkBlocks, endBlock - block)
                let start = block * blockSize
                let stop = min((block + count) * blockSize, record.size)
                // Blocks the origin says read as zeros are not fetched. The last block may
                // pass the origin's end: that part reads as zeros.
                let zero = Self.zeroBlocks(origin.zeroRanges(in: start..<stop), first: block, count: Int(count), blockSize: blockSize)
                let blocks = try fetchChunk(
                    origin, record, key: key, first: block, count: Int(count), end: stop, skipping: zero)
                fetchedBytes += blocks.fetchedBytes
                // The bytes this request asked for, from each block's copy.
                for index in 0..<Int(count) {
                    let blockStart = start + UInt64(index) * blockSize
                    let copyStart = max(run.lowerBound, blockStart)
                    let copyEnd = min(run.upperBound, blockStart + blockSize, stop)
                    guard copyEnd > copyStart else { continue }
                    let target = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(copyStart - offset)..<Int(copyEnd - offset)])
                    blocks.bytes[index].withUnsafeBytes { source in
                        target.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[Int(copyStart - blockStart)..<Int(copyEnd - blockStart)]))
                    }
                }
                let token = blocks.token
                for index in 0..<Int(count) {
                    let target = block + UInt64(index)
                    let bytes = blocks.bytes[index]
                    let mine = blocks.mine[index]
                    guard keep else {
                        if mine { originInFlight.release(key, target, token: token) }
                        continue
                    }
                    // Every block goes to the store (it maps only what is still unmapped,
                    // so a block another request fetched costs a lookup); the entry is
                    // forgotten once its own fetcher's store is done.
                    originStore.submit { [self] in
                        defer { if mine { originInFlight.release(key, target, token: token) } }
                        try? storeFetched(id, block: target, bytes)
                    }
                }
                block += count
            }
        }
        return fetchedBytes
    }

    /// The origin's bytes of `count` blocks from `first` (up to byte `end`, past which a
    /// block reads as zeros): `skipping` ones are zeros, others come from another
    /// request's fetch when there is one, and the rest are read from the origin in runs of
    /// consecutive blocks. `mine`: the blocks this call claimed and fetched; the caller
    /// releases them (`OriginBlocksInFlight.release`) under `token`. On a failure none
    /// stays claimed. Every block this call fetches is published before it waits for
    /// another's, so two requests never wait for each other.
    private func fetchChunk(
        _ origin: VolumeOrigin, _ record: VolumeRecord.Origin, key: String, first: UInt64, count: Int, end: UInt64,
        skipping zero: [Bool]
    ) throws(PoolError) -> (bytes: [[UInt8]], mine: [Bool], token: UInt64, fetchedBytes: UInt64) {
        let wanted = (0..<count).filter { !zero[$0] }.map { first + UInt64($0) }
        let (token, claims) = originInFlight.claim(key, wanted)
        var bytes = [[UInt8]](repeating: [UInt8](repeating: 0, count: Int(blockSize)), count: count)
        var mine = [Bool](repeating: false, count: count)
        var waiting: [Int] = []
        var fetchedBytes: UInt64 = 0
        for (block, claim) in zip(wanted, claims) {
            let index = Int(block - first)
            switch claim {
            case .mine: mine[index] = true
            case .ready(let fetched): bytes[index] = fetched
            case .elsewhere: waiting.append(index)
            }
        }
        // On a failure, whatever this call claimed is released (the caller never sees the
        // token), so nothing is left for others to wait on or to keep in memory.
        var succeeded = false
        defer {
            if !succeeded {
                for index in 0..<count where mine[index] { originInFlight.release(key, first + UInt64(index), token: token) }
            }
        }
        var index = 0
        while index < count {
            guard mine[index] else {
                index += 1
                continue
            }
            var runEnd = index + 1
            while runEnd < count && mine[runEnd] { runEnd += 1 }
            fetchedBytes += try readOrigin(origin, record, first: first + UInt64(index), count: runEnd - index, end: end) { offset, data in
                bytes[index + offset] = data
            }
            for fetched in index..<runEnd { originInFlight.publish(key, first + UInt64(fetched), bytes[fetched], token: token) }
            index = runEnd
        }
        for index in waiting {
            if let fetched = originInFlight.wait(key, first + UInt64(index)) {
                bytes[index] = fetched
            } else {
                // The other fetch failed or is stuck: this one reads the block itself.
                fetchedBytes += try readOrigin(origin, record, first: first + UInt64(index), count: 1, end: end) { _, data in bytes[index] = data }
            }
        }
        succeeded = true
        return (bytes, mine, token, fetchedBytes)
    }

    /// Reads `count` consecutive blocks from `first` from the origin in one request (up to
    /// byte `end`; the rest of the last block is zeros) and gives `each` every block's
    /// bytes. Returns the bytes read.
    private func readOrigin(
        _ origin: VolumeOrigin, _ record: VolumeRecord.Origin, first: UInt64, count: Int, end: UInt64,
        _ each: (Int, [UInt8]) -> Void
    ) throws(PoolError) -> UInt64 {
        let from = first * blockSize
        let to = min(from + UInt64(count) * blockSize, end)
        let fetched = AlignedBuffer(count: count * Int(blockSize))
        fetched.bytes.initializeMemory(as: UInt8.self, repeating: 0)
        do throws(PoolError) {
            try origin.read(at: from, into: UnsafeMutableRawBufferPointer(rebasing: fetched.bytes[0..<Int(to - from)]))
        } catch {
            originFailed(record, error)
            throw error
        }
        originSucceeded(record, bytes: to - from)
        for index in 0..<count {
            each(index, Array(fetched.bytes[index * Int(blockSize)..<(index + 1) * Int(blockSize)]))
        }
        return to - from
    }

    /// Stores `bytes` (one whole block fetched from the origin of image `id`) at `block`
    /// in the nearest of `id` and its ancestors with the same origin that still reads the
    /// block from it (a write may have come first to `id`, or another fetch), then shares
    /// it with the ancestors above that (`shareFetched`). Snapshots take it too: it holds
    /// what they read already. Crash-safe as any write: stored and mapped, or not at all.
    func storeFetched(_ id: UInt64, block: UInt64, _ bytes: [UInt8]) throws(PoolError) {
        // The target is found again under its range lock: a write may map the block
        // while this waits for it, and then the next image up is the one to fill.
        for _ in 0..<16 {
            let target = try lock.withSharedAccess { state throws(PoolError) in try nearestUnfetched(id, block, in: state) }
            guard let target else { return }
            let stored = try rangeLocks.withRange(target, block..<block + 1) { () throws(PoolError) -> Bool in
                // How much of the block lies inside the image (nil: the target changed).
                let length = try lock.withSharedAccess { state throws(PoolError) -> Int? in
                    guard try nearestUnfetched(target, block, in: state) == target, let volume = state.volumes[target] else { return nil }
                    return Int(min(blockSize, volume.record.virtualSize - block * blockSize))
                }
                guard let length else { return false }
                // A block of zeros (a hole at the origin, often) shares the zero block: it
                // costs metadata, not data space.
                let zero = bytes.allSatisfy { $0 == 0 }
                if zero && length == Int(blockSize) {
                    try zeroWholeBlocksHoldingRange(target, block..<block + 1, fillingFromOrigin: true)
                } else {
                    let written = bytes.withUnsafeBytes { raw in
                        Result { () throws(PoolError) in
                            try writeHoldingRange(
                                target, at: block * blockSize, from: UnsafeRawBufferPointer(rebasing: raw[0..<length]), forceUnitAccess: false,
                                zeroFill: zero, fillingFromOrigin: true)
                        }
                    }
                    try written.get()
                }
                try lock.withLock { (state: inout PoolState) throws(PoolError) in try shareFetched(target, block: block, in: &state) }
                return true
            }
            if stored { return }
        }
    }

    /// `id` or its nearest ancestor with the same origin that covers `block` and does not
    /// map it (nil: none).
    private func nearestUnfetched(_ id: UInt64, _ block: UInt64, in state: borrowing PoolState) throws(PoolError) -> UInt64? {
        guard let origin = state.volumes[id]?.record.origin else { return nil }
        var next = id
        // Bounded by the volume count: a damaged table cannot make the walk loop.
        for _ in 0...state.volumes.count {
            guard next != 0, let image = state.volumes[next], image.record.origin == origin,
                block * blockSize < image.record.virtualSize
            else { return nil }
            if try isUnmapped(image, block, in: state) { return next }
            next = image.record.parentID
        }
        return nil
    }

    /// Maps the block volume `id` just stored from its origin into every ancestor (its
    /// parent, the parent's parent...) that has the same origin and still reads that
    /// block from it, sharing the one data block. Their contents do not change (the
    /// block holds what they read from the origin), so a snapshot may take it too: the
    /// clones a runner makes later from the same source then have the block already,
    /// and a second build fetches nothing the first one fetched.
    func shareFetched(_ id: UInt64, block: UInt64, in state: inout PoolState) throws(PoolError) {
        guard let volume = state.volumes[id], let origin = volume.record.origin else { return }
        let tree = state.mappings
        let physical: UInt64
        do throws(MetadataError) {
            guard let found = try tree.lookup(volume.record.mappingRoot, block) else { return }
            physical = found
        } catch {
            throw noticing(PoolError(error))
        }
        var ancestors: [UInt64] = []
        var next = volume.record.parentID
        var steps = 0
        // Bounded by the volume count: a damaged table cannot make the walk loop.
        while next != 0, steps < state.volumes.count, let ancestor = state.volumes[next],
            ancestor.record.origin == origin, block * blockSize < ancestor.record.virtualSize
        {
            steps += 1
            if try isUnmapped(ancestor, block, in: state) { ancestors.append(next) }
            next = ancestor.record.parentID
        }
        for ancestor in ancestors { try mapSharing(&state, ancestor, block..<block + 1, to: physical) }
    }

    /// Maps `blocks` of image `id` to data block `physical`, one more reference each,
    /// releasing what they mapped before. The caller holds their range lock, or knows
    /// the image reads the same bytes either way.
    func mapSharing(_ state: inout PoolState, _ id: UInt64, _ blocks: Range<UInt64>, to physical: UInt64) throws(PoolError) {
        let (tree, spaceMap) = (state.mappings, state.spaceMap)
        try state.changingMapping(of: id) { root, mapped throws(PoolError) in
            do throws(MetadataError) {
                for block in blocks {
                    try spaceMap.incRef(physical)
                    let (newRoot, replaced) = try tree.insert(root, block, physical)
                    root = newRoot
                    if let replaced { try spaceMap.decRef(replaced) } else { mapped &+= 1 }
                }
            } catch {
                throw noticing(PoolError(error))
            }
        }
    }


    /// Before a write, zeroing or trim of `offset..<offset+count` in an origin-backed
    /// volume: the partly covered blocks at either end that are still unfetched are
    /// fetched and stored first, so the rest of each keeps the origin's bytes.
    func fetchPartialEnds(_ id: UInt64, at offset: UInt64, count: UInt64) throws(PoolError) {
        guard count > 0, origins.withLockedValue({ $0.mayHaveOriginVolumes }) else { return }
        guard let record = try lock.withSharedAccess({ state throws(PoolError) in try volume(id, writing: true, in: state).record.origin }) else {
            return
        }
        var ends: Set<UInt64> = []
        if offset % blockSize != 0 { ends.insert(offset / blockSize) }
        if (offset + count) % blockSize != 0 { ends.insert((offset + count) / blockSize) }
        for block in ends.sorted() where block * blockSize < record.size {
            let unmapped = try lock.withSharedAccess { state throws(PoolError) -> Bool in
                try isUnmapped(try volume(id, writing: true, in: state), block, in: state)
            }
            guard unmapped else { continue }
            try fetchAndStore(id, block: block, from: record)
        }
        warmAncestors(id, of: record, coveredBy: offset..<offset + count)
    }

    /// Fetches block `block` of volume `id`'s origin and stores it (`storeFetched`).
    private func fetchAndStore(_ id: UInt64, block: UInt64, from record: VolumeRecord.Origin) throws(PoolError) {
        let fetched = AlignedBuffer(count: Int(blockSize))
        fetched.bytes.initializeMemory(as: UInt8.self, repeating: 0)
        let start = block * blockSize
        try fetch([start..<min(start + blockSize, record.size)], from: record, volume: id, keep: false, into: fetched.bytes, at: start)
        try storeFetched(id, block: block, Array(fetched.bytes))
    }

    /// The whole blocks of `range` that volume `id` is about to overwrite without having
    /// fetched them, while an ancestor with the same origin still reads them from it:
    /// fetched in the background for those ancestors (the volume's write then replaces
    /// its own copy), so that later clones of the same source, such as the next build's,
    /// find them local. Best effort: dropped when the warming worker is busy, and a
    /// failed fetch only means a later clone fetches the block itself.
    private func warmAncestors(_ id: UInt64, of record: VolumeRecord.Origin, coveredBy range: Range<UInt64>) {
        let first = (range.lowerBound + blockSize - 1) / blockSize
        let end = min(range.upperBound, record.size) / blockSize
        guard first < end else { return }
        let blocks = (try? lock.withSharedAccess { state throws(PoolError) -> [UInt64] in
            guard let volume = state.volumes[id], let parent = state.volumes[volume.record.parentID], parent.record.origin == record else {
                return []
            }
            var needed: [UInt64] = []
            for block in first..<end where try isUnmapped(volume, block, in: state) {
                if try nearestUnfetched(parent.record.id, block, in: state) != nil { needed.append(block) }
            }
            return needed
        }) ?? []
        for block in blocks {
            originWarmer.submit(dropWhenFull: true) { [self] in try? fetchAndStore(id, block: block, from: record) }
        }
    }

    private func isUnmapped(_ volume: VolumeState, _ block: UInt64, in state: borrowing PoolState) throws(PoolError) -> Bool {
        var found = false
        _ = try mapErrors {
            try state.mappings.forEach(volume.record.mappingRoot, in: block..<block + 1) { (_: UInt64, _: UInt64) -> Bool in
                found = true
                return false
            }
        }
        return !found
    }

    /// The origin of volume `id`, if it has one (without the pool lock while no
    /// origin-backed volume has existed since open).
    func originOf(_ id: UInt64) throws(PoolError) -> VolumeRecord.Origin? {
        guard origins.withLockedValue({ $0.mayHaveOriginVolumes }) else { return nil }
        return try lock.withSharedAccess { state throws(PoolError) in try volume(id, writing: false, in: state).record.origin }
    }
}

/// What one step of hydration did (`Pool.hydrate(_:window:)`).
public struct HydrationStep: Sendable, Equatable {
    /// Bytes fetched from the origin and stored.
    public var fetchedBytes: UInt64
    /// Bytes of the whole volume still unfetched after this step.
    public var remainingBytes: UInt64
    /// The origin record was dropped: nothing is left to fetch.
    public var complete: Bool
}

extension Pool {
    /// Fetches and stores every still-unfetched block of origin-backed volume `name` that
    /// meets the byte range `window`, then, when none is left anywhere, drops the origin
    /// record (committed): the volume no longer needs its origin. Each block is stored as
    /// a read would store it, so clients keep reading and writing meanwhile. Cost: the
    /// window's unfetched bytes from the origin, and a walk of the volume's mappings.
    public func hydrate(_ name: String, window: Range<UInt64>) throws(PoolError) -> HydrationStep {
        let (id, record, size) = try lock.withSharedAccess { state throws(PoolError) in
            let volume = try state.volume(named: name)
            guard volume.record.kind == .volume else { throw .readOnly("snapshot \(name): hydrate its volume, or clone it") }
            return (volume.record.id, volume.record.origin, volume.record.virtualSize)
        }
        guard let record else { return HydrationStep(fetchedBytes: 0, remainingBytes: 0, complete: true) }
        let limit = min(size, record.size)
        let start = min(window.lowerBound, limit) / blockSize
        let end = (min(window.upperBound, limit) + blockSize - 1) / blockSize
        var fetched: UInt64 = 0
        // Runs of consecutive unfetched blocks, up to 4 MiB, are fetched in one request.
        let runBlocks = max(1, (4 << 20) / blockSize)
        for run in Self.consecutiveRuns(try unfetchedBlocks(id, in: start..<end), longest: runBlocks) {
            let bytes = AlignedBuffer(count: run.count * Int(blockSize))
            bytes.bytes.initializeMemory(as: UInt8.self, repeating: 0)
            let from = run.lowerBound * blockSize
            let to = min(run.upperBound * blockSize, record.size)
            fetched += try fetch([from..<to], from: record, volume: id, keep: false, into: bytes.bytes, at: from)
            for (index, block) in run.enumerated() {
                try storeFetched(id, block: block, Array(bytes.bytes[index * Int(blockSize)..<(index + 1) * Int(blockSize)]))
            }
        }
        let remaining = try unfetchedBlocks(id, in: 0..<(limit + blockSize - 1) / blockSize)
        guard remaining.isEmpty else {
            return HydrationStep(fetchedBytes: fetched, remainingBytes: UInt64(remaining.count) * blockSize, complete: false)
        }
        // Checked again under the lock that drops the record: a block that a concurrent
        // shrink-and-grow unmapped would otherwise read as zeros instead of the origin.
        let complete = try withWritableLock { state throws(PoolError) -> Bool in
            let volume = try state.volume(named: name)
            guard volume.record.id == id, volume.record.origin == record else { return volume.record.origin == nil }
            var mapped: UInt64 = 0
            let blocks = 0..<(min(volume.record.virtualSize, record.size) + blockSize - 1) / blockSize
            _ = try mapErrors {
                try state.mappings.forEach(volume.record.mappingRoot, in: blocks) { (_: UInt64, _: UInt64) -> Bool in
                    mapped += 1
                    return true
                }
            }
            guard mapped == UInt64(blocks.count) else { return false }
            state.volumes[id]?.change { $0.origin = nil }
            try finishManagement(&state)
            return true
        }
        return HydrationStep(fetchedBytes: fetched, remainingBytes: complete ? 0 : blockSize, complete: complete)
    }

    /// `blocks` (ascending) as runs of consecutive blocks, none longer than `longest`.
    static func consecutiveRuns(_ blocks: [UInt64], longest: UInt64) -> [Range<UInt64>] {
        var runs: [Range<UInt64>] = []
        for block in blocks {
            if let last = runs.last, last.upperBound == block, UInt64(last.count) < longest {
                runs[runs.count - 1] = last.lowerBound..<block + 1
            } else {
                runs.append(block..<block + 1)
            }
        }
        return runs
    }

    /// The blocks of `range` that volume `id` does not map (below its origin's size).
    private func unfetchedBlocks(_ id: UInt64, in range: Range<UInt64>) throws(PoolError) -> [UInt64] {
        try lock.withSharedAccess { state throws(PoolError) in
            let volume = try volume(id, writing: false, in: state)
            var missing: [UInt64] = []
            var next = range.lowerBound
            _ = try mapErrors {
                try state.mappings.forEach(volume.record.mappingRoot, in: range) { (block: UInt64, _: UInt64) -> Bool in
                    while next < block {
                        missing.append(next)
                        next += 1
                    }
                    next = block + 1
                    return true
                }
            }
            while next < range.upperBound {
                missing.append(next)
                next += 1
            }
            return missing
        }
    }
}
