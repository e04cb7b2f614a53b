/// One volume or snapshot, stored in a metadata block of its own and indexed by id in
/// the volume table B-tree.
///
/// Layout after the common 32-byte header:
/// ```
///  32  u64  volume id
///  40  u64  parent id (the volume or snapshot it was created from; 0 = none)
///  48  u64  owner id (snapshots: the volume they belong to; 0 = none or deleted)
///  56  u8   kind (0 volume, 1 snapshot)
///  57  u8   flags (bit 0: ephemeral, deleted when its server stops or next starts;
///            bit 1: receiving, the staging volume of `thinbd receive`; bit 2:
///            origin-backed, set exactly when the origin kind at 512 is; other bits 0)
///  58  u16  name length in bytes
///  60  u32  reserved
///  64  u64  virtual size in bytes
///  72  u64  mapping B-tree root (0 = nothing mapped)
///  80  u64  mapped block count
///  88  u64  creation time (Unix seconds)
///  96  ...  name, UTF-8 (a snapshot's name is "VOLUME@SNAPSHOT"), up to 255 bytes
/// 352  16   image UUID (random, version 4; all zero in records made before it existed)
/// 368  16   receiving only: UUID of the image the stream carries
/// 384  16   receiving only: UUID of the stream's base (zero for a full stream)
/// 400  u64  receiving only: image bytes below which the stream is applied and committed
/// 512  u8   origin kind (0 none, 1 NBD URI, 2 file path): where unmapped blocks come from
/// 513  u8   reserved, 0
/// 514  u16  origin locator length in bytes (at most 1024)
/// 516  u32  reserved, 0
/// 520  u64  origin size in bytes
/// 528  16   origin image UUID (a thinbd origin's snapshot UUID; zero when unknown)
/// 544  ...  origin locator, UTF-8 (the URI or the path)
/// ```
public struct VolumeRecord: Equatable, Sendable {
    public enum Kind: UInt8, Sendable {
        case volume = 0
        case snapshot = 1
    }

    public static let maxNameBytes = 255
    /// Flag bit: an ephemeral volume (`serve --ephemeral`), removed by the next server start.
    public static let ephemeralFlag: UInt8 = 1
    /// Flag bit: the staging volume of a `thinbd receive` (see `ReceiveState`).
    public static let receivingFlag: UInt8 = 2
    /// Flag bit: origin-backed (the origin fields at 512 are set). Written from `origin`,
    /// not kept in `flags`: it is there so that a build that predates origins refuses
    /// the record (an unknown flag) instead of reading the origin's blocks as zeros.
    public static let originFlag: UInt8 = 4
    public static let knownFlags = ephemeralFlag | receivingFlag

    /// Where an interrupted `thinbd receive` stands, kept in its staging volume's record
    /// and committed with the data, so `receive --resume` knows what is already there.
    public struct ReceiveState: Equatable, Sendable {
        public var imageUUID: [UInt8]
        /// Zero for a full stream.
        public var baseUUID: [UInt8]
        /// Every record of the stream below this image offset is applied and durable.
        public var appliedUpTo: UInt64

        public init(imageUUID: [UInt8], baseUUID: [UInt8], appliedUpTo: UInt64 = 0) {
            precondition(imageUUID.count == 16 && baseUUID.count == 16, "a UUID is 16 bytes")
            self.imageUUID = imageUUID
            self.baseUUID = baseUUID
            self.appliedUpTo = appliedUpTo
        }
    }

    public var id: UInt64
    public var parentID: UInt64
    public var ownerID: UInt64
    public var kind: Kind
    public var name: String
    public var virtualSize: UInt64
    public var mappingRoot: UInt64
    public var mappedBlocks: UInt64
    public var createdAt: UInt64
    public var flags: UInt8
    /// The image's identity, the same in every pool that holds a copy of it, unchanged by
    /// renames. Sixteen zero bytes: none yet (a record written before UUIDs existed).
    public var uuid: [UInt8]
    /// Set exactly when `receivingFlag` is.
    public var receive: ReceiveState?

    public static let uuidOffset = 352
    static let receiveOffset = 368
    public static let noUUID = [UInt8](repeating: 0, count: 16)

    /// An image outside the pool whose bytes an origin-backed volume's unmapped blocks
    /// hold (`thinbd clone POOL URI NAME`): fetched on first read and kept. Its identity
    /// is the locator (with an NBD export name), the size and, for a thinbd origin, the
    /// snapshot's UUID.
    public struct Origin: Hashable, Sendable {
        public enum Kind: UInt8, Sendable {
            case nbd = 1
            case file = 2
        }

        public static let maxLocatorBytes = 1024

        public var kind: Kind
        public var locator: String
        public var size: UInt64
        /// Zero when the origin does not say.
        public var uuid: [UInt8]

        public init(kind: Kind, locator: String, size: UInt64, uuid: [UInt8] = VolumeRecord.noUUID) {
            precondition(uuid.count == 16, "a UUID is 16 bytes")
            self.kind = kind
            self.locator = locator
            self.size = size
            self.uuid = uuid
        }
    }

    /// Nil for an ordinary volume.
    public var origin: Origin?
    static let originOffset = 512

    public var isEphemeral: Bool { flags & Self.ephemeralFlag != 0 }
    public var isReceiving: Bool { flags & Self.receivingFlag != 0 }
    public var hasUUID: Bool { uuid != Self.noUUID }

    public init(
        id: UInt64, parentID: UInt64 = 0, ownerID: UInt64 = 0, kind: Kind, name: String, virtualSize: UInt64,
        mappingRoot: UInt64 = 0, mappedBlocks: UInt64 = 0, createdAt: UInt64, flags: UInt8 = 0,
        uuid: [UInt8] = VolumeRecord.noUUID, receive: ReceiveState? = nil, origin: Origin? = nil
    ) {
        self.origin = origin
        precondition(uuid.count == 16, "a UUID is 16 bytes")
        precondition((receive != nil) == (flags & Self.receivingFlag != 0), "a receive state goes with the receiving flag")
        self.uuid = uuid
        self.receive = receive
        self.flags = flags
        self.id = id
        self.parentID = parentID
        self.ownerID = ownerID
        self.kind = kind
        self.name = name
        self.virtualSize = virtualSize
        self.mappingRoot = mappingRoot
        self.mappedBlocks = mappedBlocks
        self.createdAt = createdAt
    }

    /// Encodes the body; the caller seals the block (location and generation).
    public func encode(into block: UnsafeMutableRawBufferPointer) {
        block.initializeMemory(as: UInt8.self, repeating: 0)
        block.setLE16(8, BlockType.volumeRecord.rawValue)
        block.setLE64(32, id)
        block.setLE64(40, parentID)
        block.setLE64(48, ownerID)
        block[56] = kind.rawValue
        block[57] = flags | (origin == nil ? 0 : Self.originFlag)
        let utf8 = Array(name.utf8)
        precondition(utf8.count <= Self.maxNameBytes)
        block.setLE16(58, UInt16(utf8.count))
        block.setLE64(64, virtualSize)
        block.setLE64(72, mappingRoot)
        block.setLE64(80, mappedBlocks)
        block.setLE64(88, createdAt)
        for (i, byte) in utf8.enumerated() { block[96 + i] = byte }
        for (i, byte) in uuid.enumerated() { block[Self.uuidOffset + i] = byte }
        if let receive {
            for (i, byte) in (receive.imageUUID + receive.baseUUID).enumerated() { block[Self.receiveOffset + i] = byte }
            block.setLE64(Self.receiveOffset + 32, receive.appliedUpTo)
        }
        if let origin {
            let locator = Array(origin.locator.utf8)
            precondition(locator.count <= Origin.maxLocatorBytes)
            block[Self.originOffset] = origin.kind.rawValue
            block.setLE16(Self.originOffset + 2, UInt16(locator.count))
            block.setLE64(Self.originOffset + 8, origin.size)
            for (i, byte) in origin.uuid.enumerated() { block[Self.originOffset + 16 + i] = byte }
            for (i, byte) in locator.enumerated() { block[Self.originOffset + 32 + i] = byte }
        }
    }

    /// Decodes a block whose header has already been validated.
    public static func decode(_ block: UnsafeMutableRawBufferPointer) throws(BlockValidationError) -> VolumeRecord {
        guard let kind = Kind(rawValue: block[56]) else { throw .badContents("unknown volume kind \(block[56])") }
        var origin: Origin?
        if block[originOffset] != 0 {
            guard let originKind = Origin.Kind(rawValue: block[originOffset]) else {
                throw .badContents("unknown origin kind \(block[originOffset])")
            }
            let length = Int(block.le16(originOffset + 2))
            guard length > 0, length <= Origin.maxLocatorBytes, originOffset + 32 + length <= block.count,
                let locator = String(validating: (0..<length).map { block[originOffset + 32 + $0] }, as: UTF8.self)
            else { throw .badContents("origin locator of \(length) bytes is empty, too long or not UTF-8") }
            let size = block.le64(originOffset + 8)
            guard size > 0, size <= 1 << 60 else { throw .badContents("origin size \(size) is outside 1 byte ... 1 EiB") }
            origin = Origin(kind: originKind, locator: locator, size: size, uuid: (0..<16).map { block[originOffset + 16 + $0] })
        }
        guard (origin != nil) == (block[57] & originFlag != 0) else {
            throw .badContents("the origin flag and the origin fields disagree")
        }
        let length = Int(block.le16(58))
        guard length > 0, length <= maxNameBytes else { throw .badContents("volume name length \(length)") }
        let bytes = (0..<length).map { block[96 + $0] }
        guard let name = String(validating: bytes, as: UTF8.self) else {
            throw .badContents("volume name is not UTF-8")
        }
        return VolumeRecord(
            id: block.le64(32), parentID: block.le64(40), ownerID: block.le64(48), kind: kind, name: name,
            virtualSize: block.le64(64), mappingRoot: block.le64(72), mappedBlocks: block.le64(80),
            createdAt: block.le64(88), flags: block[57] & ~originFlag, uuid: (0..<16).map { block[uuidOffset + $0] },
            receive: block[57] & receivingFlag == 0
                ? nil
                : ReceiveState(
                    imageUUID: (0..<16).map { block[receiveOffset + $0] }, baseUUID: (16..<32).map { block[receiveOffset + $0] },
                    appliedUpTo: block.le64(receiveOffset + 32)),
            origin: origin)
    }
}
