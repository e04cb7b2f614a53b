import Foundation
import Testing
import ThinSystem

func temporaryPath(_ name: String) -> String {
    let dir = FileManager.default.temporaryDirectory.path + "/thinbd-tests-\(getpid())"
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    let path = dir + "/\(name)-\(UUID().uuidString)"
    return path
}

/// Exercises any device with aligned and unaligned, single and batched requests.
func exercise(_ device: BlockDevice) throws {
    try device.setSize(1 << 20)
    let aligned = AlignedBuffer(count: 8192)
    for i in 0..<8192 { aligned.bytes[i] = UInt8(truncatingIfNeeded: i * 7) }
    try device.write(UnsafeRawBufferPointer(aligned.bytes), at: 4096)
    let back = AlignedBuffer(count: 8192)
    try device.read(into: back.bytes, at: 4096)
    #expect(Array(back.bytes) == Array(aligned.bytes))

    // Unaligned offset, length and buffer: bounced with read-modify-write.
    var odd = [UInt8](repeating: 0x5A, count: 1000)
    try odd.withUnsafeBytes { try device.write($0, at: 4096 + 333) }
    var check = [UInt8](repeating: 0, count: 1400)
    try check.withUnsafeMutableBytes { try device.read(into: $0, at: 4096 + 133) }
    #expect(Array(check[0..<200]) == Array(aligned.bytes[133..<333]))
    #expect(Array(check[200..<1200]) == odd)
    #expect(Array(check[1200..<1400]) == Array(aligned.bytes[1333..<1533]))

    // A batch of many requests completes together.
    let buffers = (0..<64).map { i -> AlignedBuffer in
        let b = AlignedBuffer(count: 4096)
        b.bytes.initializeMemory(as: UInt8.self, repeating: UInt8(i + 1))
        return b
    }
    try device.perform(buffers.enumerated().map { IORequest(.write, $0.element.bytes, at: UInt64(65536 + $0.offset * 4096)) })
    try device.barrier()
    let reads = (0..<64).map { _ in AlignedBuffer(count: 4096) }
    try device.perform(reads.enumerated().map { IORequest(.read, $0.element.bytes, at: UInt64(65536 + $0.offset * 4096)) })
    for (i, b) in reads.enumerated() { #expect(b.bytes.allSatisfy { $0 == UInt8(i + 1) }) }

    // Punching a hole makes the range read as zeros.
    if device.discard(at: 65536, length: 8192) {
        try device.read(into: back.bytes, at: 65536)
        #expect(back.bytes.allSatisfy { $0 == 0 })
    }
    odd.removeAll()
    _ = odd
}

@Suite struct DeviceTests {
    @Test func aioDirectDeviceOnRealFile() throws {
        let path = temporaryPath("aio")
        defer { unlink(path) }
        let device = try PoolFile.open(path: path, readOnly: false, cache: CacheMode.none, create: true)
        defer { device.close() }
        #expect(device.engineName == "libaio+O_DIRECT")
        try exercise(device)
    }

    @Test func bufferedDeviceOnRealFile() throws {
        let path = temporaryPath("buffered")
        defer { unlink(path) }
        let device = try PoolFile.open(path: path, readOnly: false, cache: .writeback, create: true)
        defer { device.close() }
        #expect(device.engineName == "pread/pwrite")
        try exercise(device)
    }

    @Test func memoryDevice() throws {
        try exercise(MemoryDevice(size: 0))
    }

    @Test func readPastEndIsAnError() throws {
        let path = temporaryPath("short")
        defer { unlink(path) }
        let device = try PoolFile.open(path: path, readOnly: false, create: true)
        defer { device.close() }
        try device.setSize(4096)
        let buffer = AlignedBuffer(count: 8192)
        #expect(throws: SystemError.self) { try device.read(into: buffer.bytes, at: 0) }
    }

    @Test func writersExcludeEachOther() throws {
        let path = temporaryPath("lock")
        defer { unlink(path) }
        let first = try PoolFile.open(path: path, readOnly: false, create: true)
        #expect(throws: PoolFile.InUse.self) { try PoolFile.open(path: path, readOnly: false) }
        #expect(throws: PoolFile.InUse.self) { try PoolFile.open(path: path, readOnly: true) }
        first.close()
        let reader1 = try PoolFile.open(path: path, readOnly: true)
        let reader2 = try PoolFile.open(path: path, readOnly: true)
        #expect(throws: PoolFile.InUse.self) { try PoolFile.open(path: path, readOnly: false) }
        reader1.close()
        reader2.close()
        try PoolFile.open(path: path, readOnly: false).close()
    }

    @Test func injectedFaultsSurfaceAsErrors() throws {
        let device = MemoryDevice(size: 1 << 20)
        let buffer = AlignedBuffer(count: 4096)
        device.failWrites(1, with: .noSpace)
        #expect(throws: SystemError(.noSpace, "injected write fault")) { try device.write(UnsafeRawBufferPointer(buffer.bytes), at: 0) }
        try device.write(UnsafeRawBufferPointer(buffer.bytes), at: 0)
        device.failReads(1)
        #expect(throws: SystemError.self) { try device.read(into: buffer.bytes, at: 0) }
    }

    @Test func powerCutKeepsOnlyBarrieredWritesWhenNothingVolatileSurvives() throws {
        let device = MemoryDevice(size: 1 << 20)
        let one = AlignedBuffer(count: 4096)
        one.bytes.initializeMemory(as: UInt8.self, repeating: 1)
        try device.write(UnsafeRawBufferPointer(one.bytes), at: 0)
        try device.barrier()
        one.bytes.initializeMemory(as: UInt8.self, repeating: 2)
        try device.write(UnsafeRawBufferPointer(one.bytes), at: 0)
        device.cutPower(atWrite: 1)
        #expect(throws: SystemError.self) { try device.write(UnsafeRawBufferPointer(one.bytes), at: 8192) }
        let lost = device.imageAfterCrash(seed: 1, keepVolatile: 0)
        try lost.read(into: one.bytes, at: 0)
        #expect(one.bytes.allSatisfy { $0 == 1 })
        let kept = device.imageAfterCrash(seed: 1, keepVolatile: 1)
        try kept.read(into: one.bytes, at: 0)
        #expect(one.bytes.allSatisfy { $0 == 2 })
    }
}
