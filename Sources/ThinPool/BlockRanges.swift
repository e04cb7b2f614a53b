/// A set of block numbers kept as sorted, disjoint, non-adjacent ranges: cheap for the
/// long runs that frees and discards produce. Bounded: past `maximumRanges` runs it
/// forgets the smallest new ones (callers use it as a hint that may only say "no").
struct BlockRanges {
    private(set) var ranges: [Range<UInt64>] = []
    let maximumRanges: Int

    init(maximumRanges: Int = 65536) {
        self.maximumRanges = maximumRanges
    }

    /// Index of the first range whose upper bound is above `block`. O(log n).
    private func firstIndex(above block: UInt64) -> Int {
        var low = 0
        var high = ranges.count
        while low < high {
            let middle = (low + high) / 2
            if ranges[middle].upperBound <= block { low = middle + 1 } else { high = middle }
        }
        return low
    }

    func contains(_ block: UInt64) -> Bool {
        let i = firstIndex(above: block)
        return i < ranges.count && ranges[i].contains(block)
    }

    /// Adds `range`, merging with neighbours it overlaps or touches. O(n) worst case.
    mutating func insert(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        var i = firstIndex(above: range.lowerBound)
        // A range ending exactly at range.lowerBound touches it.
        if i > 0 && ranges[i - 1].upperBound == range.lowerBound { i -= 1 }
        var merged = range
        var end = i
        while end < ranges.count && ranges[end].lowerBound <= merged.upperBound {
            merged = min(merged.lowerBound, ranges[end].lowerBound)..<max(merged.upperBound, ranges[end].upperBound)
            end += 1
        }
        if i < ranges.count && ranges[i].lowerBound < merged.lowerBound { merged = ranges[i].lowerBound..<merged.upperBound }
        ranges.replaceSubrange(i..<end, with: [merged])
        if ranges.count > maximumRanges {
            if let smallest = ranges.indices.min(by: { ranges[$0].count < ranges[$1].count }) { ranges.remove(at: smallest) }
        }
    }

    /// Removes `block`; returns whether it was there. O(log n), plus a split.
    @discardableResult
    mutating func remove(_ block: UInt64) -> Bool {
        let i = firstIndex(above: block)
        guard i < ranges.count, ranges[i].contains(block) else { return false }
        let range = ranges[i]
        var pieces: [Range<UInt64>] = []
        if range.lowerBound < block { pieces.append(range.lowerBound..<block) }
        if block + 1 < range.upperBound { pieces.append((block + 1)..<range.upperBound) }
        ranges.replaceSubrange(i...i, with: pieces)
        return true
    }

    mutating func removeAll() { ranges.removeAll() }
}
