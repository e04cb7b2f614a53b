import Foundation
import Testing
import ThinSystem

/// The page-cache engine's copy-on-write sources: one the cache holds is read from it,
/// one it does not is read with O_DIRECT and stays out of it.
@Suite struct ColdCopyTests {
    /// Whether every byte of the range is in the page cache, asked through a descriptor
    /// of the test's own (the cache belongs to the file, not to a descriptor).
    static func isCached(_ path: String, at offset: Int, count: Int) -> Bool {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        // mincore on a mapping of the range: one byte per page, bit 0 set when resident.
        guard let mapping = mmap(nil, count, PROT_READ, MAP_SHARED, fd, off_t(offset)), mapping != MAP_FAILED else { return false }
        defer { munmap(mapping, count) }
        var residency = [UInt8](repeating: 0, count: (count + 4095) / 4096)
        guard mincore(mapping, count, &residency) == 0 else { return false }
        return residency.allSatisfy { $0 & 1 == 1 }
    }

    static func evict(_ path: String, at offset: Int = 0, count: Int = 0) {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        fsync(fd)
        posix_fadvise(fd, off_t(offset), off_t(count), POSIX_FADV_DONTNEED)
    }

    static func filled(_ value: UInt8, _ count: Int = 65536) -> AlignedBuffer {
        let buffer = AlignedBuffer(count: count)
        buffer.bytes.initializeMemory(as: UInt8.self, repeating: value)
        return buffer
    }

    /// A 1 MiB file opened for `--cache writeback`, removed afterwards.
    static func withWritebackFile(_ name: String, _ body: (String, BlockDevice) throws -> Void) throws {
        let path = temporaryPath(name)
        defer { unlink(path) }
        let device = try PoolFile.open(path: path, readOnly: false, cache: .writeback, create: true)
        defer { device.close() }
        try device.setSize(1 << 20)
        try body(path, device)
    }

    @Test func coldSourcesAreReadAroundTheCache() throws {
        try Self.withWritebackFile("coldcopy") { path, device in
            let (warm, cold) = (Self.filled(1), Self.filled(2))
            try device.perform([IORequest(.write, warm.bytes, at: 0), IORequest(.write, cold.bytes, at: 65536)])
            try device.barrier()
            Self.evict(path)
            try #require(!Self.isCached(path, at: 0, count: 131072), "this file system keeps no page cache to test against")
            let warmRead = AlignedBuffer(count: 65536)
            try device.read(into: warmRead.bytes, at: 0)
            // Readahead may have brought in the next block too.
            Self.evict(path, at: 65536, count: 65536)
            #expect(Self.isCached(path, at: 0, count: 65536))
            #expect(!Self.isCached(path, at: 65536, count: 65536))

            let sources = [AlignedBuffer(count: 65536), AlignedBuffer(count: 65536)]
            try device.readCopySources([IORequest(.read, sources[0].bytes, at: 0), IORequest(.read, sources[1].bytes, at: 65536)])
            #expect(sources[0].bytes.allSatisfy { $0 == 1 })
            #expect(sources[1].bytes.allSatisfy { $0 == 2 })
            // Read with O_DIRECT: the cold block did not come into the cache.
            #expect(!Self.isCached(path, at: 65536, count: 65536))

            // Unaligned sources cannot go around the cache; they are read through it.
            let unaligned = AlignedBuffer(count: 8192)
            let odd = UnsafeMutableRawBufferPointer(rebasing: unaligned.bytes[1..<4097])
            try device.readCopySources([IORequest(.read, odd, at: 65536 + 100)])
            #expect(odd.allSatisfy { $0 == 2 })
            #expect(Self.isCached(path, at: 65536, count: 4096))
            // The I/O above reaches these buffers through pointers alone: they must
            // outlive it, not just their last use by name.
            withExtendedLifetime((warm, cold, warmRead, sources, unaligned)) {}
        }
    }

    /// Several cold sources at once (read side by side through a ring), one of them with
    /// a page written through the cache and not yet written back: the direct reads see
    /// that page's new contents.
    @Test func coldSourcesSeeDirtyCachedPages() throws {
        try Self.withWritebackFile("colddirty") { path, device in
            let blocks = (0..<3).map { Self.filled(UInt8(20 + $0)) }
            try device.perform(blocks.enumerated().map { IORequest(.write, $0.element.bytes, at: UInt64(262144 + $0.offset * 65536)) })
            try device.barrier()
            Self.evict(path)
            let dirty = Self.filled(99, 4096)
            try device.write(UnsafeRawBufferPointer(dirty.bytes), at: 262144 + 65536 + 8192)
            #expect(!Self.isCached(path, at: 262144, count: 3 * 65536))

            let sources = (0..<3).map { _ in AlignedBuffer(count: 65536) }
            try device.readCopySources(sources.enumerated().map { IORequest(.read, $0.element.bytes, at: UInt64(262144 + $0.offset * 65536)) })
            #expect(sources[0].bytes.allSatisfy { $0 == 20 })
            #expect(sources[1].bytes[0..<8192].allSatisfy { $0 == 21 })
            #expect(sources[1].bytes[8192..<12288].allSatisfy { $0 == 99 })
            #expect(sources[1].bytes[12288...].allSatisfy { $0 == 21 })
            #expect(sources[2].bytes.allSatisfy { $0 == 22 })
            #expect(!Self.isCached(path, at: 262144, count: 65536))
            withExtendedLifetime((blocks, dirty, sources)) {}
        }
    }

    /// Copies go around the cache (O_DIRECT), and what the cache held of their ranges,
    /// clean or dirty, never shows through afterwards: reads through the cache and the
    /// file itself both hold the copies.
    @Test func copiesAreWrittenAroundTheCache() throws {
        try Self.withWritebackFile("copywrite") { path, device in
            // Block 0 clean in the cache, block 1 with a dirty page, block 2 not cached.
            let old = (0..<3).map { Self.filled(UInt8(40 + $0)) }
            try device.perform(old.enumerated().map { IORequest(.write, $0.element.bytes, at: UInt64($0.offset * 65536)) })
            try device.barrier()
            Self.evict(path)
            let cachedRead = AlignedBuffer(count: 65536)
            try device.read(into: cachedRead.bytes, at: 0)
            let dirty = Self.filled(77, 4096)
            try device.write(UnsafeRawBufferPointer(dirty.bytes), at: 65536 + 4096)
            Self.evict(path, at: 131072, count: 65536)
            try #require(Self.isCached(path, at: 0, count: 65536), "this file system keeps no page cache to test against")
            #expect(!Self.isCached(path, at: 131072, count: 65536))

            let copies = (0..<3).map { Self.filled(UInt8(60 + $0)) }
            try device.writeNewBlocks(copies.enumerated().map { IORequest(.write, $0.element.bytes, at: UInt64($0.offset * 65536)) }, bypassingCache: true)
            // Written with O_DIRECT: the uncached block did not come into the cache.
            #expect(!Self.isCached(path, at: 131072, count: 65536))

            func readBack() throws -> [[UInt8]] {
                try (0..<3).map { index in
                    let buffer = AlignedBuffer(count: 65536)
                    try device.read(into: buffer.bytes, at: UInt64(index * 65536))
                    return Array(buffer.bytes)
                }
            }
            let expected = (0..<3).map { [UInt8](repeating: UInt8(60 + $0), count: 65536) }
            #expect(try readBack() == expected)
            // From the file after a write-back and with the cache dropped: no stale page
            // was written back over a copy.
            try device.barrier()
            Self.evict(path)
            #expect(try readBack() == expected)

            // A copy O_DIRECT cannot take (an unaligned buffer) goes through the cache.
            let unaligned = AlignedBuffer(count: 65536 + 4096)
            let odd = UnsafeMutableRawBufferPointer(rebasing: unaligned.bytes[1..<65537])
            odd.initializeMemory(as: UInt8.self, repeating: 91)
            try device.writeNewBlocks([IORequest(.write, odd, at: 196608)], bypassingCache: true)
            let check = AlignedBuffer(count: 65536)
            try device.read(into: check.bytes, at: 196608)
            #expect(check.bytes.allSatisfy { $0 == 91 })
            withExtendedLifetime((old, cachedRead, dirty, copies, unaligned, check)) {}
        }
    }
}
