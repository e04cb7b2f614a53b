import Foundation
import Testing
import TestSupport

/// The `thinbd:changed:` metadata context through stock clients: nbdinfo and
/// python3-libnbd, and a 30-line incremental backup script that reads only what changed.
@Suite(.serialized) struct ChangedBlocksContextTests {
    /// A served 64 MiB volume with snapshots `base@mon` and `base@tue` between which
    /// writes, a trim, a zeroing and a write into a hole happened, and one more write
    /// after `base@tue`.
    func servedWithChanges() throws -> ServedPool {
        let served = try ServedPool()
        try served.createVolume("base", size: "64M")
        try served.start()
        let qemuIO = Peers.path("qemu-io")
        func io(_ command: String) throws {
            expectSuccess(try Program.run(qemuIO, ["-f", "raw", "-c", command, served.uri("base")]), "qemu-io \(command)")
        }
        try io("write -P 0x11 0 16M")
        try io("write -P 0x22 32M 8M")
        expectSuccess(try served.cli(["snapshot", "POOL", "base@mon"]), "snapshot base@mon")
        try io("write -P 0x33 4M 1M")
        try io("discard 34M 1M")
        try io("write -z 38M 512K")
        try io("write -P 0x44 60M 64K")
        expectSuccess(try served.cli(["snapshot", "POOL", "base@tue"]), "snapshot base@tue")
        try io("write -P 0x55 8M 64K")
        return served
    }

    /// `thinbd diff --json` through the server's control socket: the changed ranges.
    func diff(_ served: ServedPool, _ from: String, _ to: String) throws -> [[Int]] {
        let result = try served.cli(["diff", "POOL", from, to, "--json"])
        expectSuccess(result, "diff \(from) \(to)")
        let extents = try jsonObject(result)["extents"] as? [[String: Any]] ?? []
        return extents.map { [$0["offset"] as? Int ?? -1, $0["length"] as? Int ?? -1] }
    }

    @Test(.enabled(if: Peers.need("nbdinfo", "qemu-io")))
    func nbdinfoListsTheBasesAndMapsWhatChanged() throws {
        let served = try servedWithChanges()
        let nbdinfo = Peers.path("nbdinfo")
        let list = try Program.run(nbdinfo, ["--json", served.uri("base@tue")])
        expectSuccess(list, "nbdinfo")
        let exports = try jsonObject(list)["exports"] as? [[String: Any]] ?? []
        let contexts = Set(exports.first?["contexts"] as? [String] ?? [])
        #expect(contexts == ["base:allocation", "thinbd:changed:base@mon", "thinbd:changed:base@tue"], "\(contexts)")

        let map = try Program.run(nbdinfo, ["--map=thinbd:changed:base@mon", "--json", served.uri("base@tue")])
        expectSuccess(map, "nbdinfo --map=thinbd:changed:base@mon")
        let extents = (try JSONSerialization.jsonObject(with: Data(map.stdout.utf8)) as? [[String: Any]]) ?? []
        let changed = extents.filter { $0["type"] as? Int == 1 }.map { [$0["offset"] as? Int ?? -1, $0["length"] as? Int ?? -1] }
        let expected = try diff(served, "base@mon", "base@tue")
        #expect(changed == expected, "the context and thinbd diff disagree")
        // 1 MiB written, 1 MiB trimmed, 512 KiB zeroed, 64 KiB written into a hole.
        let changedBytes: Int = changed.map { $0[1] }.reduce(0, +)
        let expectedBytes: Int = (1 << 20) + (1 << 20) + (512 << 10) + (64 << 10)
        #expect(changedBytes == expectedBytes, "\(changed)")
        let mapped: Int = extents.map { $0["length"] as? Int ?? 0 }.reduce(0, +)
        #expect(mapped == 64 << 20, "the map covers the export")

        let unknown = try Program.run(nbdinfo, ["--map=thinbd:changed:base@nope", served.uri("base@tue")])
        #expect(unknown.status != 0 && unknown.stderr.contains("does not support"), "\(unknown.stderr)")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "nbdcopy", "qemu-io")))
    func anIncrementalBackupCopiesOnlyWhatChangedAndReproducesTheSnapshot() throws {
        let served = try servedWithChanges()
        let nbdcopy = Peers.path("nbdcopy")
        let backup = served.directory.path + "/backup.img"
        let reference = served.directory.path + "/tue.img"
        expectSuccess(try Program.run(nbdcopy, [served.uri("base@mon"), backup]), "full backup of base@mon")
        expectSuccess(try Program.run(nbdcopy, [served.uri("base@tue"), reference]), "nbdcopy base@tue")
        #expect(!FileManager.default.contentsEqual(atPath: backup, andPath: reference), "the snapshots should differ")
        let run = try Peers.python("incremental_backup.py", [served.uri("base@tue"), "base@mon", backup])
        expectSuccess(run, "incremental_backup.py")
        let copied = Int(run.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
        let changedBytes: Int = try diff(served, "base@mon", "base@tue").map { $0[1] }.reduce(0, +)
        #expect(copied == changedBytes && copied < 4 << 20, "copied \(copied) bytes; \(changedBytes) changed")
        #expect(FileManager.default.contentsEqual(atPath: backup, andPath: reference), "the incremental backup is not base@tue")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "qemu-io")))
    func libnbdListsSelectsTwoContextsAndFollowsTheBaseByIdentity() throws {
        let served = try servedWithChanges()
        // The live volume against base@mon: everything up to base@tue plus the write after.
        let expected = try diff(served, "base@mon", "base").map { "\($0[0]) \($0[1])" }.joined(separator: "\n")
        let run = try Peers.python(
            "changed_context.py",
            [served.uri("base"), "base@mon", "base@mon,base@tue", CLI.executable, served.pool, "base@monday"])
        expectSuccess(run, "changed_context.py")
        #expect(run.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == expected)
        #expect(served.stop() == 0)
    }
}

/// `thinbd send | thinbd receive` between two served pools: the data goes through both
/// servers (control socket and NBD), and stock clients see the same images.
@Suite(.serialized) struct SendReceiveInteropTests {
    @Test(.enabled(if: Peers.need("nbdinfo", "nbdcopy", "qemu-io")))
    func aFullAndThreeIncrementalStreamsBetweenServedPoolsGiveIdenticalImages() throws {
        let a = try ServedPool()
        let b = try ServedPool()
        try a.createVolume("vm", size: "48M")
        try a.start()
        try b.start()
        let qemuIO = Peers.path("qemu-io")
        let rounds: [[String]] = [
            ["write -P 0x11 0 8M", "write -P 0x12 20M 3M", "write -P 0x13 47M 1M"],
            ["write -P 0x21 1M 64K", "discard 20M 1M", "write -z 4M 2M"],
            ["write -P 0x31 30M 5M", "write -z -u 47M 512K", "write -P 0x32 0 4K"],
            ["discard 0 48M", "write -P 0x41 10M 128K"],
        ]
        for (round, commands) in rounds.enumerated() {
            for command in commands {
                expectSuccess(try Program.run(qemuIO, ["-f", "raw", "-c", command, a.uri("vm")]), "qemu-io \(command)")
            }
            expectSuccess(try a.cli(["snapshot", "POOL", "vm@r\(round)"]), "snapshot")
            let from = round == 0 ? "" : "--from vm@r\(round - 1)"
            let pipe = try Program.run(
                "/bin/sh", ["-c", #""$T" send "$A" vm@r\#(round) \#(from) | "$T" receive "$B""#],
                environment: ["T": CLI.executable, "A": a.pool, "B": b.pool])
            expectSuccess(pipe, "send | receive, round \(round)")
            try expectIdentical(a, b, "vm@r\(round)")
        }
        expectSuccess(try b.cli(["check", "POOL"]), "check of the receiving pool")

        // An incremental stream replaces vm's contents: refused under a connected client,
        // done with --force (which disconnects it).
        expectSuccess(try a.cli(["snapshot", "POOL", "vm@r4"]), "snapshot")
        let stream = a.directory.path + "/r4.stream"
        expectSuccess(try a.cli(["send", "POOL", "vm@r4", "--from", "vm@r3", "-o", stream]), "send")
        let connected = b.directory.path + "/connected"
        let client = Process()
        client.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        client.arguments = ["-c", "import nbd, time\nh = nbd.NBD()\nh.connect_uri('\(b.uri("vm"))')\nopen('\(connected)', 'w').close()\ntime.sleep(60)"]
        try client.run()
        defer { if client.isRunning { kill(client.processIdentifier, SIGKILL) } }
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: connected) && Date() < deadline { usleep(20_000) }
        let refused = try b.cli(["receive", "POOL", "-i", stream])
        #expect(refused.status == 1 && refused.stderr.contains("connected client"), "\(refused.stderr)")
        expectSuccess(try b.cli(["receive", "POOL", "-i", stream, "--force"]), "receive --force")
        try expectIdentical(a, b, "vm@r4")
        #expect(a.stop() == 0 && b.stop() == 0)
    }

    /// sha256 of both exports (read by nbdcopy) and nbdinfo's allocation maps.
    func expectIdentical(_ a: ServedPool, _ b: ServedPool, _ name: String) throws {
        var digests: [String] = []
        var maps: [String] = []
        for served in [a, b] {
            let file = served.directory.path + "/\(name).img"
            expectSuccess(try Program.run(Peers.path("nbdcopy"), [served.uri(name), file]), "nbdcopy \(name)")
            let sum = try Program.run("/usr/bin/sha256sum", [file])
            digests.append(String(sum.stdout.prefix(64)))
            let map = try Program.run(Peers.path("nbdinfo"), ["--map", "--totals", served.uri(name)])
            maps.append(map.stdout)
            let all = try Program.run(Peers.path("nbdinfo"), ["--map", served.uri(name)])
            maps.append(all.stdout)
            try FileManager.default.removeItem(atPath: file)
        }
        #expect(digests[0] == digests[1] && digests[0].count == 64, "\(name): sha256 \(digests)")
        #expect(maps[0] == maps[2] && maps[1] == maps[3], "\(name): allocation differs:\n\(maps[1])\n---\n\(maps[3])")
    }
}
