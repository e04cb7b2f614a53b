import Foundation
import Testing
import ThinCLI
import TestSupport
import ThinPool

@Suite(.serialized) struct CLIContractTests {
    /// Runs a command that must succeed, then `check`, which must report clean.
    @discardableResult
    func runClean(_ arguments: [String], pool: String) throws -> CLI.Result {
        let result = try CLI.run(arguments)
        #expect(result.status == 0, "thinbd \(arguments.joined(separator: " ")) failed: \(result.stderr)")
        let check = try CLI.run(["check", pool])
        #expect(check.status == 0, "check after \(arguments.joined(separator: " ")): \(check.stdout)\(check.stderr)")
        #expect(check.stdout.contains("clean"))
        return result
    }

    @Test func contractEndToEnd() throws {
        let dir = TemporaryDirectory()
        let pool = dir.path + "/p.pool"
        try runClean(["create", pool, "--size", "1G", "--block-size", "64K"], pool: pool)
        try runClean(["volume", "create", pool, "base", "--size", "4G"], pool: pool)
        // Overcommit: a volume larger than the pool is fine.
        #expect(try CLI.run(["volume", "list", pool]).stdout.contains("4.0 GiB"))

        // Put data in with the library, then snapshot and clone from the CLI.
        do {
            let p = try Pool.open(path: pool)
            let id = try p.volumeID("base")
            try [UInt8](repeating: 0x41, count: 1 << 20).withUnsafeBytes { try p.write(id, at: 0, from: $0) }
            try p.close()
        }
        try runClean(["snapshot", pool, "base@golden"], pool: pool)
        try runClean(["clone", pool, "base@golden", "build1"], pool: pool)
        try runClean(["clone", pool, "base", "build2"], pool: pool)

        let list = try runClean(["volume", "list", pool, "--json"], pool: pool)
        let volumes = try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as! [[String: Any]]
        let byName = Dictionary(uniqueKeysWithValues: volumes.map { ($0["name"] as! String, $0) })
        #expect(Set(byName.keys) == ["base", "base@golden", "build1", "build2"])
        #expect(byName["base@golden"]?["kind"] as? String == "snapshot")
        #expect(byName["build1"]?["kind"] as? String == "clone")
        #expect(byName["build1"]?["parent"] as? String == "base@golden")
        #expect(byName["build1"]?["mapped_bytes"] as? Int == 1 << 20)

        let info = try runClean(["info", pool, "--json"], pool: pool)
        let json = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as! [String: Any]
        #expect(json["total_bytes"] as? Int == 1 << 30)
        #expect(json["used_bytes"] as? Int == 1 << 20)
        #expect(json["free_bytes"] as? Int == (1 << 30) - (1 << 20))

        let tree = try runClean(["tree", pool], pool: pool)
        #expect(tree.stdout.contains("base  (volume"))
        #expect(tree.stdout.contains("├── base@golden") || tree.stdout.contains("└── base@golden"))
        #expect(tree.stdout.contains("    └── build1") || tree.stdout.contains("│   └── build1"))

        try runClean(["volume", "rename", pool, "base", "root"], pool: pool)
        #expect(try CLI.run(["volume", "list", pool]).stdout.contains("root@golden"))
        try runClean(["volume", "rename", pool, "root@golden", "root@gold"], pool: pool)
        try runClean(["volume", "resize", pool, "build1", "--size", "512M"], pool: pool)
        try runClean(["snapshot", pool, "build1@before"], pool: pool)
        try runClean(["volume", "resize", pool, "build1", "--size", "2G"], pool: pool)
        try runClean(["rollback", pool, "build1@before"], pool: pool)
        let rolled = try JSONSerialization.jsonObject(with: Data(try CLI.run(["volume", "list", pool, "--json"]).stdout.utf8)) as! [[String: Any]]
        #expect(rolled.first { $0["name"] as? String == "build1" }?["size"] as? Int == 512 << 20)

        // Delete in any order: origin first, then the snapshot, while clones keep the data.
        try runClean(["volume", "delete", pool, "root"], pool: pool)
        try runClean(["volume", "delete", pool, "root@gold"], pool: pool)
        do {
            let p = try Pool.open(path: pool, readOnly: true)
            var bytes = [UInt8](repeating: 0, count: 4096)
            let id = try p.volumeID("build2")
            _ = try bytes.withUnsafeMutableBytes { try p.read(id, at: 0, into: $0) }
            #expect(bytes == [UInt8](repeating: 0x41, count: 4096))
            try p.close()
        }
        try runClean(["volume", "delete", pool, "build2"], pool: pool)
        try runClean(["volume", "delete", pool, "build1@before"], pool: pool)
        try runClean(["volume", "delete", pool, "build1"], pool: pool)
        let empty = try JSONSerialization.jsonObject(with: Data(try CLI.run(["info", pool, "--json"]).stdout.utf8)) as! [String: Any]
        #expect(empty["used_bytes"] as? Int == 0)

        try runClean(["grow", pool, "--size", "2G"], pool: pool)
        let grown = try JSONSerialization.jsonObject(with: Data(try CLI.run(["info", pool, "--json"]).stdout.utf8)) as! [String: Any]
        #expect(grown["total_bytes"] as? Int == 2 << 30)
        #expect(try CLI.run(["info", pool]).stdout.contains("[....."))
    }

    /// `diff` lists differing extents as OFFSET LENGTH lines: none between an image and
    /// its untouched snapshot, everything mapped between unrelated images (with a note).
    @Test func diffListsChangedExtents() throws {
        let dir = TemporaryDirectory()
        let pool = dir.path + "/p.pool"
        #expect(try CLI.run(["create", pool, "--size", "64M"]).status == 0)
        let image = dir.path + "/image.raw"
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        for i in 0..<65536 { bytes[i] = UInt8(truncatingIfNeeded: i | 1) }
        for i in (512 << 10)..<((512 << 10) + 4096) { bytes[i] = 9 }
        try Data(bytes).write(to: URL(fileURLWithPath: image))
        _ = try runClean(["import", pool, "v", image], pool: pool)
        _ = try runClean(["volume", "create", pool, "w", "--size", "1M"], pool: pool)
        _ = try runClean(["snapshot", pool, "v@a"], pool: pool)
        let same = try CLI.run(["diff", pool, "v@a", "v"])
        #expect(same.status == 0 && same.stdout.isEmpty && same.stderr.isEmpty, "\(same.stdout)\(same.stderr)")
        // Blocks are 64 KiB: the imported data sits in blocks 0 and 8.
        let unrelated = try CLI.run(["diff", pool, "w", "v@a"])
        #expect(unrelated.status == 0 && unrelated.stdout == "0 65536\n524288 65536\n", "\(unrelated.stdout)")
        #expect(unrelated.stderr.contains("share no history"), "\(unrelated.stderr)")
        let json = try CLI.run(["diff", pool, "w", "v@a", "--json"])
        #expect(json.stdout.contains("\"changed_bytes\" : 131072") && json.stdout.contains("\"related\" : false"), "\(json.stdout)")
        let missing = try CLI.run(["diff", pool, "v@a", "nope"])
        #expect(missing.status == 1 && missing.stderr.contains("no such volume or snapshot: nope"), "\(missing.stderr)")
    }

    @Test func errorsNameTheProblem() throws {
        let dir = TemporaryDirectory()
        let pool = dir.path + "/p.pool"
        try CLI.run(["create", pool, "--size", "64M"])
        let cases: [([String], String)] = [
            (["volume", "delete", pool, "nope"], "no such volume or snapshot: nope"),
            (["snapshot", pool, "nope@s"], "no such volume or snapshot: nope"),
            (["info", dir.path + "/missing.pool"], "no such file"),
            (["create", pool, "--size", "64M"], "already exists"),
            (["volume", "create", pool, "a@b", "--size", "1G"], "cannot contain '@'"),
            (["volume", "create", pool, "v", "--size", "0"], "greater than zero"),
            (["grow", pool, "--size", "1M"], "pools only grow"),
        ]
        for (arguments, message) in cases {
            let result = try CLI.run(arguments)
            #expect(result.status == 1, "\(arguments): status \(result.status)")
            #expect(result.stderr.contains(message), "\(arguments): \(result.stderr)")
        }
        _ = FileManager.default.createFile(atPath: dir.path + "/junk", contents: Data(repeating: 7, count: 100_000))
        let junk = try CLI.run(["info", dir.path + "/junk"])
        #expect(junk.status == 1 && junk.stderr.contains("not a thinbd pool"))
        // Wrong arguments are usage errors.
        #expect(try CLI.run(["create", pool + "2", "--size", "12Q"]).status == 64)
        #expect(try CLI.run(["create", pool + "2", "--size", "1G", "--block-size", "3000"]).status == 64)
        #expect(try CLI.run(["volume", "frobnicate"]).status == 64)
        #expect(try CLI.run(["check", pool]).status == 0)
    }

    @Test func poolInUseIsRefused() throws {
        let dir = TemporaryDirectory()
        let pool = dir.path + "/p.pool"
        try CLI.run(["create", pool, "--size", "64M"])
        let holder = try Pool.open(path: pool)
        let result = try CLI.run(["volume", "create", pool, "v", "--size", "1G"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("in use"))
        try holder.close()
        #expect(try CLI.run(["volume", "create", pool, "v", "--size", "1G"]).status == 0)
    }

    @Test func ifMissingRaceCreatesOnce() throws {
        let dir = TemporaryDirectory()
        let pool = dir.path + "/p.pool"
        try CLI.run(["create", pool, "--size", "256M"])
        try CLI.run(["volume", "create", pool, "base", "--size", "1G"])
        // Eight processes at once, for the snapshot and then for a clone of it.
        for arguments in [["snapshot", pool, "base@golden", "--if-missing"], ["clone", pool, "base@golden", "build", "--if-missing"]] {
            let results = try Array(repeating: arguments, count: 8).concurrentMap { try CLI.run($0) }
            #expect(results.allSatisfy { $0.status == 0 }, "\(results.map(\.stderr))")
            #expect(results.filter { $0.stdout.hasPrefix("created") }.count == 1, "\(results.map(\.stdout))")
            #expect(results.filter { $0.stdout.contains("exists already") }.count == 7)
        }
        let list = try CLI.run(["volume", "list", pool, "--json"])
        let volumes = try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as! [[String: Any]]
        #expect(Set(volumes.map { $0["name"] as! String }) == ["base", "base@golden", "build"])
        #expect(try CLI.run(["check", pool]).status == 0)

        // Without --if-missing an existing name is still an error, and a volume of that
        // name with another origin is one even with it.
        #expect(try CLI.run(["snapshot", pool, "base@golden"]).status == 1)
        try CLI.run(["volume", "create", pool, "other", "--size", "1G"])
        let wrongOrigin = try CLI.run(["clone", pool, "base@golden", "other", "--if-missing"])
        #expect(wrongOrigin.status == 1)
        #expect(wrongOrigin.stderr.contains("not a clone of base@golden"))
    }

    @Test func checkExitCodes() throws {
        let dir = TemporaryDirectory()
        let pool = dir.path + "/p.pool"
        try CLI.run(["create", pool, "--size", "64M"])
        try CLI.run(["volume", "create", pool, "v", "--size", "1G"])
        #expect(try CLI.run(["check", pool]).status == 0)
        #expect(try CLI.run(["check", dir.path + "/missing"]).status == 2)
        // Flip a byte in the live volume table / record blocks (metadata region start).
        let live = try Pool.open(path: pool, readOnly: true)
        let blocks = live.metadataBlocksInUse()
        try live.close()
        let handle = FileHandle(forUpdatingAtPath: pool)!
        for block in blocks {
            try handle.seek(toOffset: block * 4096 + 100)
            let byte = try handle.read(upToCount: 1)!
            try handle.seek(toOffset: block * 4096 + 100)
            handle.write(Data([byte[0] ^ 0xFF]))
        }
        try handle.close()
        let damaged = try CLI.run(["check", pool])
        #expect(damaged.status == 1, "\(damaged.stdout) \(damaged.stderr)")
        #expect(damaged.stderr.contains("corrupt block") || damaged.stdout.contains("damage"))
    }

    @Test func demoRunsTwiceOnTheSamePool() throws {
        let dir = TemporaryDirectory()
        let pool = dir.path + "/sub/demo.pool"
        let first = try CLI.run(["demo", pool])
        #expect(first.status == 0, "\(first.stderr)")
        #expect(first.stdout.contains("check: clean"))
        let second = try CLI.run(["demo", pool])
        #expect(second.status == 0)
        #expect(try CLI.run(["check", pool]).status == 0)
        #expect(try CLI.run(["volume", "list", pool]).stdout.components(separatedBy: "build-").count == 3)
    }
}

@Suite struct ByteSizeTests {
    @Test func parsesUnits() {
        #expect([65536, 3 << 30, 1000, 0].map { ByteSize(bytes: $0).defaultValueDescription } == ["64K", "3G", "1000", "0"])
        #expect(ByteSize.parse("65536") == 65536)
        #expect(ByteSize.parse("64K") == 65536)
        #expect(ByteSize.parse("64k") == 65536)
        #expect(ByteSize.parse("10G") == 10 << 30)
        #expect(ByteSize.parse("10GiB") == 10 << 30)
        #expect(ByteSize.parse("2T") == 2 << 40)
        #expect(ByteSize.parse("1.5G") == 3 << 29)
        #expect(ByteSize.parse("1M") == 1 << 20)
        #expect(ByteSize.parse("") == nil)
        #expect(ByteSize.parse("G") == nil)
        #expect(ByteSize.parse("12Q") == nil)
        #expect(ByteSize.parse("-1") == nil)
        #expect(ByteSize.parse("99999999999P") == nil)
    }

    @Test func formatsHumanSizes() {
        #expect(formatBytes(512) == "512 B")
        #expect(formatBytes(64 << 10) == "64.0 KiB")
        #expect(formatBytes(10 << 30) == "10.0 GiB")
        #expect(formatBytes(1536 << 20) == "1.5 GiB")
    }
}

extension Array {
    /// Runs `transform` on every element at once, each on its own thread.
    func concurrentMap<T>(_ transform: @escaping @Sendable (Element) throws -> T) throws -> [T] where Element: Sendable {
        let results = UnsafeMutableBufferPointer<Result<T, Error>?>.allocate(capacity: count)
        results.initialize(repeating: nil)
        defer { results.deallocate() }
        nonisolated(unsafe) let shared = results
        let done = DispatchGroup()
        for (i, element) in enumerated() {
            done.enter()
            Thread {
                shared[i] = Result { try transform(element) }
                done.leave()
            }.start()
        }
        done.wait()
        return try results.map { try $0!.get() }
    }
}
