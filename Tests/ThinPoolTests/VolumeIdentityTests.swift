import TestSupport
import Testing
import ThinFormat
import ThinSystem

@testable import ThinPool

/// Every image has a UUID of its own, kept across renames and reopens; records from
/// before UUIDs get one at the next read-write open.
@Suite struct VolumeIdentityTests {
    @Test func everyImageHasItsOwnStableUUID() throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("v", size: 1 << 20)
        try pool.snapshot("v@s")
        try pool.clone("v@s", as: "c")
        let uuids = pool.listVolumes().compactMap(\.uuid)
        #expect(uuids.count == 3 && Set(uuids).count == 3, "\(uuids)")
        for uuid in uuids {
            // Version 4, variant 10xx, in the usual text form.
            let parts = uuid.split(separator: "-")
            #expect(parts.map(\.count) == [8, 4, 4, 4, 12] && parts[2].first == "4" && "89ab".contains(parts[3].first!), "\(uuid)")
        }
        let before = try pool.volumeInfo("v").uuid
        try pool.rename("v", to: "w")
        #expect(try pool.volumeInfo("w").uuid == before)
        #expect(try pool.volumeInfo("w@s").uuid == uuids.first { $0 != before && $0 != (try? pool.volumeInfo("c").uuid) })
        try pool.close()
        let reopened = try Pool.open(device: device)
        #expect(try reopened.volumeInfo("w").uuid == before)
        #expect(Set(reopened.listVolumes().compactMap(\.uuid)) == Set(uuids))
        try reopened.close()
    }

    @Test func recordsWithoutAUUIDGetOneAtTheNextReadWriteOpen() throws {
        let (pool, device) = try makeMemoryPool()
        try pool.createVolume("old", size: 1 << 20)
        try pool.close()
        // Make the record look as an older build wrote it: sixteen zero bytes, sealed.
        let inspect = try Pool.open(device: device, readOnly: true)
        let id = try inspect.volumeID("old")
        try inspect.close()
        let recordBlock = try #require(blockHoldingRecord(of: id, in: device))
        for half in 0..<2 {
            rewriteField(of: device, block: recordBlock, offset: VolumeRecord.uuidOffset + 8 * half, width: 8) { _ in 0 }
        }
        let readOnly = try Pool.open(device: device, readOnly: true)
        #expect(try readOnly.volumeInfo("old").uuid == nil)
        try readOnly.close()
        let writable = try Pool.open(device: device)
        let assigned = try #require(try writable.volumeInfo("old").uuid)
        #expect(writable.checkProblems() == nil)
        try writable.close()
        let again = try Pool.open(device: device, readOnly: true)
        #expect(try again.volumeInfo("old").uuid == assigned)
        #expect(again.checkProblems() == nil)
        try again.close()
    }

    /// The metadata block holding volume `id`'s record.
    func blockHoldingRecord(of id: UInt64, in device: MemoryDevice) -> UInt64? {
        let blocks = UInt64(device.size) / UInt64(MetadataLayout.blockSize)
        for block in 2..<min(blocks, 4096) {
            let page = device.page(block)
            let type = UInt16(page[8]) | UInt16(page[9]) << 8
            guard type == BlockType.volumeRecord.rawValue else { continue }
            if field(of: device, block: block, offset: 32, width: 8) == id { return block }
        }
        return nil
    }
}
