import Dispatch

/// An in-memory block device for tests, with fault injection and power-cut simulation.
///
/// It keeps two images: what reads see now, and what would survive a power cut (the
/// state at the last `barrier()`). Writes since the last barrier are "volatile"; a
/// simulated crash keeps a random subset of them, in any order, as a disk cache might.
/// `writeWithNewBlocksBarrier` makes only the new blocks (`writeNewBlocks`) and discards
/// durable, as the file device's lighter barrier does; data written in place through
/// `perform` stays volatile until `barrier()`.
public final class MemoryDevice: BlockDevice, @unchecked Sendable {
    static let pageSize = 4096

    private let lock = Lock()
    private var pages: [UInt64: [UInt8]] = [:]
    private var durablePages: [UInt64: [UInt8]] = [:]
    /// Writes since the last barrier, oldest first.
    private var volatileWrites: [VolatileWrite] = []
    private var currentSize: UInt64
    private var durableSize: UInt64

    /// Number of write requests performed so far (each request in a batch counts).
    public private(set) var writeCount = 0
    public private(set) var barrierCount = 0

    private var failReadsRemaining = 0
    private var failWritesRemaining = 0
    private var failBarriersRemaining = 0
    private var failWriteNumber: Int?
    private var failBarrierNumber: Int?
    private var injectedCode = SystemError.Code.io
    private var dropWritesAfter: Int?
    private var cutPowerAtWrite: Int?
    private var cutPowerAtBarrier: Int?
    public private(set) var powerIsCut = false

    public init(size: UInt64) {
        currentSize = size
        durableSize = size
    }

    private var barrierHold: DispatchSemaphore?
    /// Signalled each time a barrier starts waiting under `holdBarriers()`.
    public let barrierWaiting = DispatchSemaphore(value: 0)

    /// Makes every barrier wait until `releaseBarriers()` (to observe what runs meanwhile).
    public func holdBarriers() {
        lock.withLock { barrierHold = DispatchSemaphore(value: 0) }
    }

    private var writeHold: (range: Range<UInt64>, gate: DispatchSemaphore)?
    /// Signalled each time a write starts waiting under `holdWrites(in:)`.
    public let writeWaiting = DispatchSemaphore(value: 0)

    /// Makes writes that touch `range` wait until `releaseWrites()`; other I/O goes on.
    public func holdWrites(in range: Range<UInt64>) {
        lock.withLock { writeHold = (range, DispatchSemaphore(value: 0)) }
    }

    public func releaseWrites() {
        let hold = lock.withLock { () -> DispatchSemaphore? in
            defer { writeHold = nil }
            return writeHold?.gate
        }
        hold?.signal()
    }

    public func releaseBarriers() {
        let hold = lock.withLock { () -> DispatchSemaphore? in
            defer { barrierHold = nil }
            return barrierHold
        }
        hold?.signal()
    }

    public var engineName: String { "memory" }

    public var size: UInt64 { lock.withLock { currentSize } }

    // MARK: Fault injection

    /// The next `count` reads fail with `code`.
    public func failReads(_ count: Int, with code: SystemError.Code = .io) {
        lock.withLock { failReadsRemaining = count; injectedCode = code }
    }

    /// The next `count` writes fail with `code`.
    public func failWrites(_ count: Int, with code: SystemError.Code = .io) {
        lock.withLock { failWritesRemaining = count; injectedCode = code }
    }

    /// The next `count` barriers fail with `code`, and sync nothing: as a failed
    /// fdatasync, after which the writes it was to sync may be gone.
    public func failBarriers(_ count: Int, with code: SystemError.Code = .io) {
        lock.withLock { failBarriersRemaining = count; injectedCode = code }
    }

    /// Only the `n`-th write from now fails (EIO); the device works before and after.
    public func failWrite(number n: Int) {
        lock.withLock { failWriteNumber = writeCount + n }
    }

    /// Only the `n`-th barrier from now fails (EIO) and syncs nothing.
    public func failBarrier(number n: Int) {
        lock.withLock { failBarrierNumber = barrierCount + n }
    }

    /// Every write after the `n`-th (counting from now) is acknowledged and silently lost.
    public func dropWrites(after n: Int) {
        lock.withLock { dropWritesAfter = writeCount + n }
    }

    /// Power fails at the `n`-th write from now: that write and everything after it fail
    /// with EIO, and nothing after the last barrier is certain to survive.
    public func cutPower(atWrite n: Int) {
        lock.withLock { cutPowerAtWrite = writeCount + n }
    }

    /// Power fails at the `n`-th barrier from now, before it makes anything durable.
    public func cutPower(atBarrier n: Int) {
        lock.withLock { cutPowerAtBarrier = barrierCount + n }
    }

    /// The image a reboot would find: the durable state plus a random subset of the
    /// volatile writes (`keepVolatile` of 0 keeps none, 1 keeps all, in between chooses).
    public func imageAfterCrash(seed: UInt64, keepVolatile: Double = 0.5) -> MemoryDevice {
        lock.withLock {
            let image = MemoryDevice(size: durableSize)
            image.pages = durablePages
            var rng = SplitMix64(seed: seed)
            for write in volatileWrites where Double(rng.next() % 1_000_000) / 1_000_000 < keepVolatile {
                image.store(write.bytes, at: write.offset, length: write.length, durable: true)
            }
            image.currentSize = max(durableSize, image.currentSize)
            return image
        }
    }

    /// A copy of what reads see now, as a new device (a clean shutdown's image).
    public func snapshot() -> MemoryDevice {
        lock.withLock {
            let image = MemoryDevice(size: currentSize)
            image.pages = pages
            image.durablePages = pages
            return image
        }
    }

    /// Flips bits of the byte at `offset` (corruption tests).
    public func corrupt(at offset: UInt64, xor mask: UInt8 = 0xFF) {
        lock.withLock {
            let page = offset / UInt64(Self.pageSize)
            var bytes = pages[page] ?? [UInt8](repeating: 0, count: Self.pageSize)
            bytes[Int(offset % UInt64(Self.pageSize))] ^= mask
            pages[page] = bytes
            durablePages[page] = bytes
        }
    }

    /// Replaces the bytes at `offset` as if they had always been there (corruption
    /// tests: durable at once, no write counted). The range must lie in one page.
    public func patch(at offset: UInt64, with newBytes: [UInt8]) {
        lock.withLock {
            let page = offset / UInt64(Self.pageSize)
            let start = Int(offset % UInt64(Self.pageSize))
            precondition(start + newBytes.count <= Self.pageSize, "a patch must lie in one page")
            var bytes = pages[page] ?? [UInt8](repeating: 0, count: Self.pageSize)
            bytes.replaceSubrange(start..<start + newBytes.count, with: newBytes)
            pages[page] = bytes
            durablePages[page] = bytes
        }
    }

    /// The current contents of one page (zeros where nothing was written).
    public func page(_ index: UInt64) -> [UInt8] {
        lock.withLock { pages[index] ?? [UInt8](repeating: 0, count: Self.pageSize) }
    }

    /// Bytes held in memory (non-zero pages), for space tests.
    public var storedBytes: UInt64 { lock.withLock { UInt64(pages.count * Self.pageSize) } }

    // MARK: BlockDevice

    public func perform(_ requests: [IORequest]) throws {
        NonBlockingThread.assertMayBlock("synchronous device I/O")
        try performInMemory(requests)
    }

    /// `perform` without the blocking check: reads from memory never wait (writes may,
    /// when a test holds them).
    private func performInMemory(_ requests: [IORequest], tracked: Bool = false) throws {
        if let hold = lock.withLock({ writeHold }),
            requests.contains(where: { $0.kind == .write && hold.range.overlaps($0.offset..<($0.offset + UInt64($0.buffer.count))) })
        {
            writeWaiting.signal()
            hold.gate.wait()
            hold.gate.signal()
        }
        try lock.withLock { () throws(SystemError) in
            for request in requests {
                switch request.kind {
                case .read:
                    if powerIsCut { throw SystemError(.io, "device lost power") }
                    if failReadsRemaining > 0 {
                        failReadsRemaining -= 1
                        throw SystemError(injectedCode, "injected read fault")
                    }
                    guard request.offset + UInt64(request.buffer.count) <= currentSize else {
                        throw SystemError(.io, "read past end of device")
                    }
                    load(into: request.buffer, at: request.offset)
                case .write:
                    writeCount += 1
                    if let cut = cutPowerAtWrite, writeCount >= cut { powerIsCut = true }
                    if powerIsCut { throw SystemError(.io, "device lost power") }
                    if failWritesRemaining > 0 {
                        failWritesRemaining -= 1
                        throw SystemError(injectedCode, "injected write fault")
                    }
                    if writeCount == failWriteNumber { throw SystemError(.io, "injected write fault") }
                    guard request.offset + UInt64(request.buffer.count) <= currentSize else {
                        throw SystemError(.noSpace, "write past end of device")
                    }
                    if let drop = dropWritesAfter, writeCount > drop { continue }
                    let bytes = [UInt8](UnsafeRawBufferPointer(request.buffer))
                    store(bytes, at: request.offset, length: bytes.count, durable: false)
                    volatileWrites.append(VolatileWrite(offset: request.offset, length: bytes.count, bytes: bytes, tracked: tracked))
                }
            }
        }
    }

    /// Memory never blocks: the reads are done before returning (a thread-free stand-in
    /// for the page cache and loop queues of the file devices).
    public func startReadsWithoutBlocking(
        _ requests: [IORequest], on queue: LoopDiskQueue?, completion: @escaping (SystemError?) -> Void
    ) -> NonBlockingStart {
        precondition(requests.allSatisfy { $0.kind == .read })
        do {
            try performInMemory(requests)
            return .completed(nil)
        } catch {
            return .completed(error as? SystemError ?? SystemError(.io, "\(error)"))
        }
    }

    public func barrier() throws {
        try passBarrier {
            for write in volatileWrites {
                Self.apply(write.bytes, at: write.offset, length: write.length, to: &durablePages)
            }
            volatileWrites.removeAll(keepingCapacity: true)
        }
    }

    public func writeNewBlocks(_ requests: [IORequest], bypassingCache: Bool) throws {
        NonBlockingThread.assertMayBlock("synchronous device I/O")
        try performInMemory(requests, tracked: true)
    }

    /// Makes the new blocks and discards durable, in order; the in-place writes they
    /// overlap (older ones) can no longer reach the disk after them, and later ones stay
    /// volatile. Counts as a barrier for `barrierCount`, holds and injected faults.
    public func writeWithNewBlocksBarrier(_ request: IORequest) throws {
        NonBlockingThread.assertMayBlock("a device barrier")
        try performInMemory([request], tracked: true)
        try passBarrier {
            var kept: [VolatileWrite] = []
            for write in volatileWrites {
                guard write.tracked else {
                    kept.append(write)
                    continue
                }
                Self.apply(write.bytes, at: write.offset, length: write.length, to: &durablePages)
                kept = kept.flatMap { $0.removing(write.offset..<write.offset + UInt64(write.length)) }
            }
            volatileWrites = kept
        }
    }

    /// Nothing becomes durable without a barrier here: memory has no write-back to start.
    public func writeBackNewBlocks() throws {}

    /// A barrier's checks (holds, power cut, injected failures), then `makeDurable`
    /// under the lock.
    private func passBarrier(_ makeDurable: () -> Void) throws {
        NonBlockingThread.assertMayBlock("a device barrier")
        if let hold = lock.withLock({ barrierHold }) {
            barrierWaiting.signal()
            hold.wait()
            hold.signal()
        }
        try lock.withLock { () throws(SystemError) in
            if powerIsCut { throw SystemError(.io, "device lost power") }
            if failBarriersRemaining > 0 {
                failBarriersRemaining -= 1
                throw SystemError(injectedCode, "injected barrier failure")
            }
            barrierCount += 1
            if barrierCount == failBarrierNumber { throw SystemError(.io, "injected barrier failure") }
            if let cut = cutPowerAtBarrier, barrierCount >= cut {
                powerIsCut = true
                throw SystemError(.io, "device lost power")
            }
            makeDurable()
            durableSize = currentSize
        }
    }

    public func setSize(_ newSize: UInt64) throws {
        try lock.withLock { () throws(SystemError) in
            if powerIsCut { throw SystemError(.io, "device lost power") }
            currentSize = newSize
            let limit = (newSize + UInt64(Self.pageSize) - 1) / UInt64(Self.pageSize)
            pages = pages.filter { $0.key < limit }
        }
    }

    /// Memory is always there.
    public func preallocate(at offset: UInt64, length: UInt64) throws -> Bool { true }

    public func discard(at offset: UInt64, length: UInt64) -> Bool {
        // Zeroing is a write like any other as far as crash simulation goes.
        lock.withLock {
            if powerIsCut { return false }
            store(nil, at: offset, length: Int(length), durable: false)
            volatileWrites.append(VolatileWrite(offset: offset, length: Int(length), bytes: nil, tracked: true))
            return true
        }
    }

    public var allocatedBytes: UInt64? { storedBytes }

    public func close() {}

    // MARK: Storage

    private func load(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        var done = 0
        while done < buffer.count {
            let position = offset + UInt64(done)
            let page = position / UInt64(Self.pageSize)
            let inner = Int(position % UInt64(Self.pageSize))
            let n = min(Self.pageSize - inner, buffer.count - done)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n])
            if let bytes = pages[page] {
                bytes.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inner..<inner + n])) }
            } else {
                target.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += n
        }
    }

    /// Writes `source` (nil: zeros) over `length` bytes at `offset` of a page map. All-zero
    /// pages are dropped, so the map stays sparse.
    private static func apply(_ source: [UInt8]?, at offset: UInt64, length: Int, to pages: inout [UInt64: [UInt8]]) {
        var done = 0
        while done < length {
            let position = offset + UInt64(done)
            let page = position / UInt64(pageSize)
            let inner = Int(position % UInt64(pageSize))
            let n = min(pageSize - inner, length - done)
            if source == nil && n == pageSize {
                pages[page] = nil
            } else {
                var bytes = pages[page] ?? [UInt8](repeating: 0, count: pageSize)
                if let source {
                    bytes.replaceSubrange(inner..<inner + n, with: source[done..<done + n])
                } else {
                    bytes.replaceSubrange(inner..<inner + n, with: repeatElement(0, count: n))
                }
                pages[page] = bytes.allSatisfy { $0 == 0 } ? nil : bytes
            }
            done += n
        }
    }

    private func store(_ source: [UInt8]?, at offset: UInt64, length: Int, durable: Bool) {
        Self.apply(source, at: offset, length: length, to: &pages)
        if durable { Self.apply(source, at: offset, length: length, to: &durablePages) }
    }
}

/// A write since the last barrier; nil `bytes` is a discard of `length` bytes.
/// `tracked`: a new block or a discard, which `writeWithNewBlocksBarrier` makes durable.
private struct VolatileWrite {
    var offset: UInt64
    var length: Int
    var bytes: [UInt8]?
    var tracked: Bool

    /// What is left of this write outside `range`: none, one or two pieces.
    func removing(_ range: Range<UInt64>) -> [VolatileWrite] {
        let end = offset + UInt64(length)
        guard range.lowerBound < end, offset < range.upperBound else { return [self] }
        var pieces: [VolatileWrite] = []
        if offset < range.lowerBound { pieces.append(slice(offset..<range.lowerBound)) }
        if range.upperBound < end { pieces.append(slice(range.upperBound..<end)) }
        return pieces
    }

    private func slice(_ part: Range<UInt64>) -> VolatileWrite {
        let lower = Int(part.lowerBound - offset)
        let upper = Int(part.upperBound - offset)
        return VolatileWrite(offset: part.lowerBound, length: upper - lower, bytes: bytes.map { Array($0[lower..<upper]) }, tracked: tracked)
    }
}

/// A small deterministic random generator (SplitMix64) so failures replay from a seed.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE5_E4B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
