import Foundation
import Testing
import TestSupport

/// `thinbd import` and `export` against real tools: qemu-img makes and compares the
/// images, qemu-nbd serves a qcow2 image as an NBD source, and a live thinbd server is
/// copied through.
@Suite struct ImageTransferTests {
    func mapped(_ served: ServedPool, _ name: String) throws -> Int {
        let list = try served.cli(["volume", "list", "POOL", "--json"])
        let volumes = try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as! [[String: Any]]
        return volumes.first { $0["name"] as? String == name }?["mapped_bytes"] as? Int ?? -1
    }

    func allocatedBytes(_ path: String) throws -> Int {
        let du = try Program.run("/usr/bin/du", ["-B1", path])
        return Int(du.stdout.split(separator: "\t").first ?? "") ?? -1
    }

    func expectSameImage(_ a: String, _ b: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let compare = try Program.run(Peers.path("qemu-img"), ["compare", "-f", "raw", "-F", "raw", a, b])
        expectSuccess(compare, "qemu-img compare \(a) \(b)", sourceLocation: sourceLocation)
    }

    @Test(.enabled(if: Peers.need("qemu-img", "qemu-nbd")))
    func importAndExportOfflineFromFilesAndNBD() throws {
        let served = try ServedPool(size: "1G")
        let dir = served.directory.path
        let source = dir + "/source.raw"
        // 48 MiB: random data in two of every three 256 KiB chunks, holes between.
        try makeSparseImage(source, size: 48 << 20, seed: 7)

        let imported = try served.cli(["import", "POOL", "disk", source, "--json"])
        expectSuccess(imported, "import from a file")
        #expect(try jsonObject(imported)["bytes_written"] as? Int == 33_554_432, "\(imported.stdout)")
        #expect(try mapped(served, "disk") == 32 << 20, "zero runs were mapped")
        let exported = dir + "/exported.raw"
        expectSuccess(try served.cli(["export", "POOL", "disk", exported]), "export")
        try expectSameImage(source, exported)
        #expect(try allocatedBytes(exported) <= 33 << 20, "the export is not sparse")
        let again = try served.cli(["export", "POOL", "disk", exported])
        #expect(again.status == 1 && again.stderr.contains("exists; pass --force"), "\(again.stderr)")
        let ontoPool = try served.cli(["export", "POOL", "disk", "POOL", "--force"])
        #expect(ontoPool.status == 1 && ontoPool.stderr.contains("is the pool file itself"), "\(ontoPool.stderr)")
        let ontoDevice = try served.cli(["export", "POOL", "disk", "/dev/null", "--force"])
        #expect(ontoDevice.status == 1 && ontoDevice.stderr.contains("not a regular file"), "\(ontoDevice.stderr)")

        // A qcow2 image through qemu-nbd, into a larger volume.
        let qcow2 = dir + "/source.qcow2"
        expectSuccess(try Program.run(Peers.path("qemu-img"), ["convert", "-O", "qcow2", source, qcow2]), "qemu-img convert")
        let socket = dir + "/qemu.sock"
        let qemu = Process()
        qemu.executableURL = URL(fileURLWithPath: Peers.path("qemu-nbd"))
        qemu.arguments = ["-r", "-f", "qcow2", "--socket=\(socket)", "--persistent", qcow2]
        try qemu.run()
        defer {
            // SIGKILL: a child of the test process may inherit a mask that blocks SIGTERM.
            kill(qemu.processIdentifier, SIGKILL)
            qemu.waitUntilExit()
        }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) && Date() < deadline { usleep(20_000) }
        expectSuccess(try served.cli(["import", "POOL", "fromqcow2", "nbd+unix:///?socket=\(socket)", "--size", "64M"]), "import from qemu-nbd")
        #expect(try mapped(served, "fromqcow2") == 32 << 20)
        let fromNBD = dir + "/fromqcow2.raw"
        expectSuccess(try served.cli(["export", "POOL", "fromqcow2", fromNBD]), "export")
        let size = try FileManager.default.attributesOfItem(atPath: fromNBD)[.size] as? Int
        #expect(size == 64 << 20)
        expectSuccess(try Program.run("/usr/bin/cmp", ["-n", "\(48 << 20)", source, fromNBD]), "cmp")

        // Errors name the problem and leave nothing behind.
        let missing = try served.cli(["import", "POOL", "x", dir + "/nope.raw"])
        #expect(missing.status == 1 && missing.stderr.contains("nope.raw"), "\(missing.stderr)")
        let small = try served.cli(["import", "POOL", "x", source, "--size", "1M"])
        #expect(small.status == 1 && small.stderr.contains("more than --size"), "\(small.stderr)")
        let refused = try served.cli(["import", "POOL", "x", "nbd+unix:///nope?socket=\(socket)"])
        #expect(refused.status == 1, "\(refused.stderr)")
        let names = try served.cli(["volume", "list", "POOL"]).stdout
        #expect(!names.contains("\nx "), "\(names)")
        expectSuccess(try served.cli(["check", "POOL"]), "check")
    }

    /// The progress bar shows on a terminal (`script` gives the command one) and not
    /// in a pipe.
    @Test(.enabled(if: Peers.need("script")))
    func progressBarOnlyOnATerminal() throws {
        let served = try ServedPool(size: "1G")
        let source = served.directory.path + "/source.raw"
        try makeSparseImage(source, size: 8 << 20, seed: 3)
        let quiet = try served.cli(["import", "POOL", "piped", source])
        expectSuccess(quiet, "import in a pipe")
        #expect(!quiet.stderr.contains("importing"), "\(quiet.stderr)")
        let command = "\(CLI.executable) import \(served.pool) tty \(source)"
        let onTerminal = try Program.run(Peers.path("script"), ["-qec", command, "/dev/null"])
        expectSuccess(onTerminal, "import on a terminal")
        #expect(onTerminal.stdout.contains("importing tty [") && onTerminal.stdout.contains("100.0% 8.0 MiB of 8.0 MiB"), "\(onTerminal.stdout)")
    }

    @Test(.enabled(if: Peers.need("qemu-img")))
    func importAndExportThroughARunningServer() throws {
        let served = try ServedPool(size: "1G")
        let dir = served.directory.path
        let source = dir + "/source.raw"
        try makeSparseImage(source, size: 24 << 20, seed: 11)
        try served.start()
        expectSuccess(try served.cli(["import", "POOL", "live", source]), "live import")
        #expect(try mapped(served, "live") == 16 << 20)
        // What a client sees is the image.
        let read = dir + "/read.raw"
        expectSuccess(try Program.run(Peers.path("qemu-img"), ["convert", "-f", "raw", "-O", "raw", served.uri("live"), read]), "qemu-img convert from the export")
        try expectSameImage(source, read)
        // A served volume is exported from a snapshot of its own, gone afterwards.
        let whole = dir + "/whole.raw"
        expectSuccess(try served.cli(["export", "POOL", "live", whole]), "live export of a volume")
        try expectSameImage(source, whole)
        let names = try served.cli(["volume", "list", "POOL"]).stdout
        #expect(!names.contains("thinbd-export"), "the export's snapshot was left behind: \(names)")
        expectSuccess(try served.cli(["snapshot", "POOL", "live@s"]), "snapshot")
        let exported = dir + "/exported.raw"
        expectSuccess(try served.cli(["export", "POOL", "live@s", exported]), "live export of a snapshot")
        try expectSameImage(source, exported)
        #expect(served.stop() == 0)
        #expect(served.stderr.contains("control: volume-create live done"), "\(served.stderr)")
        expectSuccess(try served.cli(["check", "POOL"]), "check")
    }
}
