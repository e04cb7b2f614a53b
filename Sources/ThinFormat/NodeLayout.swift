/// A B-tree node: u64 keys and u64 values after the common header.
///
/// ```
///   32                keys[0..<254]   (u64 each, strictly increasing)
///   32 + 254*8 = 2064 values[0..<254] (u64 each)
/// ```
/// Leaves (level 0) map keys to values; internal nodes map the smallest key of each
/// child subtree to the child's block number. The header's count is the entry count.
public struct NodeView {
    public static let capacity = (MetadataLayout.blockSize - MetadataLayout.headerSize) / 16
    static let keysOffset = MetadataLayout.headerSize
    static let valuesOffset = MetadataLayout.headerSize + capacity * 8

    public let bytes: UnsafeMutableRawBufferPointer
    /// Keeps the memory behind `bytes` alive while the view is in use (a cached block
    /// may be evicted while a traversal still walks it).
    let owner: AnyObject?

    @inline(__always)
    public init(_ bytes: UnsafeMutableRawBufferPointer, owner: AnyObject? = nil) {
        self.bytes = bytes
        self.owner = owner
    }

    /// Starts an empty node of the given type and level.
    public static func format(_ bytes: UnsafeMutableRawBufferPointer, type: BlockType, level: UInt16) -> NodeView {
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
        bytes.setLE32(4, MetadataLayout.magic)
        bytes.setLE16(8, type.rawValue)
        bytes.setLE16(10, level)
        return NodeView(bytes)
    }

    public var count: Int {
        @inline(__always) get { Int(bytes.le32(12)) }
        nonmutating set { bytes.setLE32(12, UInt32(newValue)) }
    }

    public var level: UInt16 { bytes.le16(10) }
    public var isLeaf: Bool { level == 0 }
    public var isFull: Bool { count >= Self.capacity }

    @inline(__always) public func key(_ i: Int) -> UInt64 { bytes.le64(Self.keysOffset + i * 8) }
    @inline(__always) public func value(_ i: Int) -> UInt64 { bytes.le64(Self.valuesOffset + i * 8) }
    @inline(__always) public func setKey(_ i: Int, _ k: UInt64) { bytes.setLE64(Self.keysOffset + i * 8, k) }
    @inline(__always) public func setValue(_ i: Int, _ v: UInt64) { bytes.setLE64(Self.valuesOffset + i * 8, v) }

    /// Index of the first key >= `key` (binary search, O(log count)).
    @inline(__always)
    public func lowerBound(_ key: UInt64) -> Int {
        var low = 0
        var high = count
        while low < high {
            let mid = (low + high) >> 1
            if self.key(mid) < key { low = mid + 1 } else { high = mid }
        }
        return low
    }

    /// Index of the child whose subtree may hold `key`: the last key <= `key`, or -1.
    @inline(__always)
    public func childIndex(for key: UInt64) -> Int {
        let i = lowerBound(key)
        if i < count && self.key(i) == key { return i }
        return i - 1
    }

    /// Inserts at `index`, shifting later entries right. The node must not be full.
    public func insert(_ key: UInt64, _ value: UInt64, at index: Int) {
        let n = count
        precondition(n < Self.capacity && index <= n)
        if index < n {
            let moved = (n - index) * 8
            let base = bytes.baseAddress!
            (base + Self.keysOffset + (index + 1) * 8).copyMemory(from: base + Self.keysOffset + index * 8, byteCount: moved)
            (base + Self.valuesOffset + (index + 1) * 8).copyMemory(from: base + Self.valuesOffset + index * 8, byteCount: moved)
        }
        setKey(index, key)
        setValue(index, value)
        count = n + 1
    }

    public func remove(at index: Int) {
        let n = count
        precondition(index < n)
        if index < n - 1 {
            let moved = (n - index - 1) * 8
            let base = bytes.baseAddress!
            (base + Self.keysOffset + index * 8).copyMemory(from: base + Self.keysOffset + (index + 1) * 8, byteCount: moved)
            (base + Self.valuesOffset + index * 8).copyMemory(from: base + Self.valuesOffset + (index + 1) * 8, byteCount: moved)
        }
        count = n - 1
    }

    /// Moves entries `from..<count` to the start of the empty node `other`.
    public func moveTail(from start: Int, to other: NodeView) {
        let n = count
        precondition(other.count == 0 && start <= n)
        let moved = (n - start) * 8
        let base = bytes.baseAddress!
        let target = other.bytes.baseAddress!
        (target + Self.keysOffset).copyMemory(from: base + Self.keysOffset + start * 8, byteCount: moved)
        (target + Self.valuesOffset).copyMemory(from: base + Self.valuesOffset + start * 8, byteCount: moved)
        other.count = n - start
        count = start
    }

    /// Appends every entry of `other` (which must fit) and empties it.
    public func append(contentsOf other: NodeView) {
        let n = count
        let m = other.count
        precondition(n + m <= Self.capacity)
        let base = bytes.baseAddress!
        let source = other.bytes.baseAddress!
        (base + Self.keysOffset + n * 8).copyMemory(from: source + Self.keysOffset, byteCount: m * 8)
        (base + Self.valuesOffset + n * 8).copyMemory(from: source + Self.valuesOffset, byteCount: m * 8)
        count = n + m
        other.count = 0
    }

    /// Structural checks that need no other block: count in range, keys strictly increasing.
    public func validateShape() throws(BlockValidationError) {
        let n = count
        guard n <= Self.capacity else { throw .badContents("entry count \(n) exceeds \(Self.capacity)") }
        guard level < 32 else { throw .badContents("level \(level) is implausible") }
        var i = 1
        while i < n {
            guard key(i - 1) < key(i) else { throw .badContents("keys out of order at entry \(i)") }
            i += 1
        }
    }
}

/// A reference-count block of the data space map: the counts of `entriesPerBlock`
/// consecutive data blocks (a "group"), u32 each, after the common header. The header's
/// count field holds the group number.
public enum RefcountLayout {
    public static let entriesPerBlock = (MetadataLayout.blockSize - MetadataLayout.headerSize) / 4

    @inline(__always)
    public static func count(_ bytes: UnsafeMutableRawBufferPointer, _ index: Int) -> UInt32 {
        bytes.le32(MetadataLayout.headerSize + index * 4)
    }

    @inline(__always)
    public static func setCount(_ bytes: UnsafeMutableRawBufferPointer, _ index: Int, _ value: UInt32) {
        bytes.setLE32(MetadataLayout.headerSize + index * 4, value)
    }

    /// Space map index values pack the refcount block's number (high 48 bits) with the
    /// group's free-entry count (low 16 bits), so open never reads the refcount blocks.
    @inline(__always)
    public static func packIndexValue(block: UInt64, free: Int) -> UInt64 { block << 16 | UInt64(free) }

    @inline(__always)
    public static func unpackIndexValue(_ value: UInt64) -> (block: UInt64, free: Int) {
        (value >> 16, Int(value & 0xFFFF))
    }
}
