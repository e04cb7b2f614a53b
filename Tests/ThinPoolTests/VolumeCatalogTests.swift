import Foundation
import TestSupport
import Testing
import ThinFormat
import ThinSystem

@testable import ThinPool

/// `VolumeCatalog` keeps each volume's `VolumeLookup` (what every request reads) beside
/// its full state; the two must never disagree, whichever way the catalog changes.
@Suite struct VolumeCatalogTests {
    private func record(_ id: UInt64, root: UInt64 = 0, size: UInt64 = 1 << 20) -> VolumeRecord {
        VolumeRecord(id: id, kind: .volume, name: "v\(id)", virtualSize: size, mappingRoot: root, createdAt: 0)
    }

    private func expectAgreement(_ catalog: VolumeCatalog, _ ids: ClosedRange<UInt64>, sourceLocation: SourceLocation = #_sourceLocation) {
        for id in ids {
            #expect(catalog.lookup(id) == catalog[id].map { VolumeLookup($0.record) }, "volume \(id)", sourceLocation: sourceLocation)
        }
    }

    @Test func lookupsFollowEveryKindOfChange() {
        var catalog = VolumeCatalog()
        for id in 1...UInt64(40) { catalog[id] = VolumeState(record: record(id), recordBlock: 0, dirty: true) }
        expectAgreement(catalog, 1...41)
        // Changed through the record, as the pool changes roots, sizes and kinds.
        catalog[3]?.change { $0.mappingRoot = 777 }
        catalog[4]?.change { $0.virtualSize = 8 << 20 }
        catalog[5]?.change { $0.kind = .snapshot }
        catalog[6]?.change { $0.origin = VolumeRecord.Origin(kind: .file, locator: "/tmp/origin.img", size: 1 << 20) }
        // Replaced whole, removed, and a change of a volume that is not there.
        var replaced = catalog[7]!
        replaced.record.mappingRoot = 99
        catalog[7] = replaced
        catalog[8] = nil
        catalog[1000]?.change { $0.mappingRoot = 1 }
        expectAgreement(catalog, 1...41)
        #expect(catalog.lookup(3)?.mappingRoot == 777)
        #expect(catalog.lookup(4)?.virtualSize == 8 << 20)
        #expect(catalog.lookup(5)?.isSnapshot == true)
        #expect(catalog.lookup(6)?.hasOrigin == true)
        #expect(catalog.lookup(7)?.mappingRoot == 99)
        #expect(catalog.lookup(8) == nil && catalog[8] == nil)
        #expect(catalog.lookup(1000) == nil && catalog[1000] == nil)
        #expect(catalog.count == 39)
    }

    @Test func aPoolsCatalogAgreesAfterVolumeOperations() throws {
        let directory = TemporaryDirectory("volume-catalog")
        let pool = try Pool.create(
            path: directory.path + "/p.pool", geometry: PoolGeometry(dataSize: 64 << 20, blockSize: 65536, metadataSize: 4 << 20))
        _ = try pool.createVolume("a", size: 4 << 20)
        try pool.write("a", at: 0, pattern(1 << 20, seed: 3))
        try pool.snapshot("a@s")
        _ = try pool.clone("a@s", as: "c")
        try pool.write("c", at: 65536, pattern(65536, seed: 4))
        try pool.resize("a", to: 8 << 20)
        try pool.rename("c", to: "d")
        try pool.commit()
        _ = try pool.createVolume("gone", size: 1 << 20)
        try pool.delete("gone")
        let ids = try ["a", "a@s", "d"].map { try pool.volumeID($0) }
        pool.lock.withSharedAccess { state in
            #expect(state.volumes.count == 3)
            for (id, volume) in state.volumes {
                #expect(state.volumes.lookup(id) == VolumeLookup(volume.record), "\(volume.record.name)")
            }
            #expect(state.volumes.lookup(ids[0])?.virtualSize == 8 << 20)
            #expect(state.volumes.lookup(ids[1])?.isSnapshot == true)
            #expect(state.volumes.lookup(ids[2])?.mappingRoot != 0)
        }
        try pool.close()
    }
}
