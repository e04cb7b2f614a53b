import Testing
import ThinMetadata
import ThinSystem

@Suite struct BlockNumberMapTests {
    @Test func agreesWithDictionaryUnderRandomUpdatesAndRemovals() {
        var generator = SplitMix64(seed: 11)
        var model: [UInt64: UInt64] = [:]
        var map = BlockNumberMap<UInt64>()
        // A narrow key range, with runs of consecutive keys as the allocator makes: the
        // clusters where removal's back-shifting must carry values with their keys.
        for step in 0..<200_000 {
            let key: UInt64 = step % 5 == 0 ? UInt64(step / 5 % 3000) : UInt64.random(in: 0..<5000, using: &generator)
            let value = UInt64(step)
            switch UInt64.random(in: 0..<3, using: &generator) {
            case 0:
                #expect(map.updateValue(value, forKey: key) == model.updateValue(value, forKey: key))
            case 1:
                let stored = map.insertIfAbsent(value, forKey: key)
                #expect(stored == (model[key] == nil))
                if stored { model[key] = value }
            default:
                #expect(map.removeValue(forKey: key) == model.removeValue(forKey: key))
            }
            if step % 997 == 0 {
                #expect(map.count == model.count)
                for probe in 0..<UInt64(5000) where map[probe] != model[probe] {
                    Issue.record("value of \(probe) differs at step \(step)")
                    return
                }
            }
        }
        var walked: [UInt64: UInt64] = [:]
        for position in 0..<map.slotCount {
            if let entry = map.entry(atSlot: position) { walked[entry.key] = entry.value }
        }
        #expect(walked == model)
    }

    @Test func holdsClassReferencesAndReleasesThemOnRemoval() {
        final class Payload {
            let number: UInt64
            init(_ number: UInt64) { self.number = number }
        }
        weak var dropped: Payload?
        var map = BlockNumberMap<Payload>()
        do {
            let payload = Payload(42)
            dropped = payload
            map.updateValue(payload, forKey: 7)
            for key in 100..<UInt64(1100) { map.updateValue(Payload(key), forKey: key) }
        }
        #expect(map[7]?.number == 42)
        #expect(dropped != nil)
        let removed = map.removeValue(forKey: 7)
        #expect(removed?.number == 42)
        _ = consume removed
        #expect(dropped == nil)
        #expect(map[7] == nil)
        #expect(map[555]?.number == 555)
        map.removeAll()
        #expect(map.isEmpty && map[555] == nil)
    }
}
