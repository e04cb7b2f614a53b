import Foundation
import Testing
import TestSupport
import ThinPool

/// `thinbd send` and `receive` between two pools nobody serves, through real pipes.
@Suite(.serialized) struct SendReceiveTests {
    let dir = TemporaryDirectory()
    var source: String { dir.path + "/a.pool" }
    var destination: String { dir.path + "/b.pool" }

    /// Pool A: volume `vm` of `size` bytes with snapshots s0 (random data with holes)
    /// and s1...s`rounds`, each after random writes, trims and zeroes (and a resize).
    func makeSource(size: UInt64 = 24 << 20, rounds: Int = 3, seed: UInt64 = 7) throws {
        for pool in [source, destination] { #expect(try CLI.run(["create", pool, "--size", "1G", "--block-size", "64K"]).status == 0) }
        let pool = try Pool.open(path: source)
        _ = try pool.createVolume("vm", size: size)
        let id = try pool.volumeID("vm")
        var rng = seed
        func next() -> UInt64 {
            rng = rng &* 6364136223846793005 &+ 1442695040888963407
            return rng >> 11
        }
        func scribble(_ count: Int, in size: UInt64) throws {
            for _ in 0..<count {
                let offset = next() % size
                let length = min(size - offset, 1 + next() % (600 << 10))
                switch next() % 5 {
                case 0: try pool.trim(id, at: offset, count: length)
                case 1: try pool.writeZeroes(id, at: offset, count: length, mayUnmap: next() % 2 == 0)
                default:
                    let byte = UInt8(truncatingIfNeeded: next())
                    try [UInt8](repeating: byte, count: Int(length)).withUnsafeBytes { try pool.write(id, at: offset, from: $0) }
                }
            }
        }
        try scribble(40, in: size)
        _ = try pool.snapshot("vm@s0")
        var current = size
        for round in 1...rounds {
            if round == 2 {
                current += 4 << 20
                try pool.resize("vm", to: current)
            }
            try scribble(12, in: current)
            _ = try pool.snapshot("vm@s\(round)")
        }
        try pool.close()
    }

    func sh(_ script: String) throws -> CLI.Result {
        try Program.run("/bin/sh", ["-c", script], environment: ["T": CLI.executable, "A": source, "B": destination, "D": dir.path])
    }

    /// Every byte and the mapped/unmapped layout of `name` in both pools.
    func expectSameImage(_ name: String, sourceName: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let a = try Pool.open(path: source, readOnly: true)
        let b = try Pool.open(path: destination, readOnly: true)
        defer {
            try? a.close()
            try? b.close()
        }
        let (left, right) = (try a.volumeInfo(sourceName ?? name), try b.volumeInfo(name))
        #expect(left.size == right.size, "\(name): sizes", sourceLocation: sourceLocation)
        if left.kind == .snapshot && right.kind == .snapshot {
            #expect(left.uuid == right.uuid, "\(name): the received snapshot keeps the sender's UUID", sourceLocation: sourceLocation)
        }
        var bytesA = [UInt8](repeating: 1, count: Int(left.size))
        var bytesB = [UInt8](repeating: 2, count: Int(right.size))
        try bytesA.withUnsafeMutableBytes { _ = try a.read(left.id, at: 0, into: $0) }
        try bytesB.withUnsafeMutableBytes { _ = try b.read(right.id, at: 0, into: $0) }
        #expect(bytesA == bytesB, "\(name): contents differ", sourceLocation: sourceLocation)
        // Holes stay holes and allocated zeros stay allocated: the same layout.
        let mappedA = try a.extents(left.id, at: 0, count: left.size)
        let mappedB = try b.extents(right.id, at: 0, count: right.size)
        #expect(mappedA == mappedB, "\(name): the allocation differs", sourceLocation: sourceLocation)
    }

    func volumes(_ pool: String) throws -> [String] {
        let list = try CLI.run(["volume", "list", pool, "--json"])
        let parsed = try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]] ?? []
        return parsed.compactMap { $0["name"] as? String }.sorted()
    }

    @Test func aFullStreamAndThreeIncrementalsThroughPipesGiveTheSameImages() throws {
        try makeSource()
        let full = try sh(#""$T" send "$A" vm@s0 | "$T" receive "$B""#)
        #expect(full.status == 0, "\(full.stderr)")
        #expect(full.stdout.contains("received vm@s0 (full)"), "\(full.stdout)")
        try expectSameImage("vm@s0")
        var streamSizes: [Int] = []
        for round in 1...3 {
            let result = try sh(#""$T" send "$A" vm@s\#(round) --from vm@s\#(round - 1) -o "$D/inc\#(round)" && "$T" receive "$B" < "$D/inc\#(round)""#)
            #expect(result.status == 0, "round \(round): \(result.stderr)")
            try expectSameImage("vm@s\(round)")
            streamSizes.append((try FileManager.default.attributesOfItem(atPath: dir.path + "/inc\(round)")[.size] as? Int) ?? -1)
        }
        // The live volume follows the last received snapshot.
        try expectSameImage("vm", sourceName: "vm@s3")
        #expect(try volumes(destination) == ["vm", "vm@s0", "vm@s1", "vm@s2", "vm@s3"])
        let check = try CLI.run(["check", destination])
        #expect(check.status == 0 && check.stdout.contains("clean"), "\(check.stdout)")
        // Each incremental carries about what changed, not the 24 MiB image.
        let diff = try CLI.run(["diff", source, "vm@s0", "vm@s1", "--json"])
        let changed = (try JSONSerialization.jsonObject(with: Data(diff.stdout.utf8)) as? [String: Any])?["changed_bytes"] as? Int ?? 0
        #expect(streamSizes[0] <= changed + (1 << 20) && changed > 0, "stream \(streamSizes[0]) bytes for \(changed) changed")
        // NAME written after its copy of the base: refused, unless --force replaces the writes.
        do {
            let pool = try Pool.open(path: destination)
            try [UInt8](repeating: 0xEE, count: 4096).withUnsafeBytes { try pool.write(try pool.volumeID("vm"), at: 0, from: $0) }
            try pool.close()
        }
        #expect(try sh(#""$T" send "$A" vm --from vm@s3 -o "$D/live" 2>&1"#).stdout.contains("send takes a snapshot"))
        let a = try Pool.open(path: source)
        _ = try a.snapshot("vm@s4")
        try a.close()
        #expect(try sh(#""$T" send "$A" vm@s4 --from vm@s3 -o "$D/inc4""#).status == 0)
        let written = try CLI.run(["receive", destination, "-i", dir.path + "/inc4"])
        #expect(written.status == 1 && written.stderr.contains("was written after vm@s3"), "\(written.stderr)")
        #expect(try volumes(destination) == ["vm", "vm@s0", "vm@s1", "vm@s2", "vm@s3"])
        #expect(try CLI.run(["receive", destination, "-i", dir.path + "/inc4", "--force"]).status == 0)
        try expectSameImage("vm@s4")
        try expectSameImage("vm", sourceName: "vm@s4")
        // JSON results say what was sent and received.
        let json = try sh(#""$T" send "$A" vm@s1 --from vm@s0 --json 2>"$D/summary" >/dev/null; cat "$D/summary""#)
        #expect(json.stdout.contains("\"base_uuid\"") && json.stdout.contains("\"stream_bytes\""), "\(json.stdout)")
    }

    /// A stream that is cut, corrupt, from an unknown base, or not a stream is refused
    /// with a message that says so and where, and the pool is as it was.
    @Test func badStreamsAreRefusedAndLeaveNothingBehind() throws {
        try makeSource()
        #expect(try sh(#""$T" send "$A" vm@s0 -o "$D/full" && "$T" send "$A" vm@s2 --from vm@s1 -o "$D/inc""#).status == 0)
        let stream = try Data(contentsOf: URL(fileURLWithPath: dir.path + "/full"))
        func attempt(_ bytes: Data, _ arguments: [String] = []) throws -> CLI.Result {
            try bytes.write(to: URL(fileURLWithPath: dir.path + "/bad"))
            return try CLI.run(["receive", destination, "-i", dir.path + "/bad"] + arguments)
        }
        var flipped = stream
        flipped[stream.count / 2] ^= 0x01
        let cases: [(String, Data, String)] = [
            ("truncated", stream.prefix(stream.count * 2 / 3), "ends early"),
            ("flipped byte", flipped, "fails its checksum"),
            ("not a stream", Data("QFI\u{fb} this is a qcow2 file, honest".utf8), "not a thinbd send stream"),
            ("empty", Data(), "ends early"),
        ]
        for (what, bytes, message) in cases {
            let result = try attempt(bytes)
            #expect(result.status == 1 && result.stderr.contains(message), "\(what): \(result.stderr)")
            #expect(result.stderr.contains("nothing was received") || what == "not a stream" || what == "empty", "\(what): \(result.stderr)")
            #expect(try volumes(destination).isEmpty, "\(what) left something behind")
        }
        // The corrupt record is named by its place in the stream.
        #expect(try attempt(flipped).stderr.contains("at byte"))
        // An incremental stream whose base this pool lacks names both.
        let wrongBase = try CLI.run(["receive", destination, "-i", dir.path + "/inc"])
        #expect(wrongBase.status == 1 && wrongBase.stderr.contains("vm@s1"), "\(wrongBase.stderr)")
        #expect(try volumes(destination).isEmpty)
        // With a different image under the base's name, the UUIDs tell them apart.
        #expect(try CLI.run(["volume", "create", destination, "vm", "--size", "24M"]).status == 0)
        #expect(try CLI.run(["snapshot", destination, "vm@s1"]).status == 0)
        let impostor = try CLI.run(["receive", destination, "-i", dir.path + "/inc"])
        #expect(impostor.status == 1 && impostor.stderr.contains("not the stream's base vm@s1"), "\(impostor.stderr)")
        #expect(try volumes(destination) == ["vm", "vm@s1"])
        // A full stream does not overwrite an existing volume.
        let exists = try CLI.run(["receive", destination, "-i", dir.path + "/full"])
        #expect(exists.status == 1 && exists.stderr.contains("a full stream makes a new volume"), "\(exists.stderr)")
        let check = try CLI.run(["check", destination])
        #expect(check.status == 0 && check.stdout.contains("clean"), "\(check.stdout)")
    }

    /// With --resume, a cut stream keeps what arrived whole; the same receive run again
    /// continues and gives the same image. A receiver killed mid-stream resumes too.
    @Test func resumeAfterACutStreamAndAfterAKilledReceiver() throws {
        // Over 64 MiB of data, so the receive commits its progress on the way.
        try makeSource(size: 160 << 20, rounds: 1, seed: 3)
        #expect(try sh(#""$T" send "$A" vm@s0 -o "$D/full""#).status == 0)
        let stream = try Data(contentsOf: URL(fileURLWithPath: dir.path + "/full"))
        try stream.prefix(stream.count * 3 / 4).write(to: URL(fileURLWithPath: dir.path + "/cut"))
        let cut = try CLI.run(["receive", destination, "-i", dir.path + "/cut", "--resume"])
        #expect(cut.status == 1 && cut.stderr.contains("run the same receive with --resume"), "\(cut.stderr)")
        #expect(try volumes(destination) == ["vm%receive"])
        let staged = try CLI.run(["check", destination])
        #expect(staged.status == 0 && staged.stdout.contains("clean"), "a pool with a staging volume checks clean: \(staged.stdout)")
        let resumed = try CLI.run(["receive", destination, "-i", dir.path + "/full", "--resume"])
        #expect(resumed.status == 0 && resumed.stdout.contains("resumed after"), "\(resumed.stdout)\(resumed.stderr)")
        try expectSameImage("vm@s0")

        // A receiver killed by SIGKILL in the middle of the stream.
        try FileManager.default.removeItem(atPath: destination)
        #expect(try CLI.run(["create", destination, "--size", "1G", "--block-size", "64K"]).status == 0)
        let killed = try sh(
            #"mkfifo "$D/fifo"; "$T" receive "$B" --resume -i "$D/fifo" & pid=$!; "#
                + #"exec 3>"$D/fifo"; head -c $(( $(stat -c %s "$D/full") * 3 / 4 )) "$D/full" >&3; sleep 1; kill -9 $pid; wait $pid; echo "status $?""#)
        #expect(killed.stdout.contains("status 137"), "\(killed.stdout)\(killed.stderr)")
        #expect(try volumes(destination) == ["vm%receive"], "the staging volume stays for --resume")
        let afterKill = try CLI.run(["receive", destination, "-i", dir.path + "/full", "--resume"])
        #expect(afterKill.status == 0, "\(afterKill.stderr)")
        try expectSameImage("vm@s0")
        let check = try CLI.run(["check", destination])
        #expect(check.status == 0 && check.stdout.contains("clean"), "\(check.stdout)")
        // Without --resume, a leftover staging volume is discarded and the stream starts over.
        #expect(try sh(#"head -c 1000000 "$D/full" | "$T" receive "$B" other --resume"#).status == 1)
        let fresh = try sh(#""$T" receive "$B" other < "$D/full""#)
        #expect(fresh.status == 0 && fresh.stdout.contains("discarded an earlier interrupted receive"), "\(fresh.stdout)\(fresh.stderr)")
    }
}
