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
