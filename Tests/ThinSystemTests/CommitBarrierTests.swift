import Foundation
import Testing

@testable import ThinSystem

/// The page-cache engine's two barriers, seen in the page cache itself (cachestat's
/// dirty-page count): the auto-commit's writes back the new blocks and its own write,
/// and leaves data overwritten in place dirty; the full one (FLUSH) writes back all.
@Suite struct CommitBarrierTests {
    @Test func newBlocksBarrierLeavesInPlaceDataDirtyAndTheFullBarrierDoesNot() throws {
        try ColdCopyTests.withWritebackFile("commitbarrier") { path, device in
            let file = try #require(device as? FileDevice)
            try #require(file.limitsCommitBarriers, "the lighter barrier needs ext4 or XFS")
            try #require(Syscall.dirtyPages(file.fd, 0, 4096) != nil, "cachestat (Linux 6.5) is needed to look")
            func dirty(_ block: Int) -> Int64 { Syscall.dirtyPages(file.fd, UInt64(block * 65536), 65536) ?? -1 }

            // Block 0 is written and made durable, then overwritten in place.
            let blocks = (0..<5).map { ColdCopyTests.filled(UInt8(10 + $0)) }
            try device.perform([IORequest(.write, blocks[0].bytes, at: 0)])
            try device.barrier()
            try device.perform([IORequest(.write, UnsafeMutableRawBufferPointer(rebasing: blocks[1].bytes[0..<4096]), at: 8192)])
            // Blocks 1 and 2 are new, through the cache; block 3 is a copy, around it.
            try device.writeNewBlocks([IORequest(.write, blocks[1].bytes, at: 65536), IORequest(.write, blocks[2].bytes, at: 131072)], bypassingCache: false)
            try device.writeNewBlocks([IORequest(.write, blocks[3].bytes, at: 196608)], bypassingCache: true)
            #expect(dirty(0) > 0)
            #expect(dirty(1) > 0 && dirty(2) > 0)
            #expect(dirty(3) == 0, "the copy went around the cache")

            // The auto-commit's barrier, carried by a write of its own (block 4).
            try device.writeWithNewBlocksBarrier(IORequest(.write, UnsafeMutableRawBufferPointer(rebasing: blocks[4].bytes[0..<4096]), at: 262144))
            #expect(dirty(1) == 0 && dirty(2) == 0, "new blocks are written back")
            #expect(dirty(4) == 0, "its own write is written back")
            #expect(dirty(0) > 0, "data overwritten in place is left to the next FLUSH")

            // A new block remembered before the write-back that runs outside the lock.
            try device.writeNewBlocks([IORequest(.write, blocks[2].bytes, at: 327680)], bypassingCache: false)
            try device.writeBackNewBlocks()
            #expect(dirty(5) == 0)
            #expect(dirty(0) > 0)

            try device.barrier()
            #expect(dirty(0) == 0, "the full barrier writes back everything")

            // What reads see is unchanged by any of it.
            let check = AlignedBuffer(count: 65536)
            try device.read(into: check.bytes, at: 0)
            #expect(check.bytes[0..<8192].allSatisfy { $0 == 10 } && check.bytes[8192..<12288].allSatisfy { $0 == 11 })
            try device.read(into: check.bytes, at: 196608)
            #expect(check.bytes.allSatisfy { $0 == 13 })
            withExtendedLifetime((blocks, check)) {}
            _ = path
        }
    }
}
