import Testing

@testable import ThinPool

/// `BlockRanges`, the known-zero hint, against a plain set.
@Suite struct BlockRangesTests {
    @Test func matchesASetUnderRandomInsertsAndRemoves() {
        var ranges = BlockRanges()
        var model = Set<UInt64>()
        var rng = SplitMixForTests(seed: 9)
        for _ in 0..<20_000 {
            if rng.next() % 3 == 0 {
                let block = rng.next() % 2000
                #expect(ranges.remove(block) == model.contains(block))
                model.remove(block)
            } else {
                let start = rng.next() % 2000
                let range = start..<start + rng.next() % 40
                ranges.insert(range)
                model.formUnion(range)
            }
        }
        for block in UInt64(0)..<2100 { #expect(ranges.contains(block) == model.contains(block), "block \(block)") }
        // Disjoint, sorted and never touching: merged as far as they can be.
        for (a, b) in zip(ranges.ranges, ranges.ranges.dropFirst()) { #expect(a.upperBound < b.lowerBound) }
    }

    @Test func staysBoundedByForgettingSmallRuns() {
        var ranges = BlockRanges(maximumRanges: 4)
        for i in UInt64(0)..<10 { ranges.insert(i * 10..<i * 10 + 1 + i) }
        #expect(ranges.ranges.count == 4)
        #expect(ranges.contains(90), "the largest runs are kept")
    }
}

struct SplitMixForTests {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
