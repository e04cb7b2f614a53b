import NBDProtocol

/// A run of an export's address space, for sparse reads and block status.
public struct NBDExtent: Equatable, Sendable {
    public var offset: UInt64
    public var length: UInt64
    /// Unallocated space that reads as zeros.
    public var isHole: Bool

    public init(offset: UInt64, length: UInt64, isHole: Bool) {
        self.offset = offset
        self.length = length
        self.isHole = isHole
    }
}

/// A run of an export's address space with the status flags of one metadata context.
public struct NBDStatusExtent: Equatable, Sendable {
    public var offset: UInt64
    public var length: UInt64
    public var flags: UInt32

    public init(offset: UInt64, length: UInt64, flags: UInt32) {
        self.offset = offset
        self.length = length
        self.flags = flags
    }
}

/// A failed export operation: the NBD error code and a message for the human user.
public struct NBDExportError: Error, Equatable, Sendable {
    public var code: NBDError
    public var message: String

    public init(_ code: NBDError, _ message: String) {
        self.code = code
        self.message = message
    }
}

/// One open export. The server validates every request (range, flags, read-only)
/// before calling these, which may block: they run on the server's thread pool, many
/// at once, from many connections.
public protocol NBDExport: AnyObject, Sendable {
    var exportDescription: NBDExportDescription { get }
    /// Reads into `buffer`; returns the extents (in order, covering the range) so that
    /// holes can be sent as hole chunks, or no extents when the whole range is data
    /// (the common case, then without allocating a list). The same holds for the
    /// extents `readAsync` and `readWithoutBlocking` pass on.
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(NBDExportError) -> [NBDExtent]
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) throws(NBDExportError)
    /// Several WRITEs a connection sent in one pass, each with its own outcome (nil:
    /// done). An export may run them together (the default runs them one by one).
    func writeBatch(_ writes: [NBDWrite]) -> [NBDExportError?]
    func writeZeroes(at offset: UInt64, length: UInt64, mayTrim: Bool, fua: Bool) throws(NBDExportError)
    func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(NBDExportError)
    /// Makes every write already replied to, on any connection, durable.
    func flush() throws(NBDExportError)
    func extents(at offset: UInt64, length: UInt64) throws(NBDExportError) -> [NBDExtent]
    /// The status of the range in one of the provider's metadata contexts (`key` from
    /// its `NBDMetaContext`), in order from `offset`. The default fails: an export
    /// whose provider offers contexts implements it.
    func statusExtents(context key: UInt64, at offset: UInt64, length: UInt64) throws(NBDExportError) -> [NBDStatusExtent]
    /// Called when the last connection using this export object closes.
    func close()

    /// The rate limit every request to this export draws from (nil: none). The server
    /// delays requests on its event loop by what it says; it never blocks.
    var rateLimit: NBDRateLimit? { get }

    /// Like `read`, but may return before the data is there and call `completion` from
    /// another thread; `buffer` stays valid until then. Runs on the server's thread pool.
    func readAsync(
        at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
        completion: @escaping @Sendable (Result<[NBDExtent], NBDExportError>) -> Void)

    /// Tries to start a read on an event loop thread without blocking it (no lock
    /// waits, no synchronous disk I/O). `queue` is this loop's, from
    /// `NBDExportProvider.makeLoopQueue`, when there is one. `completion` runs on the
    /// loop, only after `.started`. The default says `.wouldBlock`, and the server then
    /// calls `readAsync` on its thread pool.
    func readWithoutBlocking(
        at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, queue: NBDLoopQueue?,
        completion: @escaping (Result<[NBDExtent], NBDExportError>) -> Void
    ) -> NBDNonBlockingRead

    /// Tries to start a WRITE (without FUA) on an event loop thread without blocking it,
    /// as `readWithoutBlocking` does reads; `data` stays valid until `completion`, which
    /// runs on the loop only after `.started`. The default says `.wouldBlock`, and the
    /// server then hands the write to `writeBatch` on its thread pool.
    func writeWithoutBlocking(
        at offset: UInt64, from data: UnsafeRawBufferPointer, queue: NBDLoopQueue?,
        completion: @escaping (NBDExportError?) -> Void
    ) -> NBDNonBlockingWrite
}

/// How `NBDExport.writeWithoutBlocking` went.
public enum NBDNonBlockingWrite {
    /// Queued on the loop queue; the completion runs on the loop.
    case started
    /// Nothing done; the server runs the write on a thread that may block.
    case wouldBlock
}

/// One WRITE of `NBDExport.writeBatch`; `data` is valid for the call.
public struct NBDWrite {
    public var offset: UInt64
    public var data: UnsafeRawBufferPointer
    public var fua: Bool

    public init(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) {
        self.offset = offset
        self.data = data
        self.fua = fua
    }
}

/// How `NBDExport.readWithoutBlocking` went.
public enum NBDNonBlockingRead {
    /// Done on the spot; the completion is not called.
    case completed(Result<[NBDExtent], NBDExportError>)
    /// Queued on the loop queue; the completion runs on the loop.
    case started
    /// Nothing done; the server runs the read on a thread that may block.
    case wouldBlock
}

/// Disk I/O owned by one event loop: requests queue up while the loop parses input,
/// leave every few requests and in `submitQueued`, and complete on the loop in
/// `runCompletions` when the readiness descriptor becomes readable. Used only on its
/// loop.
public protocol NBDLoopQueue: AnyObject {
    /// A descriptor the server watches (and closes); readable when completions wait.
    func makeReadinessDescriptor() throws -> Int32
    /// Closes a readiness descriptor the server could not watch.
    func releaseReadinessDescriptor(_ descriptor: Int32)
    func submitQueued()
    /// Runs the completions of at most `limit` finished requests without waiting;
    /// returns how many ran (0: none were waiting).
    func runCompletions(atMost limit: Int) -> Int
    /// Whether a thread of the queue's own is at work on requests handed out (copies
    /// into or out of the page cache): a loop that polls meanwhile takes the CPU that
    /// work needs, so it sleeps instead.
    var isBusyOnItsThread: Bool { get }
    /// Waits for what is in flight, runs those completions, and releases the queue.
    func close()
}

extension NBDExport {
    public var rateLimit: NBDRateLimit? { nil }

    public func statusExtents(context key: UInt64, at offset: UInt64, length: UInt64) throws(NBDExportError) -> [NBDStatusExtent] {
        throw NBDExportError(.invalid, "this export has no metadata context \(key)")
    }

    public func readAsync(
        at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
        completion: @escaping @Sendable (Result<[NBDExtent], NBDExportError>) -> Void
    ) {
        completion(Result { () throws(NBDExportError) in try read(at: offset, into: buffer) })
    }

    public func readWithoutBlocking(
        at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, queue: NBDLoopQueue?,
        completion: @escaping (Result<[NBDExtent], NBDExportError>) -> Void
    ) -> NBDNonBlockingRead {
        .wouldBlock
    }

    public func writeWithoutBlocking(
        at offset: UInt64, from data: UnsafeRawBufferPointer, queue: NBDLoopQueue?,
        completion: @escaping (NBDExportError?) -> Void
    ) -> NBDNonBlockingWrite {
        .wouldBlock
    }

    public func writeBatch(_ writes: [NBDWrite]) -> [NBDExportError?] {
        writes.map { write -> NBDExportError? in
            do throws(NBDExportError) {
                try self.write(at: write.offset, from: write.data, fua: write.fua)
                return nil
            } catch {
                return error
            }
        }
    }
}

/// The exports a server offers. Implementations are thread-safe.
public protocol NBDExportProvider: AnyObject, Sendable {
    /// The export named `name` ("" = the default export, if any).
    func describe(_ name: String) -> NBDExportDescription?
    func allExports() -> [NBDExportDescription]
    /// The metadata contexts besides `base:allocation` that export `name` offers and
    /// that match `queries` (see `NBDHandshake.CatalogQuery.metaContexts`); nil when
    /// there is no such export. The default offers none. Runs off the event loop.
    func metaContexts(of name: String, matching queries: [String], listing: Bool) -> [NBDMetaContext]?
    /// Opens the export a handshake selected. All connections to one name may share one object.
    func open(_ description: NBDExportDescription) throws(NBDExportError) -> NBDExport
    /// A disk queue for one event loop, called once on each loop that gets a
    /// connection; nil (the default) when the exports have no use for one.
    func makeLoopQueue() -> NBDLoopQueue?
    /// A poller for the event loop that watches `descriptor` (a loop queue's readiness
    /// descriptor, already registered with the loop), or nil (the default) when the
    /// loop cannot be polled. Runs off the loop, once per loop.
    func makeIdlePoller(forLoopWatching descriptor: Int32) -> NBDIdlePoller?

    /// The WRITEs that all connections of one event loop sent in one loop round, per
    /// export, each write with its own outcome. A provider may run them as one batch
    /// (the default runs each export's `writeBatch` in turn). Runs off the loop.
    func writeBatches(_ batches: [NBDWriteBatch]) -> [[NBDExportError?]]
}

/// The WRITEs one connection sent to `export` in one pass.
public struct NBDWriteBatch {
    public var export: NBDExport
    public var writes: [NBDWrite]

    public init(export: NBDExport, writes: [NBDWrite]) {
        self.export = export
        self.writes = writes
    }
}

extension NBDExportProvider {
    public func makeLoopQueue() -> NBDLoopQueue? { nil }

    public func makeIdlePoller(forLoopWatching descriptor: Int32) -> NBDIdlePoller? { nil }

    public func metaContexts(of name: String, matching queries: [String], listing: Bool) -> [NBDMetaContext]? {
        describe(name) == nil ? nil : []
    }

    public func writeBatches(_ batches: [NBDWriteBatch]) -> [[NBDExportError?]] {
        batches.map { $0.export.writeBatch($0.writes) }
    }
}
