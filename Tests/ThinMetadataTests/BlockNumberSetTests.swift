import Testing
import ThinMetadata
import ThinSystem

@Suite struct BlockNumberSetTests {
    @Test func agreesWithSetUnderRandomInsertsAndRemovals() {
        var generator = SplitMix64(seed: 7)
        var model = Set<UInt64>()
        var set = BlockNumberSet()
        // Keys from a narrow range collide and cluster, which is where removal's
        // back-shifting can go wrong; some runs of consecutive keys, as the allocator makes.
        for step in 0..<200_000 {
            let key: UInt64 = step % 5 == 0 ? UInt64(step / 5 % 3000) : UInt64.random(in: 0..<5000, using: &generator)
            if Bool.random(using: &generator) {
                let inserted = set.insert(key)
                #expect(inserted == model.insert(key).inserted)
            } else {
                let removed = set.remove(key)
                #expect(removed == (model.remove(key) != nil))
            }
            if step % 997 == 0 {
                #expect(set.count == model.count)
                for probe in 0..<UInt64(5000) where set.contains(probe) != model.contains(probe) {
                    Issue.record("membership of \(probe) differs at step \(step)")
                    return
                }
            }
        }
        #expect(Set(set) == model)
        #expect(set.count == model.count)
    }

    @Test func emptiedByRemovalOneByOne() {
        var set = BlockNumberSet()
        let keys = (0..<UInt64(10_000)).map { $0 &* 7919 }
        for key in keys { set.insert(key) }
        #expect(set.count == keys.count)
        for key in keys.reversed() {
            let removed = set.remove(key)
            #expect(removed)
        }
        #expect(set.isEmpty)
        #expect(!set.contains(0))
        #expect(Array(set).isEmpty)
    }

    @Test func largeBlockNumbersAndZero() {
        var set = BlockNumberSet()
        let keys: [UInt64] = [0, 1, UInt64.max - 1, 1 << 48, (1 << 48) + 1]
        let inserted = keys.map { set.insert($0) }
        #expect(inserted == [true, true, true, true, true])
        let insertedAgain = set.insert(0)
        #expect(!insertedAgain)
        #expect(set.contains(UInt64.max - 1))
        #expect(!set.contains(2))
        let removed = set.remove(1 << 48)
        #expect(removed)
        #expect(set.contains((1 << 48) + 1))
        #expect(Set(set) == [0, 1, UInt64.max - 1, (1 << 48) + 1])
        // `UInt64.max` would be stored as the empty mark: never a member, and removing
        // it changes nothing.
        #expect(!set.contains(UInt64.max))
        let removedMax = set.remove(UInt64.max)
        #expect(!removedMax && set.count == 4)
        #expect(Set(set) == [0, 1, UInt64.max - 1, (1 << 48) + 1])
    }

    @Test func removeAllEmptiesSmallAndLargeTables() {
        var set = BlockNumberSet()
        for key in 0..<UInt64(100) { set.insert(key) }
        set.removeAll()
        #expect(set.isEmpty && !set.contains(5))
        set.insert(5)
        #expect(set.contains(5) && set.count == 1)
        for key in 0..<UInt64(50_000) { set.insert(key * 3) }
        set.removeAll()
        #expect(set.isEmpty && !set.contains(3))
        let insertedAfterwards = set.insert(3)
        #expect(insertedAfterwards && set.contains(3))
    }
}
