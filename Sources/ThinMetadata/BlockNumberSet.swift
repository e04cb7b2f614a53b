/// A set of data block numbers, for the space map's bookkeeping within a transaction
/// (blocks reserved, freed, allocated, or shared until the commit). Every allocation
/// probes it for each candidate block, and every write's in-place check asks it once.
///
/// A `BlockNumberMap` without values: the same costs (a lookup is a multiply, a shift
/// and about two slot loads, where `Set<UInt64>` runs SipHash), and its memory is 9
/// bytes per slot, 2-4 slots per member while it holds anything; `removeAll` keeps a
/// small table for the next transaction and frees a large one.
public struct BlockNumberSet: Sequence {
    private var map = BlockNumberMap<Void>()

    public init() {}

    public var count: Int { map.count }
    public var isEmpty: Bool { map.isEmpty }

    /// Cost: O(1) expected.
    @inline(__always)
    public func contains(_ block: UInt64) -> Bool { map.contains(block) }

    /// Adds `block`; false when it was already there. Cost: O(1) amortised.
    @discardableResult
    public mutating func insert(_ block: UInt64) -> Bool { map.insertIfAbsent((), forKey: block) }

    /// Removes `block`; false when it was not there. Cost: O(1) expected.
    @discardableResult
    public mutating func remove(_ block: UInt64) -> Bool { map.removeValue(forKey: block) != nil }

    /// Empties the set, keeping a small table's memory for reuse.
    public mutating func removeAll() { map.removeAll() }

    public struct Iterator: IteratorProtocol {
        fileprivate let map: BlockNumberMap<Void>
        fileprivate var position = 0

        public mutating func next() -> UInt64? {
            while position < map.slotCount {
                let entry = map.entry(atSlot: position)
                position += 1
                if let entry { return entry.key }
            }
            return nil
        }
    }

    /// Members in no particular order.
    public func makeIterator() -> Iterator { Iterator(map: map) }

    public var underestimatedCount: Int { map.count }
}
