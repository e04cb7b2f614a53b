/// Facts shared by every metadata block.
public enum MetadataLayout {
    /// Metadata blocks are 4 KiB whatever the data block size.
    public static let blockSize = 4096
    public static let headerSize = 32
    /// "TBD1" little-endian: every metadata block starts its header with it (after the CRC).
    public static let magic: UInt32 = 0x3144_4254
    /// Superblock slots are metadata blocks 0 and 1.
    public static let superblockSlots: [UInt64] = [0, 1]
}

/// The kind of a metadata block, stored in its header so a misdirected pointer is caught.
public enum BlockType: UInt16, Sendable, CustomStringConvertible {
    case superblock = 1
    case mappingNode = 2
    case volumeTableNode = 3
    case spaceMapIndexNode = 4
    case refcounts = 5
    case volumeRecord = 6

    public var description: String {
        switch self {
        case .superblock: "superblock"
        case .mappingNode: "mapping B-tree node"
        case .volumeTableNode: "volume table node"
        case .spaceMapIndexNode: "space map index node"
        case .refcounts: "reference count block"
        case .volumeRecord: "volume record"
        }
    }
}

/// Why a metadata block was refused.
public enum BlockValidationError: Error, Equatable, Sendable, CustomStringConvertible {
    case badChecksum(stored: UInt32, computed: UInt32)
    case badMagic(UInt32)
    case wrongType(expected: BlockType, found: UInt16)
    case wrongLocation(found: UInt64)
    case futureGeneration(UInt64, limit: UInt64)
    case badContents(String)

    public var description: String {
        switch self {
        case .badChecksum(let stored, let computed):
            "checksum mismatch (stored \(hex(stored)), computed \(hex(computed)))"
        case .badMagic(let magic): "bad magic \(hex(magic))"
        case .wrongType(let expected, let found): "expected a \(expected), found block type \(found)"
        case .wrongLocation(let found): "block claims to be block \(found)"
        case .futureGeneration(let generation, let limit):
            "written by generation \(generation), newer than the pool's \(limit)"
        case .badContents(let why): why
        }
    }
}

func hex(_ value: UInt32) -> String { "0x" + String(value, radix: 16) }

/// The 32-byte header at the start of every metadata block:
///
/// ```
///  0  u32 crc32c of bytes 4..<4096
///  4  u32 magic "TBD1"
///  8  u16 block type
/// 10  u16 level (B-tree nodes: 0 = leaf)
/// 12  u32 entry count
/// 16  u64 this block's own number
/// 24  u64 generation of the transaction that wrote it
/// ```
public struct BlockHeader: Equatable, Sendable {
    public var type: BlockType
    public var level: UInt16
    public var count: UInt32
    public var blockNumber: UInt64
    public var generation: UInt64

    public init(type: BlockType, level: UInt16 = 0, count: UInt32 = 0, blockNumber: UInt64, generation: UInt64) {
        self.type = type
        self.level = level
        self.count = count
        self.blockNumber = blockNumber
        self.generation = generation
    }

    /// Writes the header fields (not the checksum).
    public func encode(into block: UnsafeMutableRawBufferPointer) {
        block.setLE32(4, MetadataLayout.magic)
        block.setLE16(8, type.rawValue)
        block.setLE16(10, level)
        block.setLE32(12, count)
        block.setLE64(16, blockNumber)
        block.setLE64(24, generation)
    }

    /// Stamps location and generation, then seals the block with its checksum.
    /// Cost: one CRC32C over 4 KiB.
    public static func seal(_ block: UnsafeMutableRawBufferPointer, blockNumber: UInt64, generation: UInt64) {
        block.setLE32(4, MetadataLayout.magic)
        block.setLE64(16, blockNumber)
        block.setLE64(24, generation)
        block.setLE32(0, CRC32C.checksum(UnsafeRawBufferPointer(rebasing: block[4..<block.count])))
    }

    /// Validates checksum, magic, type, location and generation, and decodes the header.
    public static func validate(
        _ block: UnsafeMutableRawBufferPointer, expectedType: BlockType, blockNumber: UInt64, maxGeneration: UInt64
    ) throws(BlockValidationError) -> BlockHeader {
        let stored = block.le32(0)
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: block[4..<block.count]))
        guard stored == computed else { throw .badChecksum(stored: stored, computed: computed) }
        let magic = block.le32(4)
        guard magic == MetadataLayout.magic else { throw .badMagic(magic) }
        let rawType = block.le16(8)
        guard rawType == expectedType.rawValue else { throw .wrongType(expected: expectedType, found: rawType) }
        let location = block.le64(16)
        guard location == blockNumber else { throw .wrongLocation(found: location) }
        let generation = block.le64(24)
        guard generation <= maxGeneration else { throw .futureGeneration(generation, limit: maxGeneration) }
        return BlockHeader(
            type: expectedType, level: block.le16(10), count: block.le32(12),
            blockNumber: location, generation: generation)
    }
}
