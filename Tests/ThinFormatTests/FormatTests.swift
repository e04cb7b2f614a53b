import Testing
import ThinFormat

/// A 4 KiB scratch block for codec tests.
final class Block {
    let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: MetadataLayout.blockSize, alignment: 16)
    init() { storage.initializeMemory(as: UInt8.self, repeating: 0) }
    deinit { storage.deallocate() }
}

@Suite struct CRC32CTests {
    @Test func knownVectors() {
        // Check values from RFC 3720 (iSCSI) and the common "123456789" test.
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
    }

    @Test func continuationEqualsWhole() {
        let bytes = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let whole = CRC32C.checksum(bytes)
        let split = bytes.withUnsafeBytes { raw in
            CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[333...]), continuing: CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[..<333])))
        }
        #expect(whole == split)
    }
}

@Suite struct SuperblockCodecTests {
    func sample(generation: UInt64 = 7) -> Superblock {
        var sb = Superblock(
            generation: generation, dataBlockSize: 65536, uuid: (0..<16).map { UInt8($0) }, metadataStart: 2,
            metadataBlocks: 4096, dataOffset: 17 << 20, dataBlocks: 1000, createdAt: 1_700_000_000)
        sb.spaceMapRoot = 10
        sb.volumeTableRoot = 11
        sb.nextVolumeID = 5
        sb.committedAt = 1_700_000_100
        sb.dataHighWater = 300
        return sb
    }

    @Test(arguments: [UInt64(6), 7])
    func roundTrip(generation: UInt64) throws {
        let block = Block()
        let sb = sample(generation: generation)
        sb.encode(into: block.storage)
        #expect(try Superblock.decode(block.storage, slot: generation % 2) == sb)
    }

    @Test func everyFlippedByteIsRejected() {
        let block = Block()
        sample().encode(into: block.storage)
        for offset in stride(from: 0, to: MetadataLayout.blockSize, by: 97) {
            block.storage[offset] ^= 0x10
            #expect(throws: Superblock.DecodeError.self) { try Superblock.decode(block.storage, slot: 1) }
            block.storage[offset] ^= 0x10
        }
        #expect(throws: Never.self) { try Superblock.decode(block.storage, slot: 1) }
    }

    @Test func wrongSlotAndZeroBlockAreRefused() {
        let block = Block()
        #expect(throws: Superblock.DecodeError.notAPool) { try Superblock.decode(block.storage, slot: 0) }
        sample(generation: 7).encode(into: block.storage)
        #expect(throws: Superblock.DecodeError.self) { try Superblock.decode(block.storage, slot: 0) }
    }

    @Test func badGeometryIsRefused() {
        var sb = sample()
        sb.dataBlockSize = 3000
        let block = Block()
        sb.encode(into: block.storage)
        #expect(throws: Superblock.DecodeError.self) { try Superblock.decode(block.storage, slot: 1) }
        sb = sample()
        sb.dataOffset = 4096
        sb.encode(into: block.storage)
        #expect(throws: Superblock.DecodeError.self) { try Superblock.decode(block.storage, slot: 1) }
    }
}

@Suite struct VolumeRecordCodecTests {
    @Test(arguments: ["v", "base@golden", "ünïcode-名前", String(repeating: "x", count: 255)])
    func roundTrip(name: String) throws {
        let block = Block()
        let record = VolumeRecord(
            id: 9, parentID: 3, ownerID: 2, kind: name.contains("@") ? .snapshot : .volume, name: name,
            virtualSize: 1 << 40, mappingRoot: 77, mappedBlocks: 12345, createdAt: 1_700_000_000,
            flags: name.count % 2 == 0 ? VolumeRecord.ephemeralFlag : 0, uuid: (0..<16).map { UInt8(truncatingIfNeeded: $0 * 17 + name.count) })
        record.encode(into: block.storage)
        BlockHeader.seal(block.storage, blockNumber: 50, generation: 3)
        _ = try BlockHeader.validate(block.storage, expectedType: .volumeRecord, blockNumber: 50, maxGeneration: 3)
        let decoded = try VolumeRecord.decode(block.storage)
        #expect(decoded == record)
        #expect(decoded.isEphemeral == (name.count % 2 == 0))
        // The UUID sits after the longest name, so no name reaches it.
        #expect(decoded.hasUUID && decoded.uuid[15] == UInt8(truncatingIfNeeded: 15 * 17 + name.count))
    }

    @Test func anOriginRoundTripsSetsItsFlagAndADamagedOneIsRefused() throws {
        let block = Block()
        let origin = VolumeRecord.Origin(
            kind: .nbd, locator: "nbd://golden.example:10809/golden@v3", size: 4 << 30, uuid: (0..<16).map { UInt8($0 + 1) })
        let record = VolumeRecord(id: 4, kind: .volume, name: "golden", virtualSize: 4 << 30, createdAt: 5, origin: origin)
        record.encode(into: block.storage)
        #expect(block.storage[57] == VolumeRecord.originFlag, "a build without origins refuses the record (unknown flag)")
        let decoded = try VolumeRecord.decode(block.storage)
        #expect(decoded == record && decoded.flags == 0)
        // The flag without the fields, the fields without the flag, and bad fields.
        let damages: [(Int, UInt8)] = [(512, 0), (57, 0), (512, 9), (514, 0), (515, 0xFF), (527, 0x20)]
        for (offset, value) in damages {
            record.encode(into: block.storage)
            if offset == 514 { block.storage[515] = 0 }
            block.storage[offset] = value
            #expect(throws: BlockValidationError.self, "byte \(offset) = \(value)") { try VolumeRecord.decode(block.storage) }
        }
    }

    @Test func headerValidationCatchesMisdirectionAndAge() {
        let block = Block()
        VolumeRecord(id: 1, kind: .volume, name: "v", virtualSize: 1, createdAt: 0).encode(into: block.storage)
        BlockHeader.seal(block.storage, blockNumber: 50, generation: 3)
        #expect(throws: BlockValidationError.wrongLocation(found: 50)) {
            try BlockHeader.validate(block.storage, expectedType: .volumeRecord, blockNumber: 51, maxGeneration: 3)
        }
        #expect(throws: BlockValidationError.futureGeneration(3, limit: 2)) {
            try BlockHeader.validate(block.storage, expectedType: .volumeRecord, blockNumber: 50, maxGeneration: 2)
        }
        #expect(throws: BlockValidationError.self) {
            try BlockHeader.validate(block.storage, expectedType: .mappingNode, blockNumber: 50, maxGeneration: 3)
        }
    }
}

@Suite struct NodeLayoutTests {
    @Test func insertRemoveKeepOrderAgainstArrayModel() {
        let block = Block()
        let node = NodeView.format(block.storage, type: .mappingNode, level: 0)
        var model: [(UInt64, UInt64)] = []
        var seed: UInt64 = 1
        for _ in 0..<5000 {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            let key = (seed >> 33) % 600
            let i = node.lowerBound(key)
            if i < node.count && node.key(i) == key {
                node.remove(at: i)
                model.removeAll { $0.0 == key }
            } else if !node.isFull {
                node.insert(key, key &* 3, at: i)
                model.append((key, key &* 3))
                model.sort { $0.0 < $1.0 }
            }
            #expect(node.count == model.count)
        }
        for (i, entry) in model.enumerated() {
            #expect(node.key(i) == entry.0 && node.value(i) == entry.1)
        }
        #expect(throws: Never.self) { try node.validateShape() }
    }

    @Test func moveTailAndAppendAreInverse() {
        let a = Block(), b = Block()
        let left = NodeView.format(a.storage, type: .mappingNode, level: 0)
        let right = NodeView.format(b.storage, type: .mappingNode, level: 0)
        for i in 0..<NodeView.capacity { left.insert(UInt64(i * 2), UInt64(i), at: i) }
        left.moveTail(from: 100, to: right)
        #expect(left.count == 100 && right.count == NodeView.capacity - 100 && right.key(0) == 200)
        left.append(contentsOf: right)
        #expect(left.count == NodeView.capacity && right.count == 0 && left.key(253) == 506)
    }

    @Test func childIndexFindsCoveringChild() {
        let block = Block()
        let node = NodeView.format(block.storage, type: .mappingNode, level: 1)
        for (i, k) in [10, 20, 30].enumerated() { node.insert(UInt64(k), UInt64(i), at: i) }
        #expect(node.childIndex(for: 5) == -1)
        #expect(node.childIndex(for: 10) == 0)
        #expect(node.childIndex(for: 19) == 0)
        #expect(node.childIndex(for: 20) == 1)
        #expect(node.childIndex(for: 1000) == 2)
    }

    @Test func refcountIndexPacking() {
        let packed = RefcountLayout.packIndexValue(block: 123_456_789, free: 1016)
        #expect(RefcountLayout.unpackIndexValue(packed) == (123_456_789, 1016))
    }
}
