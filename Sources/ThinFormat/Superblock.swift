/// The pool's root record, kept in two slots (metadata blocks 0 and 1). Generation `g`
/// is written to slot `g % 2`, so a torn superblock write never destroys the previous
/// commit; open takes the newest slot that validates.
///
/// Layout after the common 32-byte header (all little-endian):
/// ```
///  32  8 bytes  signature "THINBDPL"
///  40  u32      format version
///  44  u32      metadata block size (4096)
///  48  u32      data block size
///  52  u32      flags (bit 0: needs check, set when damage was found while the pool
///               was open read-write; other bits reserved, 0)
///  56  16 bytes pool UUID
///  72  u64      first metadata block (the metadata region starts here)
///  80  u64      metadata block count (region length, in 4 KiB blocks)
///  88  u64      byte offset of data block 0
///  96  u64      data block count
/// 104  u64      space map index root (0 = empty)
/// 112  u64      volume table root (0 = empty)
/// 120  u64      next volume id
/// 128  u64      creation time (Unix seconds)
/// 136  u64      commit time (Unix seconds)
/// 144  u64      data high-water mark: data blocks at or above it were never written
/// ```
public struct Superblock: Equatable, Sendable {
    public static let signature: [UInt8] = Array("THINBDPL".utf8)
    public static let formatVersion: UInt32 = 1

    public var generation: UInt64
    public var formatVersion: UInt32 = Superblock.formatVersion
    public var dataBlockSize: UInt32
    public var flags: UInt32 = 0

    /// Flag: damage was found while the pool was open, so it stopped committing. A
    /// read-write open refuses the pool (unless forced) until `check --repair` clears it.
    public static let needsCheckFlag: UInt32 = 1

    public var needsCheck: Bool {
        get { flags & Self.needsCheckFlag != 0 }
        set { flags = newValue ? flags | Self.needsCheckFlag : flags & ~Self.needsCheckFlag }
    }
    public var uuid: [UInt8]
    public var metadataStart: UInt64
    public var metadataBlocks: UInt64
    public var dataOffset: UInt64
    public var dataBlocks: UInt64
    public var spaceMapRoot: UInt64 = 0
    public var volumeTableRoot: UInt64 = 0
    public var nextVolumeID: UInt64 = 1
    public var createdAt: UInt64
    public var committedAt: UInt64
    public var dataHighWater: UInt64 = 0

    public init(
        generation: UInt64, dataBlockSize: UInt32, uuid: [UInt8], metadataStart: UInt64, metadataBlocks: UInt64,
        dataOffset: UInt64, dataBlocks: UInt64, createdAt: UInt64
    ) {
        self.generation = generation
        self.dataBlockSize = dataBlockSize
        self.uuid = uuid
        self.metadataStart = metadataStart
        self.metadataBlocks = metadataBlocks
        self.dataOffset = dataOffset
        self.dataBlocks = dataBlocks
        self.createdAt = createdAt
        self.committedAt = createdAt
    }

    /// Total bytes the pool file must have to hold every region.
    public var fileSize: UInt64 { dataOffset + dataBlocks * UInt64(dataBlockSize) }

    /// The slot this generation is written to.
    public var slot: UInt64 { generation % 2 }

    /// Encodes into a zeroed 4 KiB block and seals it.
    public func encode(into block: UnsafeMutableRawBufferPointer) {
        precondition(block.count == MetadataLayout.blockSize)
        block.initializeMemory(as: UInt8.self, repeating: 0)
        BlockHeader(type: .superblock, blockNumber: slot, generation: generation).encode(into: block)
        for (i, byte) in Self.signature.enumerated() { block[32 + i] = byte }
        block.setLE32(40, formatVersion)
        block.setLE32(44, UInt32(MetadataLayout.blockSize))
        block.setLE32(48, dataBlockSize)
        block.setLE32(52, flags)
        for i in 0..<16 { block[56 + i] = i < uuid.count ? uuid[i] : 0 }
        block.setLE64(72, metadataStart)
        block.setLE64(80, metadataBlocks)
        block.setLE64(88, dataOffset)
        block.setLE64(96, dataBlocks)
        block.setLE64(104, spaceMapRoot)
        block.setLE64(112, volumeTableRoot)
        block.setLE64(120, nextVolumeID)
        block.setLE64(128, createdAt)
        block.setLE64(136, committedAt)
        block.setLE64(144, dataHighWater)
        BlockHeader.seal(block, blockNumber: slot, generation: generation)
    }

    public enum DecodeError: Error, Equatable, Sendable, CustomStringConvertible {
        /// The block does not carry the thinbd signature at all.
        case notAPool
        case invalid(BlockValidationError)
        case unsupportedVersion(UInt32)
        case inconsistent(String)

        public var description: String {
            switch self {
            case .notAPool: "no thinbd signature"
            case .invalid(let why): "\(why)"
            case .unsupportedVersion(let v): "format version \(v) is not supported (this build reads \(Superblock.formatVersion))"
            case .inconsistent(let why): why
            }
        }
    }

    /// Decodes and validates the superblock held in `slot`.
    public static func decode(_ block: UnsafeMutableRawBufferPointer, slot: UInt64) throws(DecodeError) -> Superblock {
        guard block.count == MetadataLayout.blockSize else { throw .notAPool }
        let signature = (0..<8).map { block[32 + $0] }
        guard signature == Self.signature, block.le32(4) == MetadataLayout.magic else { throw .notAPool }
        let header: BlockHeader
        do {
            header = try BlockHeader.validate(block, expectedType: .superblock, blockNumber: slot, maxGeneration: .max)
        } catch {
            throw .invalid(error)
        }
        let version = block.le32(40)
        guard version == Self.formatVersion else { throw .unsupportedVersion(version) }
        guard block.le32(44) == UInt32(MetadataLayout.blockSize) else {
            throw .inconsistent("metadata block size \(block.le32(44)) is not 4096")
        }
        var sb = Superblock(
            generation: header.generation, dataBlockSize: block.le32(48), uuid: (0..<16).map { block[56 + $0] },
            metadataStart: block.le64(72), metadataBlocks: block.le64(80), dataOffset: block.le64(88),
            dataBlocks: block.le64(96), createdAt: block.le64(128))
        sb.flags = block.le32(52)
        sb.spaceMapRoot = block.le64(104)
        sb.volumeTableRoot = block.le64(112)
        sb.nextVolumeID = block.le64(120)
        sb.committedAt = block.le64(136)
        sb.dataHighWater = block.le64(144)
        try sb.checkGeometry()
        return sb
    }

    /// Rejects geometry that would make later arithmetic overflow or overlap regions.
    public func checkGeometry() throws(DecodeError) {
        let bs = UInt64(dataBlockSize)
        guard bs >= 4096, bs <= 1 << 20, bs & (bs - 1) == 0 else {
            throw .inconsistent("data block size \(dataBlockSize) is not a power of two between 4 KiB and 1 MiB")
        }
        // Every bound below keeps the sums and products that follow (region ends, byte
        // offsets, the file size) far from 2^64: nothing read here can make them trap.
        let limit: UInt64 = 1 << 60
        guard metadataStart >= 2, metadataStart < 1 << 40, metadataBlocks >= 16, metadataBlocks < 1 << 40 else {
            throw .inconsistent("metadata region (\(metadataStart), \(metadataBlocks) blocks) is invalid")
        }
        let metadataEnd = (metadataStart + metadataBlocks) * UInt64(MetadataLayout.blockSize)
        guard dataOffset >= metadataEnd, dataOffset < limit, dataOffset % bs == 0 else {
            throw .inconsistent("data region at \(dataOffset) overlaps metadata, is misaligned or is too far out")
        }
        let dataBytes = dataBlocks.multipliedReportingOverflow(by: bs)
        guard !dataBytes.overflow, dataBytes.partialValue < limit else {
            throw .inconsistent("data block count \(dataBlocks) is too large")
        }
        guard generation < limit else { throw .inconsistent("generation \(generation) is out of range") }
        guard nextVolumeID >= 1, nextVolumeID < limit else {
            throw .inconsistent("next volume id \(nextVolumeID) is out of range")
        }
        guard dataHighWater <= dataBlocks else {
            throw .inconsistent("high-water mark \(dataHighWater) beyond \(dataBlocks) data blocks")
        }
        func inRegion(_ block: UInt64) -> Bool {
            block == 0 || (block >= metadataStart && block < metadataStart + metadataBlocks)
        }
        guard inRegion(spaceMapRoot), inRegion(volumeTableRoot) else {
            throw .inconsistent("a root points outside the metadata region")
        }
    }
}
