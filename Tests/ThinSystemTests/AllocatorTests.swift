import Foundation
import Testing

@testable import ThinSystem

@Suite struct AllocatorThresholdTests {
    /// A server frees and allocates buffers of a megabyte or more many times a second
    /// (read replies, write payloads); the freed memory must be reused as it is, not
    /// handed back to the kernel and faulted in again, zeroed, page by page.
    @Test func freedLargeBuffersAreReusedWithoutFaultingTheirPagesAgain() {
        #expect(SystemInfo.keepFreedBuffersMapped())
        let bufferSize = 1 << 20
        let buffersAtOnce = 8
        let pageSize = 4096
        func allocateTouchAndFree() {
            let buffers = (0..<buffersAtOnce).map { _ in
                UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: pageSize)
            }
            for buffer in buffers {
                for page in stride(from: 0, to: bufferSize, by: pageSize) {
                    buffer.storeBytes(of: 1, toByteOffset: page, as: UInt8.self)
                }
            }
            for buffer in buffers { buffer.deallocate() }
        }
        // The first rounds map the memory, and the heap settles (aligned allocations
        // leave gaps) within about six.
        for _ in 0..<4 { allocateTouchAndFree() }
        let before = minorFaultsOfThisThread()
        let rounds = 20
        for _ in 0..<rounds { allocateTouchAndFree() }
        let faults = minorFaultsOfThisThread() - before
        // Handed back after every round (glibc's default), every page faults again:
        // 40,960 here. Kept, the settled rounds fault none.
        let pagesTouched = rounds * buffersAtOnce * bufferSize / pageSize
        #expect(faults < pagesTouched / 4, "\(faults) page faults over \(pagesTouched) pages touched")
    }

    /// Field 10 of /proc/thread-self/stat (the 8th after the command's closing paren).
    private func minorFaultsOfThisThread() -> Int {
        let stat = (try? String(contentsOfFile: "/proc/thread-self/stat", encoding: .utf8)) ?? ""
        guard let end = stat.lastIndex(of: ")") else { return 0 }
        let fields = stat[stat.index(after: end)...].split(separator: " ")
        return fields.count > 7 ? Int(fields[7]) ?? 0 : 0
    }
}

@Suite struct RecycledMemoryTests {
    /// Runs `body` on a thread of its own, whose recycled lists start empty, and waits
    /// for it; the thread keeps freed blocks when `keeping`.
    private func onFreshThread(keeping: Bool = true, _ body: @escaping @Sendable () -> Void) throws {
        let done = DispatchSemaphore(value: 0)
        try DetachedThread.start {
            if keeping { RecycledMemory.keepFreedBlocksOnThisThread() }
            body()
            done.signal()
        }
        done.wait()
    }

    /// A thread that did not ask to keep blocks keeps none: worker threads that drop
    /// buffers the loops made must not collect them.
    @Test func aThreadThatDidNotAskKeepsNothing() throws {
        try onFreshThread(keeping: false) {
            let blocks = (0..<10).compactMap { _ in RecycledMemory.allocate(8224) }
            #expect(blocks.count == 10)
            for block in blocks { RecycledMemory.deallocate(block) }
            #expect(RecycledMemory.keptByCurrentThread == 0)
        }
    }

    /// A freed block of a class comes back for the next request of that class, so a
    /// loop that allocates and frees a reply buffer per request reuses one block.
    @Test func aFreedBlockIsHandedOutAgainOnTheSameThread() throws {
        try onFreshThread {
            #expect(RecycledMemory.keptByCurrentThread == 0)
            guard let first = RecycledMemory.allocate(8224) else { return #expect(Bool(false)) }
            first.storeBytes(of: 0xAB, toByteOffset: 8223, as: UInt8.self)
            RecycledMemory.deallocate(first)
            #expect(RecycledMemory.keptByCurrentThread == 3 * 4096, "12 KiB class: 8,224 bytes and the header")
            let second = RecycledMemory.allocate(9000)
            #expect(second == first, "the same class, so the same block")
            #expect(RecycledMemory.keptByCurrentThread == 0)
            let third = RecycledMemory.allocate(8224)
            #expect(third != nil && third != first, "nothing kept: a new block")
            if let second { RecycledMemory.deallocate(second) }
            if let third { RecycledMemory.deallocate(third) }
        }
    }

    /// A thread keeps at most 2 MiB; the rest goes back to malloc. Blocks outside the
    /// classes (above 136 KiB) are never kept.
    @Test func whatAThreadKeepsIsBounded() throws {
        try onFreshThread {
            let blocks = (0..<400).compactMap { _ in RecycledMemory.allocate(12_000) }
            #expect(blocks.count == 400)
            for block in blocks { RecycledMemory.deallocate(block) }
            #expect(RecycledMemory.keptByCurrentThread <= 2 << 20)
            #expect(RecycledMemory.keptByCurrentThread > (2 << 20) - 16 * 1024, "filled to the bound")
            let before = RecycledMemory.keptByCurrentThread
            if let large = RecycledMemory.allocate(1 << 20) { RecycledMemory.deallocate(large) }
            #expect(RecycledMemory.keptByCurrentThread == before)
        }
    }

    /// A block freed on another thread joins that thread's lists (when it keeps blocks),
    /// not the allocating thread's: no list is ever touched by two threads.
    @Test func aBlockFreedElsewhereIsKeptByTheFreeingThread() throws {
        nonisolated(unsafe) var block: UnsafeMutableRawPointer?
        try onFreshThread(keeping: false) { block = RecycledMemory.allocate(20_000) }
        #expect(block != nil)
        nonisolated(unsafe) var keptAfterFree = 0
        try onFreshThread {
            if let block { RecycledMemory.deallocate(block) }
            keptAfterFree = RecycledMemory.keptByCurrentThread
        }
        #expect(keptAfterFree == 5 * 4096)
    }

    /// Growing keeps the bytes: inside a block's class the block stays; past it, into
    /// another class or past every class, the bytes are copied; shrinking keeps them too.
    @Test func reallocationKeepsTheBytes() throws {
        try onFreshThread {
            guard var block = RecycledMemory.allocate(5000) else { return #expect(Bool(false)) }
            for i in 0..<5000 { block.storeBytes(of: UInt8(truncatingIfNeeded: i * 7), toByteOffset: i, as: UInt8.self) }
            func intact(_ pointer: UnsafeMutableRawPointer, _ count: Int) -> Bool {
                (0..<count).allSatisfy { pointer.load(fromByteOffset: $0, as: UInt8.self) == UInt8(truncatingIfNeeded: $0 * 7) }
            }
            let inPlace = RecycledMemory.reallocate(block, 5000, 8000)
            #expect(inPlace == block, "8,000 bytes still fit the 8 KiB class")
            guard let grown = RecycledMemory.reallocate(block, 5000, 100_000) else { return #expect(Bool(false)) }
            #expect(intact(grown, 5000))
            guard let huge = RecycledMemory.reallocate(grown, 5000, 1 << 20) else { return #expect(Bool(false)) }
            #expect(intact(huge, 5000))
            guard let larger = RecycledMemory.reallocate(huge, 5000, 2 << 20) else { return #expect(Bool(false)) }
            #expect(intact(larger, 5000), "outside the classes: realloc itself")
            guard let shrunk = RecycledMemory.reallocate(larger, 2 << 20, 3000) else { return #expect(Bool(false)) }
            #expect(intact(shrunk, 3000))
            block = shrunk
            RecycledMemory.deallocate(block)
        }
    }
}
