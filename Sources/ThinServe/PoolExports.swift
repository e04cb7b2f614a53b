import NBDProtocol
import NBDServer
import ThinControl
import ThinPool
import ThinSystem

/// Maps engine failures to NBD errors: the one place that decides what a client sees.
func nbdError(_ error: PoolError) -> NBDExportError {
    let code: NBDError
    switch error.errnoCode {
    case .permission, .readOnlyFileSystem: code = .permission
    case .noSpace: code = .noSpace
    case .invalidArgument: code = .invalid
    case .overflow: code = .overflow
    case .notSupported: code = .notSupported
    case .shutdown: code = .shutdown
    case .noMemory: code = .noMemory
    default: code = .io
    }
    return NBDExportError(code, error.description)
}

/// Every volume and snapshot of a pool, as exports: volumes writable (unless the whole
/// server is read-only), snapshots read-only. Looked up at each handshake, so volumes
/// created later are served too.
public final class PoolExportProvider: NBDExportProvider, @unchecked Sendable {
    let pool: Pool
    let readOnly: Bool
    let defaultExport: String?
    let ephemeral: EphemeralVolumes?
    /// Export-name patterns whose FLUSH and FUA return at once (`--no-flush`).
    let noFlushPatterns: [String]
    /// `--limit` and the control socket's `limit`: per-export rate limits.
    let limits: ExportLimits
    /// `--metrics`: per-export counters (nil: none kept).
    var metrics: ServeMetrics?
    /// Connection events, at debug level.
    var debugLog: (@Sendable (String) -> Void)?

    public convenience init(pool: Pool, readOnly: Bool, defaultExport: String?) {
        self.init(pool: pool, readOnly: readOnly, defaultExport: defaultExport, ephemeral: nil, noFlushPatterns: [])
    }

    init(
        pool: Pool, readOnly: Bool, defaultExport: String?, ephemeral: EphemeralVolumes?, noFlushPatterns: [String],
        limits: [ExportLimitRule] = []
    ) {
        self.limits = ExportLimits(rules: limits)
        self.pool = pool
        self.readOnly = readOnly
        self.defaultExport = defaultExport
        self.ephemeral = ephemeral
        self.noFlushPatterns = noFlushPatterns
    }

    func describe(_ volume: VolumeInfo) -> NBDExportDescription {
        let what: String
        switch volume.kind {
        case .volume: what = "thin volume"
        case .snapshot: what = "read-only snapshot"
        case .clone: what = "clone of \(volume.parent ?? "a deleted volume")"
        }
        return NBDExportDescription(
            name: volume.name, size: volume.size, isReadOnly: readOnly || volume.isReadOnly,
            // The image UUID lets a pool that clones this export check, on every open,
            // that it is still the same image (`clone POOL nbd://... NAME`).
            description: "\(what), \(formatBytes(volume.size)), \(formatBytes(volume.mappedBytes)) mapped"
                + (volume.uuid.map { ", image \($0)" } ?? ""),
            preferredBlockSize: UInt32(min(pool.blockSize, 65536)))
    }

    public func describe(_ name: String) -> NBDExportDescription? {
        let resolved = name.isEmpty ? defaultExport : name
        guard let resolved else { return nil }
        if let volume = try? pool.volumeInfo(resolved) { return describe(volume) }
        // A name an --ephemeral rule covers: made when a client opens it.
        guard !readOnly, let ephemeral, let size = ephemeral.plannedSize(of: resolved) else { return nil }
        return NBDExportDescription(
            name: resolved, size: size, isReadOnly: false, description: "ephemeral volume, \(formatBytes(size))",
            preferredBlockSize: UInt32(min(pool.blockSize, 65536)))
    }

    public func allExports() -> [NBDExportDescription] {
        pool.listVolumes().map(describe)
    }

    /// `thinbd:changed:SNAPSHOT` for each snapshot of the export's family that a query
    /// names; LIST also takes `thinbd:` and `thinbd:changed:` (and no query at all) as
    /// "every one". Each context's key is the snapshot's id, so a rename after
    /// SET_META_CONTEXT changes nothing and a deletion fails BLOCK_STATUS rather than
    /// comparing with whatever takes the name next.
    public func metaContexts(of name: String, matching queries: [String], listing: Bool) -> [NBDMetaContext]? {
        guard let description = describe(name) else { return nil }
        let wanted = queries.filter { $0.hasPrefix(ChangedBlocksContext.namespace) }
        guard !wanted.isEmpty || (listing && queries.isEmpty) else { return [] }
        // An ephemeral volume not made yet has no snapshots to compare with.
        guard let snapshots = try? pool.comparableSnapshots(of: description.name) else { return [] }
        let listsAll = listing && (queries.isEmpty || wanted.contains { ChangedBlocksContext.wildcards.contains($0) })
        return snapshots.compactMap { snapshot in
            let context = ChangedBlocksContext.name(base: snapshot.name)
            guard listsAll || wanted.contains(context) else { return nil }
            return NBDMetaContext(name: context, key: snapshot.id)
        }
    }

    /// Aligned copies of write payloads (NIO's buffers are not 4 KiB-aligned).
    let buffers = AlignedBufferPool()

    /// All of a loop round's WRITEs to this pool as one `Pool.writeBatch`: one range-lock
    /// acquisition, one planning section, two device submissions and one mapping
    /// section for the writes of every connection, however many there are.
    public func writeBatches(_ batches: [NBDWriteBatch]) -> [[NBDExportError?]] {
        var results = [[NBDExportError?]](repeating: [], count: batches.count)
        var merged: [Pool.BatchedWrite] = []
        var owners: [(batch: Int, export: VolumeExport)] = []
        var borrowed: [AlignedBuffer] = []
        defer { for buffer in borrowed { buffers.give(buffer) } }
        for (i, batch) in batches.enumerated() {
            guard let volume = batch.export as? VolumeExport, volume.pool === pool else {
                results[i] = batch.export.writeBatch(batch.writes)
                continue
            }
            merged += volume.poolWrites(batch.writes, borrowing: &borrowed)
            owners.append((i, volume))
        }
        guard !merged.isEmpty else { return results }
        let started = metrics == nil ? 0 : SystemInfo.monotonicNanoseconds()
        let outcomes = pool.writeBatch(merged)
        var next = 0
        for (i, volume) in owners {
            let count = batches[i].writes.count
            results[i] = volume.recorded(batches[i].writes, Array(outcomes[next..<next + count]), started: started)
            next += count
        }
        return results
    }

    public func makeLoopQueue() -> NBDLoopQueue? {
        guard pool.usesLoopQueues, let queue = makeLoopDiskQueue() else { return nil }
        return PoolLoopQueue(queue)
    }

    public func makeIdlePoller(forLoopWatching descriptor: Int32) -> NBDIdlePoller? {
        EventLoopPoller.forEpoll(watching: descriptor).map(LoopIdlePoller.init)
    }

    /// Names a management operation has closed to new connections (see `ServedPool`).
    private let closedLock = Lock()
    private var closedNames: [String: Int] = [:]

    func close(_ names: [String]) {
        closedLock.withLock { for name in names { closedNames[name, default: 0] += 1 } }
    }

    func reopen(_ names: [String]) {
        closedLock.withLock {
            for name in names {
                closedNames[name, default: 1] -= 1
                if closedNames[name] == 0 { closedNames[name] = nil }
            }
        }
    }

    public func open(_ description: NBDExportDescription) throws(NBDExportError) -> NBDExport {
        let name = description.name
        if closedLock.withLock({ closedNames[name] != nil }) {
            throw NBDExportError(.shutdown, "\(name) is being changed by a management command; connect again later")
        }
        if let refusal = pool.originRefusal(of: name) { throw nbdError(refusal) }
        var counted = false
        if !readOnly, let ephemeral {
            do throws(PoolError) {
                counted = try ephemeral.acquire(name)
            } catch {
                throw nbdError(error)
            }
        }
        let limits = self.limits
        let rateLimit = limits.acquire(name)
        let release: @Sendable () -> Void
        if counted, let ephemeral {
            release = { @Sendable in
                limits.release(name)
                ephemeral.release(name)
            }
        } else {
            release = { @Sendable in limits.release(name) }
        }
        do {
            let skipFlush = noFlushPatterns.contains { ExportPattern.matches($0, name) }
            let exportMetrics = metrics?.export(name)
            exportMetrics?.limited(by: rateLimit)
            let export = VolumeExport(
                pool: pool, id: try pool.volumeID(name), description: description, buffers: buffers, skipFlush: skipFlush,
                metrics: exportMetrics, rateLimit: rateLimit, onClose: release)
            exportMetrics?.connected(1)
            debugLog?("client connected to \(name)")
            return export
        } catch {
            release()
            throw nbdError(error)
        }
    }
}

/// The `thinbd:changed:` metadata context: which blocks of an export may differ from
/// a snapshot of its family (docs/nbd-compliance.md).
public enum ChangedBlocksContext {
    public static let namespace = "thinbd:"
    public static let prefix = "thinbd:changed:"
    /// LIST_META_CONTEXT queries that list every base.
    static let wildcards: Set<String> = ["thinbd:", "thinbd:changed:"]
    /// The descriptor flag of a range whose contents may differ from the base.
    public static let changedFlag: UInt32 = 1

    public static func name(base: String) -> String { prefix + base }
}

/// One volume or snapshot behind NBD. Every connection to the same volume goes to the
/// same `Pool`, so FLUSH on any of them commits the writes of all (multi-conn).
final class VolumeExport: NBDExport, @unchecked Sendable {
    let pool: Pool
    let id: UInt64
    let exportDescription: NBDExportDescription
    let buffers: AlignedBufferPool
    /// `--no-flush`: FLUSH and FUA return at once (scratch disks; the pool itself stays
    /// consistent after a crash, the data written since the last commit may be lost).
    let skipFlush: Bool
    let metrics: ExportMetrics?
    /// Shared by every connection to this export (`--limit`).
    let rateLimit: NBDRateLimit?
    private let onClose: (@Sendable () -> Void)?

    init(
        pool: Pool, id: UInt64, description: NBDExportDescription, buffers: AlignedBufferPool, skipFlush: Bool = false,
        metrics: ExportMetrics? = nil, rateLimit: NBDRateLimit? = nil, onClose: (@Sendable () -> Void)? = nil
    ) {
        self.rateLimit = rateLimit
        self.pool = pool
        self.id = id
        self.exportDescription = description
        self.buffers = buffers
        self.skipFlush = skipFlush
        self.metrics = metrics
        self.onClose = onClose
    }

    /// Runs an operation, counting it when metrics are kept.
    @inline(__always)
    private func run<T>(_ operation: ExportMetrics.Operation, bytes: Int = 0, _ body: () throws(PoolError) -> T) throws(NBDExportError) -> T {
        let started = metrics == nil ? 0 : SystemInfo.monotonicNanoseconds()
        do {
            let result = try body()
            metrics?.record(operation, bytes: bytes, started: started, failed: false)
            return result
        } catch {
            metrics?.record(operation, bytes: bytes, started: started, failed: true)
            throw nbdError(error)
        }
    }

    /// Counts a finished read that started at `started`.
    private func recordRead(_ result: Result<[NBDExtent], NBDExportError>, bytes: Int, started: UInt64) {
        guard let metrics else { return }
        if case .failure = result {
            metrics.record(.read, bytes: bytes, started: started, failed: true)
        } else {
            metrics.record(.read, bytes: bytes, started: started, failed: false)
        }
    }

    /// Wraps a read's completion so that it is counted (itself when metrics are off).
    private func counted(
        _ bytes: Int, started: UInt64, _ completion: @escaping (Result<[NBDExtent], NBDExportError>) -> Void
    ) -> (Result<[NBDExtent], NBDExportError>) -> Void {
        guard metrics != nil else { return completion }
        return { [self] result in
            recordRead(result, bytes: bytes, started: started)
            completion(result)
        }
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(NBDExportError) -> [NBDExtent] {
        try run(.read, bytes: buffer.count) { () throws(PoolError) in
            Self.readExtents(try pool.read(id, at: offset, into: buffer))
        }
    }

    func readAsync(
        at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
        completion: @escaping @Sendable (Result<[NBDExtent], NBDExportError>) -> Void
    ) {
        let done = counted(buffer.count, started: metrics == nil ? 0 : SystemInfo.monotonicNanoseconds(), completion)
        nonisolated(unsafe) let finish = done
        pool.readAsync(id, at: offset, into: buffer) { result in
            finish(result.map(Self.nbdExtents).mapError(nbdError))
        }
    }

    func readWithoutBlocking(
        at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, queue: NBDLoopQueue?,
        completion: @escaping (Result<[NBDExtent], NBDExportError>) -> Void
    ) -> NBDNonBlockingRead {
        let started = metrics == nil ? 0 : SystemInfo.monotonicNanoseconds()
        let done = counted(buffer.count, started: started, completion)
        let start = pool.readWithoutBlocking(id, at: offset, into: buffer, queue: (queue as? PoolLoopQueue)?.queue) { result in
            done(result.map(Self.readExtents).mapError(nbdError))
        }
        switch start {
        case .completed(let result):
            let mapped = result.map(Self.readExtents).mapError(nbdError)
            recordRead(mapped, bytes: buffer.count, started: started)
            return .completed(mapped)
        case .started: return .started
        case .wouldBlock: return .wouldBlock
        }
    }

    func writeWithoutBlocking(
        at offset: UInt64, from data: UnsafeRawBufferPointer, queue: NBDLoopQueue?,
        completion: @escaping (NBDExportError?) -> Void
    ) -> NBDNonBlockingWrite {
        let started = metrics == nil ? 0 : SystemInfo.monotonicNanoseconds()
        let start = pool.writeInPlaceWithoutBlocking(id, at: offset, from: data, queue: (queue as? PoolLoopQueue)?.queue) {
            [metrics] error in
            let mapped = error.map(nbdError)
            metrics?.record(.write, bytes: data.count, started: started, failed: mapped != nil)
            completion(mapped)
        }
        switch start {
        case .started: return .started
        case .wouldBlock: return .wouldBlock
        }
    }

    /// A read's extents as `NBDExport.read` passes them on: none when all are mapped,
    /// so that a read of data, the common case, allocates no list for them (the pool's
    /// non-blocking read reports none already then).
    private static func readExtents(_ extents: [Extent]) -> [NBDExtent] {
        guard extents.contains(where: { !$0.isMapped }) else { return [] }
        return nbdExtents(extents)
    }

    private static func nbdExtents(_ extents: [Extent]) -> [NBDExtent] {
        extents.map { NBDExtent(offset: $0.offset, length: $0.length, isHole: !$0.isMapped) }
    }

    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws(NBDExportError) {
        if let error = writeBatch([NBDWrite(offset: offset, data: buffer, fua: fua)])[0] { throw error }
    }

    func writeBatch(_ writes: [NBDWrite]) -> [NBDExportError?] {
        var borrowed: [AlignedBuffer] = []
        defer { for buffer in borrowed { buffers.give(buffer) } }
        let batch = poolWrites(writes, borrowing: &borrowed)
        let started = metrics == nil ? 0 : SystemInfo.monotonicNanoseconds()
        return recorded(writes, pool.writeBatch(batch), started: started)
    }

    /// The engine's form of `writes`: unaligned payloads get one copy into aligned
    /// buffers (O_DIRECT only), borrowed until the caller gives them back.
    func poolWrites(_ writes: [NBDWrite], borrowing borrowed: inout [AlignedBuffer]) -> [Pool.BatchedWrite] {
        writes.map { write -> Pool.BatchedWrite in
            var data = write.data
            if pool.prefersAlignedBuffers && Int(bitPattern: data.baseAddress) % AlignedBuffer.directIOAlignment != 0 {
                let aligned = buffers.take(data.count)
                borrowed.append(aligned)
                UnsafeMutableRawBufferPointer(rebasing: aligned.bytes[0..<data.count]).copyMemory(from: data)
                data = UnsafeRawBufferPointer(rebasing: aligned.bytes[0..<data.count])
            }
            return Pool.BatchedWrite(volume: id, offset: write.offset, data: data, forceUnitAccess: write.fua && !skipFlush)
        }
    }

    /// Maps the engine's outcomes to NBD errors, counting them when metrics are kept.
    func recorded(_ writes: [NBDWrite], _ outcomes: [PoolError?], started: UInt64) -> [NBDExportError?] {
        let mapped = outcomes.map { $0.map(nbdError) }
        if let metrics {
            for (write, outcome) in zip(writes, mapped) {
                metrics.record(.write, bytes: write.data.count, started: started, failed: outcome != nil)
            }
        }
        return mapped
    }

    func writeZeroes(at offset: UInt64, length: UInt64, mayTrim: Bool, fua: Bool) throws(NBDExportError) {
        try run(.writeZeroes, bytes: Int(length)) { () throws(PoolError) in
            try pool.writeZeroes(id, at: offset, count: length, mayUnmap: mayTrim)
            if fua && !skipFlush { try pool.commit() }
        }
    }

    func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(NBDExportError) {
        try run(.trim, bytes: Int(length)) { () throws(PoolError) in
            try pool.trim(id, at: offset, count: length)
            if fua && !skipFlush { try pool.commit() }
        }
    }

    func flush() throws(NBDExportError) {
        if skipFlush { return }
        try run(.flush) { () throws(PoolError) in try pool.flush() }
    }

    func extents(at offset: UInt64, length: UInt64) throws(NBDExportError) -> [NBDExtent] {
        try run(.blockStatus) { () throws(PoolError) in
            Self.nbdExtents(try pool.extents(id, at: offset, count: length))
        }
    }

    /// `thinbd:changed:BASE`: flag 1 where the contents may differ from the base.
    func statusExtents(context baseID: UInt64, at offset: UInt64, length: UInt64) throws(NBDExportError) -> [NBDStatusExtent] {
        try run(.blockStatus) { () throws(PoolError) in
            try pool.changedExtents(id, since: baseID, at: offset, count: length).map {
                NBDStatusExtent(offset: $0.offset, length: $0.length, flags: $0.isMapped ? ChangedBlocksContext.changedFlag : 0)
            }
        }
    }

    func close() {
        // The time this connection waited for its limit is counted before it goes.
        metrics?.sampleLimit()
        metrics?.connected(-1)
        onClose?()
    }
}

/// A disk queue for one event loop: volume reads started there complete there.
final class PoolLoopQueue: NBDLoopQueue {
    let queue: LoopDiskQueue

    init(_ queue: LoopDiskQueue) { self.queue = queue }

    func makeReadinessDescriptor() throws -> Int32 { try queue.makeReadinessDescriptor() }
    func releaseReadinessDescriptor(_ descriptor: Int32) { queue.releaseReadinessDescriptor(descriptor) }
    func submitQueued() { queue.submitQueued() }
    func runCompletions(atMost limit: Int) -> Int { queue.runCompletions(atMost: limit) }
    var isBusyOnItsThread: Bool { queue.isBusyOnItsThread }
    func close() { queue.close() }
}

/// The server's view of an `EventLoopPoller`.
final class LoopIdlePoller: NBDIdlePoller {
    let poller: EventLoopPoller

    init(_ poller: EventLoopPoller) { self.poller = poller }

    func pollUntilReady(nanoseconds: UInt64) -> Bool { poller.pollUntilReady(nanoseconds: nanoseconds) }
    func close() { poller.close() }
}
