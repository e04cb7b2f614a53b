import Testing
import ThinSystem

@testable import ThinPool

/// `BlockRanges`, the known-zero hint, against a plain set.
@Suite struct BlockRangesTests {
    @Test func matchesASetUnderRandomInsertsAndRemoves() {
        var ranges = BlockRanges()
        var model = Set<UInt64>()
        var rng = SplitMix64(seed: 9)
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
