/// A set of data block numbers, for the space map's bookkeeping within a transaction
/// (blocks reserved, freed, allocated, or shared until the commit). Every allocation
/// probes it for each candidate block, and every write's in-place check asks it once.
///
/// Open addressing with linear probing and a multiplicative (Fibonacci) hash: a lookup
/// costs a multiply, a shift and, at the load kept here (at most a half), about two
/// slot loads when the block is absent, where `Set<UInt64>` runs SipHash on every
/// lookup. The keys are block numbers the allocator chose, never values a client picks,
/// so the hash needs no per-process seed. Removal moves the later entries of its
/// cluster back instead of leaving tombstones, so lookups stay short however the set
/// churns.
///
/// Memory: 8 bytes per slot, 2-4 slots per member while it holds anything; `removeAll`
/// keeps up to `retainedSlots` slots for the next transaction and frees the rest.
public struct BlockNumberSet: Sequence {
    /// Each slot holds a block number plus one; zero marks an empty slot.
    private var slots: [UInt64] = []
    /// 64 minus log2 of the slot count: the hash's top bits index the slots.
    private var shift = 64
    public private(set) var count = 0

    /// Slots that `removeAll` keeps allocated (32 KiB): enough for a busy transaction of
    /// small writes, not the millions a deleted volume's blocks can take.
    static let retainedSlots = 4096

    public init() {}

    public var isEmpty: Bool { count == 0 }

    @inline(__always)
    private func home(_ block: UInt64) -> Int {
        Int(truncatingIfNeeded: (block &* 0x9E37_79B9_7F4A_7C15) >> UInt64(shift))
    }

    /// The slot holding `block`, or the empty slot where it would go.
    @inline(__always)
    private func slot(for block: UInt64) -> (index: Int, found: Bool) {
        let mask = slots.count - 1
        let stored = block &+ 1
        var i = home(block)
        while true {
            let value = slots[i]
            if value == stored { return (i, true) }
            if value == 0 { return (i, false) }
            i = (i + 1) & mask
        }
    }

    /// Cost: O(1) expected.
    @inline(__always)
    public func contains(_ block: UInt64) -> Bool {
        guard count > 0 else { return false }
        return slot(for: block).found
    }

    /// Adds `block`; false when it was already there. Cost: O(1) amortised.
    @discardableResult
    public mutating func insert(_ block: UInt64) -> Bool {
        precondition(block != UInt64.max, "block number out of range")
        if (count + 1) * 2 > slots.count { grow() }
        let (index, found) = slot(for: block)
        if found { return false }
        slots[index] = block &+ 1
        count += 1
        return true
    }

    /// Removes `block`; false when it was not there. Cost: O(1) expected.
    @discardableResult
    public mutating func remove(_ block: UInt64) -> Bool {
        guard count > 0 else { return false }
        var (hole, found) = slot(for: block)
        guard found else { return false }
        slots[hole] = 0
        count -= 1
        // Close the gap: an entry later in the cluster moves into the hole unless its
        // home lies cyclically after the hole (then a lookup still reaches it).
        let mask = slots.count - 1
        var next = (hole + 1) & mask
        while slots[next] != 0 {
            let entryHome = home(slots[next] &- 1)
            let stays = hole <= next ? (hole < entryHome && entryHome <= next) : (hole < entryHome || entryHome <= next)
            if !stays {
                slots[hole] = slots[next]
                slots[next] = 0
                hole = next
            }
            next = (next + 1) & mask
        }
        return true
    }

    /// Empties the set, keeping a small table's memory for reuse.
    public mutating func removeAll() {
        guard count > 0 || slots.count > Self.retainedSlots else { return }
        if slots.count <= Self.retainedSlots {
            for i in slots.indices { slots[i] = 0 }
        } else {
            slots = []
            shift = 64
        }
        count = 0
    }

    private mutating func grow() {
        let old = slots
        let newCount = Swift.max(16, old.count * 2)
        slots = Array(repeating: 0, count: newCount)
        shift = 64 - newCount.trailingZeroBitCount
        let mask = newCount - 1
        for value in old where value != 0 {
            var i = home(value &- 1)
            while slots[i] != 0 { i = (i + 1) & mask }
            slots[i] = value
        }
    }

    public struct Iterator: IteratorProtocol {
        fileprivate let slots: [UInt64]
        fileprivate var position = 0

        public mutating func next() -> UInt64? {
            while position < slots.count {
                let value = slots[position]
                position += 1
                if value != 0 { return value &- 1 }
            }
            return nil
        }
    }

    /// Members in no particular order.
    public func makeIterator() -> Iterator { Iterator(slots: slots) }

    public var underestimatedCount: Int { count }
}
