/// A map keyed by block numbers: the metadata cache's index, and the storage of
/// `BlockNumberSet`.
///
/// Open addressing with linear probing and a multiplicative (Fibonacci) hash: a lookup
/// costs a multiply, a shift and, at the load kept here (at most a half), about two
/// slot loads, where `Dictionary<UInt64, _>` runs SipHash on every lookup (about 90
/// instructions, and 190 with its probe; docs/performance.md). The keys are block
/// numbers the pool allocated, from a bounded range, never values a client picks, so the
/// hash needs no per-process seed. Removal moves the later entries of its cluster back
/// instead of leaving tombstones, so lookups stay short however the map churns.
///
/// Memory: per slot 8 bytes plus `MemoryLayout<Value?>.stride`, 2-4 slots per entry
/// while it holds anything; `removeAll` keeps up to `retainedSlots` slots for reuse and
/// frees the rest. Not thread-safe (a value type: its owner's lock guards it).
///
/// The lookups are `@inlinable`, so that other modules (the pool's volume catalog)
/// get them specialized for their value type instead of calling generic code.
public struct BlockNumberMap<Value> {
    /// Each slot holds a key plus one; zero marks an empty slot.
    @usableFromInline var keys: [UInt64] = []
    @usableFromInline var values: [Value?] = []
    /// 64 minus log2 of the slot count: the hash's top bits index the slots.
    @usableFromInline var shift = 64
    public internal(set) var count = 0

    /// Slots that `removeAll` keeps allocated: enough for a busy transaction of small
    /// writes, not the millions a deleted volume's blocks can take.
    static var retainedSlots: Int { 4096 }

    public init() {}

    public var isEmpty: Bool { count == 0 }

    @inlinable @inline(__always)
    func home(_ key: UInt64) -> Int {
        Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> UInt64(shift))
    }

    /// The slot holding `key`, or the empty slot where it would go.
    @inlinable @inline(__always)
    func slot(for key: UInt64) -> (index: Int, found: Bool) {
        let mask = keys.count - 1
        let stored = key &+ 1
        var i = home(key)
        while true {
            let value = keys[i]
            if value == stored { return (i, true) }
            if value == 0 { return (i, false) }
            i = (i + 1) & mask
        }
    }

    /// Cost: O(1) expected.
    @inlinable @inline(__always)
    public func contains(_ key: UInt64) -> Bool {
        // `UInt64.max` is stored as 0, the empty mark: never a member.
        guard count > 0, key != UInt64.max else { return false }
        return slot(for: key).found
    }

    /// The value for `key`, or nil. Cost: O(1) expected.
    @inlinable @inline(__always)
    public subscript(_ key: UInt64) -> Value? {
        guard count > 0, key != UInt64.max else { return nil }
        let (index, found) = slot(for: key)
        return found ? values[index] : nil
    }

    /// Stores `value` for `key`; returns the value it replaced, if any.
    /// `key` must not be `UInt64.max`. Cost: O(1) amortised.
    @discardableResult
    public mutating func updateValue(_ value: Value, forKey key: UInt64) -> Value? {
        precondition(key != UInt64.max, "block number out of range")
        if (count + 1) * 2 > keys.count { grow() }
        let (index, found) = slot(for: key)
        if found {
            let old = values[index]
            values[index] = value
            return old
        }
        keys[index] = key &+ 1
        values[index] = value
        count += 1
        return nil
    }

    /// Stores `value` for `key` unless it already has one; true when it stored.
    @discardableResult
    public mutating func insertIfAbsent(_ value: Value, forKey key: UInt64) -> Bool {
        precondition(key != UInt64.max, "block number out of range")
        if (count + 1) * 2 > keys.count { grow() }
        let (index, found) = slot(for: key)
        if found { return false }
        keys[index] = key &+ 1
        values[index] = value
        count += 1
        return true
    }

    /// Removes `key`; returns its value, or nil when it was not there. Cost: O(1) expected.
    @discardableResult
    public mutating func removeValue(forKey key: UInt64) -> Value? {
        guard count > 0, key != UInt64.max else { return nil }
        var (hole, found) = slot(for: key)
        guard found else { return nil }
        let removed = values[hole]
        keys[hole] = 0
        values[hole] = nil
        count -= 1
        // Close the gap: an entry later in the cluster moves into the hole unless its
        // home lies cyclically after the hole (then a lookup still reaches it).
        let mask = keys.count - 1
        var next = (hole + 1) & mask
        while keys[next] != 0 {
            let entryHome = home(keys[next] &- 1)
            let stays = hole <= next ? (hole < entryHome && entryHome <= next) : (hole < entryHome || entryHome <= next)
            if !stays {
                keys[hole] = keys[next]
                values[hole] = values[next]
                keys[next] = 0
                values[next] = nil
                hole = next
            }
            next = (next + 1) & mask
        }
        return removed
    }

    /// Empties the map, keeping a small table's memory for reuse.
    public mutating func removeAll() {
        guard count > 0 || keys.count > Self.retainedSlots else { return }
        if keys.count <= Self.retainedSlots {
            for i in keys.indices where keys[i] != 0 {
                keys[i] = 0
                values[i] = nil
            }
        } else {
            keys = []
            values = []
            shift = 64
        }
        count = 0
    }

    private mutating func grow() {
        let oldKeys = keys
        var oldValues = values
        let newCount = Swift.max(16, oldKeys.count * 2)
        keys = Array(repeating: 0, count: newCount)
        values = Array(repeating: nil, count: newCount)
        shift = 64 - newCount.trailingZeroBitCount
        let mask = newCount - 1
        for j in oldKeys.indices where oldKeys[j] != 0 {
            var i = home(oldKeys[j] &- 1)
            while keys[i] != 0 { i = (i + 1) & mask }
            keys[i] = oldKeys[j]
            values[i] = oldValues[j].take()
        }
    }

    // MARK: Walking the slots

    /// The number of slots: positions for `entry(atSlot:)`.
    public var slotCount: Int { keys.count }

    /// The entry in slot `position` (`0 ..< slotCount`), or nil for an empty slot. Slots
    /// are in no particular order; a walk from any position visits every entry once as
    /// long as the map does not change meanwhile.
    public func entry(atSlot position: Int) -> (key: UInt64, value: Value)? {
        let stored = keys[position]
        guard stored != 0, let value = values[position] else { return nil }
        return (stored &- 1, value)
    }
}
