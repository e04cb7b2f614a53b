import Foundation
import Testing
import ThinSystem
import TestSupport
import ThinPool

/// The server against real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io, fio and
/// python3-libnbd (nbdsh's library). None of these clients is ours.
@Suite(.serialized) struct NBDInteropTests {
    @Test(.enabled(if: Peers.need("nbdinfo")))
    func nbdinfoListsExportsAndMapsAllocation() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "64M")
        try served.createVolume("other", size: "1G")
        expectSuccess(try served.cli(["snapshot", "POOL", "disk@s1"]), "snapshot")
        try served.start()
        let nbdinfo = Peers.path("nbdinfo")
        let list = try Program.run(nbdinfo, ["--list", "--json", served.uri("")])
        expectSuccess(list, "nbdinfo --list")
        let json = try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [String: Any]
        let exports = (json?["exports"] as? [[String: Any]]) ?? []
        let byName = Dictionary(uniqueKeysWithValues: exports.compactMap { e in (e["export-name"] as? String).map { ($0, e) } })
        #expect(Set(byName.keys) == ["disk", "disk@s1", "other"])
        #expect(byName["disk@s1"]?["is_read_only"] as? Bool == true)
        #expect(byName["disk"]?["is_read_only"] as? Bool == false)
        #expect((byName["disk"]?["description"] as? String)?.contains("64.0 MiB") == true)
        #expect(byName["other"]?["export-size"] as? Int == 1 << 30)

        expectSuccess(try Program.run(nbdinfo, ["--can", "multi-conn", served.uri("disk")]), "nbdinfo --can multi-conn")
        expectSuccess(try Program.run(nbdinfo, ["--can", "multi-conn", served.uri("disk@s1")]), "multi-conn on a snapshot")

        try Program.run(Peers.path("qemu-io"), ["-f", "raw", "-c", "write -P 0x11 8M 1M", served.uri("disk")])
        let map = try Program.run(nbdinfo, ["--map", "--json", served.uri("disk")])
        expectSuccess(map, "nbdinfo --map")
        let extents = (try JSONSerialization.jsonObject(with: Data(map.stdout.utf8)) as? [[String: Any]]) ?? []
        let data = extents.filter { ($0["type"] as? Int) == 0 }
        #expect(data.count == 1 && data.first?["offset"] as? Int == 8 << 20 && data.first?["length"] as? Int == 1 << 20, "\(extents)")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("nbdcopy")))
    func nbdcopyBothWaysWithFourConnections() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "96M")
        try served.start()
        let source = served.directory.path + "/source.img"
        let back = served.directory.path + "/back.img"
        try makeSparseImage(source, size: 96 << 20, seed: 1)
        let nbdcopy = Peers.path("nbdcopy")
        expectSuccess(try Program.run(nbdcopy, ["--connections=4", source, served.uri("disk")]), "nbdcopy file -> nbd")
        expectSuccess(try Program.run(nbdcopy, ["--connections=4", served.uri("disk"), back]), "nbdcopy nbd -> file")
        #expect(FileManager.default.contentsEqual(atPath: source, andPath: back))
        #expect(served.stop() == 0)
        // Holes in the source stayed holes: about a third of the volume is unmapped.
        let info = try JSONSerialization.jsonObject(with: Data(try served.cli(["volume", "list", "POOL", "--json"]).stdout.utf8)) as? [[String: Any]]
        let mapped = info?.first { $0["name"] as? String == "disk" }?["mapped_bytes"] as? Int ?? 0
        #expect(mapped < 70 << 20, "mapped \(mapped) bytes of a 96 MiB image that is one third holes")
    }

    @Test(.enabled(if: Peers.need("qemu-img")))
    func qemuImgConvertAndCompare() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "64M")
        try served.start()
        let source = served.directory.path + "/source.img"
        let back = served.directory.path + "/back.qcow2"
        try makeSparseImage(source, size: 64 << 20, seed: 2)
        let qemuImg = Peers.path("qemu-img")
        expectSuccess(try Program.run(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", source, served.uri("disk")]), "qemu-img convert to nbd")
        expectSuccess(try Program.run(qemuImg, ["compare", "-f", "raw", "-F", "raw", source, served.uri("disk")]), "qemu-img compare")
        expectSuccess(try Program.run(qemuImg, ["convert", "-f", "raw", "-O", "qcow2", served.uri("disk"), back]), "qemu-img convert from nbd")
        expectSuccess(try Program.run(qemuImg, ["compare", "-f", "raw", "-F", "qcow2", source, back]), "qemu-img compare qcow2 copy")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("qemu-io")))
    func qemuIoPatternWriteAndVerify() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "32M")
        try served.start()
        let commands = [
            "write -P 0x5a 0 64k", "write -P 0xa5 100000 7777", "write -P 0x33 16M 3M", "write -z 200k 64k",
            "read -P 0x5a 0 64k", "read -P 0xa5 100000 7777", "read -P 0x33 16M 3M", "read -P 0 200k 64k",
            "flush", "discard 16M 1M", "read -P 0 16M 1M", "read -P 0x33 17M 2M",
        ]
        let result = try Program.run(Peers.path("qemu-io"), ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [served.uri("disk")])
        expectSuccess(result, "qemu-io")
        #expect(!result.stdout.contains("Pattern verification failed") && !result.stderr.contains("failed"), "\(result.stdout)\(result.stderr)")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("fio")))
    func fioVerifiedRandomWritesOverFourConnections() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "64M")
        try served.start()
        let result = try Program.run(Peers.path("fio"), [
            "--name=verify", "--ioengine=nbd", "--uri=\(served.uri("disk"))", "--rw=randwrite", "--bs=4k",
            "--size=16M", "--offset_increment=16M", "--numjobs=4", "--iodepth=16", "--verify=crc32c",
            "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--group_reporting",
        ], timeout: 600)
        expectSuccess(result, "fio verify")
        #expect(result.stdout.contains("err= 0"), "\(result.stdout)")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("python3-nbd")))
    func libnbdFlagsBlockStatusAndErrors() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "256M")
        expectSuccess(try served.cli(["snapshot", "POOL", "disk@ro"]), "snapshot")
        try served.start()
        expectSuccess(try Peers.python("flags_and_errors.py", [served.uri("disk"), served.uri("disk@ro")]), "flags and errors")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("python3-nbd")))
    func ephemeralExportsAreSharedThenGone() throws {
        let served = try ServedPool()
        try served.createVolume("base", size: "64M")
        do {
            // Golden data, and a volume an earlier (crashed) server left marked ephemeral.
            let pool = try Pool.open(path: served.pool)
            try [UInt8](repeating: 0x47, count: 1 << 20).withUnsafeBytes { try pool.write(try pool.volumeID("base"), at: 0, from: $0) }
            _ = try pool.createVolume("leftover", size: 1 << 20, ephemeral: true)
            try pool.close()
        }
        expectSuccess(try served.cli(["snapshot", "POOL", "base@golden"]), "snapshot")
        let before = try served.cli(["info", "POOL", "--json"])
        try served.start([
            "--ephemeral", "build-*=base@golden", "--ephemeral", "scratch-*=blank:32M", "--ephemeral-grace", "0.3",
            "--no-flush", "scratch-*",
        ])
        expectSuccess(try Peers.python("ephemeral.py", [served.socket, "\(0x47)"]), "ephemeral exports")
        func used(_ result: CLI.Result) throws -> Int {
            try (JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any])["used_bytes"] as! Int
        }
        // While still served, `info` (through the server) shows the space back once the
        // last ephemeral volume's grace period is over.
        var live = try served.cli(["info", "POOL", "--json"])
        let deadline = Date().addingTimeInterval(10)
        func anyEphemeral(_ info: CLI.Result) throws -> Bool {
            (try jsonObject(info)["volumes"] as? [[String: Any]] ?? []).contains { $0["ephemeral"] as? Bool == true }
        }
        while try anyEphemeral(live) && Date() < deadline {
            usleep(100_000)
            live = try served.cli(["info", "POOL", "--json"])
        }
        #expect(try jsonObject(live)["served"] as? Bool == true, "\(live.stdout)")
        // ...with the next commit (the auto-commit, within a second).
        while try used(live) != used(before) && Date() < deadline {
            usleep(100_000)
            live = try served.cli(["info", "POOL", "--json"])
        }
        #expect(try used(live) == used(before), "data space not returned while served: \(live.stdout)")
        #expect(served.stop() == 0)
        #expect(served.stderr.contains("left by an earlier server"), "\(served.stderr)")

        // Nothing ephemeral is left, and the space is back.
        let list = try served.cli(["volume", "list", "POOL", "--json"])
        let names = try (JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as! [[String: Any]]).map { $0["name"] as! String }
        #expect(Set(names) == ["base", "base@golden"])
        let after = try served.cli(["info", "POOL", "--json"])
        #expect(try used(after) == used(before), "data space not returned: \(after.stdout)")
        expectSuccess(try served.cli(["check", "POOL"]), "check")
    }

    /// nbdcopy with 4 connections and nbdinfo on one new ephemeral name share one disk;
    /// after they (and a holder) close, it is gone and `info`, through the server, shows
    /// the space back.
    @Test(.enabled(if: Peers.need("python3-nbd", "nbdcopy", "nbdinfo")))
    func nbdcopyAndNbdinfoShareOneEphemeralDisk() throws {
        let served = try ServedPool()
        try served.createVolume("base", size: "32M")
        expectSuccess(try served.cli(["snapshot", "POOL", "base@golden"]), "snapshot")
        try served.start(["--ephemeral", "build-*=base@golden", "--ephemeral-grace", "0.5"])
        func used() throws -> Int {
            let info = try served.cli(["info", "POOL", "--json"])
            return try (JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as! [String: Any])["used_bytes"] as! Int
        }
        let before = try used()
        let image = served.directory.path + "/image.raw"
        try makeSparseImage(image, size: 32 << 20, seed: 5)
        let uri = served.uri("build-42")
        // A holder keeps the disk between the clients (the grace period is short).
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        holder.arguments = ["-c", "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); print('held', flush=True); sys.stdin.read()", uri]
        let holderInput = Pipe()
        let holderOutput = Pipe()
        holder.standardInput = holderInput
        holder.standardOutput = holderOutput
        try holder.run()
        _ = holderOutput.fileHandleForReading.availableData
        expectSuccess(try Program.run(Peers.path("nbdcopy"), ["--connections=4", image, uri]), "nbdcopy into the ephemeral disk")
        let info = try Program.run(Peers.path("nbdinfo"), [uri])
        expectSuccess(info, "nbdinfo")
        #expect(info.stdout.contains("can_multi_conn: true") && info.stdout.contains("export-size: 33554432"), "\(info.stdout)")
        let back = served.directory.path + "/back.raw"
        expectSuccess(try Program.run(Peers.path("nbdcopy"), ["--connections=4", uri, back]), "nbdcopy out of the ephemeral disk")
        expectSuccess(try Program.run("/usr/bin/cmp", [image, back]), "the 4-connection copies saw one disk")
        #expect(try used() > before)
        try holderInput.fileHandleForWriting.close()
        holder.waitUntilExit()
        var listing = try served.cli(["volume", "list", "POOL"]).stdout
        let deadline = Date().addingTimeInterval(10)
        while listing.contains("build-42") && Date() < deadline {
            usleep(100_000)
            listing = try served.cli(["volume", "list", "POOL"]).stdout
        }
        #expect(!listing.contains("build-42"), "\(listing)")
        // Ephemeral volumes go without a commit of their own: the space is back with the
        // next one (the auto-commit, within a second).
        var now = try used()
        let spaceDeadline = Date().addingTimeInterval(10)
        while now != before && Date() < spaceDeadline {
            usleep(100_000)
            now = try used()
        }
        #expect(now == before, "the ephemeral disk's space did not come back")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("python3-nbd")))
    func multiConnFlushMakesWritesVisibleEverywhere() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "64M")
        try served.start()
        expectSuccess(try Peers.python("multiconn_flush.py", [served.uri("disk")]), "multi-conn flush")
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("python3-nbd")))
    func thirtyTwoClientsAtOnce() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "64M")
        try served.start()
        expectSuccess(try Peers.python("many_clients.py", [served.uri("disk"), "32"]), "32 clients")
        #expect(served.stop() == 0)
        expectSuccess(try served.cli(["check", "POOL"]), "check after 32 clients")
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "qemu-io")))
    func snapshotAndCloneStayPointInTimeWhileOriginIsWritten() throws {
        let served = try ServedPool()
        try served.createVolume("base", size: "8M")
        // Fill the origin before snapshotting (the pool is offline between servings).
        try served.start()
        expectSuccess(try Program.run(Peers.path("qemu-io"), ["-f", "raw", "-c", "write -P 0x21 0 8M", served.uri("base")]), "fill")
        #expect(served.stop() == 0)
        expectSuccess(try served.cli(["snapshot", "POOL", "base@t0"]), "snapshot")
        expectSuccess(try served.cli(["clone", "POOL", "base@t0", "copy"]), "clone")
        try served.start()
        expectSuccess(
            try Peers.python("point_in_time.py", [served.uri("base"), served.uri("base@t0"), served.uri("copy"), String(8 << 20), "33"]),
            "point in time")
        #expect(served.stop() == 0)
        expectSuccess(try served.cli(["check", "POOL"]), "check")
    }

    @Test(.enabled(if: Peers.need("python3-nbd")))
    func hostileTrafficLeavesTheServerServing() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "64M")
        try served.start()
        expectSuccess(try Peers.python("abuse.py", [served.socket, "disk"]), "abuse")
        #expect(served.isRunning)
        #expect(served.stop() == 0)
        expectSuccess(try served.cli(["check", "POOL"]), "check")
    }
}

/// `thinbd serve` itself: listeners, captive mode, stdio, locking, shutdown.
@Suite(.serialized) struct ServeCommandTests {
    @Test(.enabled(if: Peers.need("nbdinfo")))
    func captiveModeRunsTheCommandAndReturnsItsStatus() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "16M")
        let ok = try served.cli(["serve", "POOL", "--socket", served.socket, "--default-export", "disk", "--run", "nbdinfo --size \"$uri\""])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("16777216"))
        let failing = try served.cli(["serve", "POOL", "--socket", served.socket, "--run", "exit 3"])
        #expect(failing.status == 3)
        let uri = try served.cli(["serve", "POOL", "--socket", served.socket, "--default-export", "disk", "--run", "echo \"$THINBD_URI\""])
        #expect(uri.stdout.contains("nbd+unix:///disk?socket=\(served.socket)"))
        let readOnly = try served.cli(["serve", "POOL", "--socket", served.socket, "--read-only", "--default-export", "disk", "--run", "nbdinfo --is read-only \"$uri\""])
        #expect(readOnly.status == 0, "--read-only export is not read-only: \(readOnly.stderr)")
        let writable = try served.cli(["serve", "POOL", "--socket", served.socket, "--default-export", "disk", "--run", "nbdinfo --is read-only \"$uri\""])
        #expect(writable.status != 0, "a volume export should be writable")
        let missing = try served.cli(["serve", "POOL", "--socket", served.socket, "--default-export", "nope"])
        #expect(missing.status == 1 && missing.stderr.contains("no such volume"))
        let badListen = try served.cli(["serve", "POOL", "--listen", "nonsense"])
        #expect(badListen.status == 64)
        let smallCache = try served.cli(["serve", "POOL", "--socket", served.socket, "--metadata-cache", "1M", "--default-export", "disk", "--run", "nbdinfo --size \"$uri\""])
        #expect(smallCache.status == 0 && smallCache.stdout.contains("16777216"))
        #expect(try served.cli(["serve", "POOL", "--metadata-cache", "10K"]).status == 64)
        #expect(try served.cli(["serve", "POOL", "--threads", "0"]).status == 64)
        let fewThreads = try served.cli(["serve", "POOL", "--socket", served.socket, "--threads", "2", "--default-export", "disk", "--run", "nbdinfo --size \"$uri\""])
        #expect(fewThreads.status == 0 && fewThreads.stdout.contains("16777216"))
    }

    /// Both sockets are bound under a staging name and renamed into place once they
    /// listen: a client that connects the moment the path exists is never refused, the
    /// control socket is owner-only, and at exit neither the path nor a staging name is left.
    @Test func socketsExistOnlyOnceTheyListen() throws {
        for _ in 0..<5 {
            let served = try ServedPool()
            try served.start(pollMicroseconds: 0)
            #expect(throws: Never.self) { _ = try StreamConnection(connectingTo: served.socket) }
            let control = served.pool + ".control"
            let deadline = Date().addingTimeInterval(20)
            while !FileManager.default.fileExists(atPath: control) && Date() < deadline {}
            let mode = try FileManager.default.attributesOfItem(atPath: control)[.posixPermissions] as? Int
            #expect(mode == 0o600)
            #expect(throws: Never.self) { _ = try StreamConnection(connectingTo: control) }
            #expect(served.stop() == 0)
            // Gone at exit, as a socket bound at its own path was.
            #expect(!FileManager.default.fileExists(atPath: served.socket))
            for path in [served.socket, served.pool] {
                let directory = (path as NSString).deletingLastPathComponent
                let left = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".binding") }
                #expect(left.isEmpty, "staging names left in \(directory): \(left)")
            }
        }
    }

    @Test(.enabled(if: Peers.need("qemu-io")))
    func writebackCacheModeServesToo() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "16M")
        try served.start(["--cache", "writeback"])
        let result = try Program.run(Peers.path("qemu-io"), ["-f", "raw", "-c", "write -P 0x6e 4k 1M", "-c", "flush", "-c", "read -P 0x6e 4k 1M", served.uri("disk")])
        expectSuccess(result, "qemu-io with --cache writeback")
        #expect(!result.stdout.contains("Pattern verification failed"))
        #expect(served.stop() == 0)
    }

    @Test(.enabled(if: Peers.need("nbdinfo")))
    func tcpListenerOnLoopbackPrintsItsURI() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "16M")
        let result = try served.cli(["serve", "POOL", "--listen", "127.0.0.1:0", "--default-export", "disk", "--run", "nbdinfo --size \"$uri\"; echo \"$uri\""])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("16777216"))
        #expect(result.stdout.contains("nbd://127.0.0.1:"))

        // --json: one line a program can read, naming the URIs, control socket and metrics.
        let announced = try served.cli(["serve", "POOL", "--listen", "127.0.0.1:0", "--json", "--metrics", "127.0.0.1:0", "--run", "true"])
        #expect(announced.status == 0, "\(announced.stderr)")
        let line = try #require(announced.stdout.split(separator: "\n").first)
        let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any]
        #expect((object["uris"] as? [String])?.first?.hasPrefix("nbd://127.0.0.1:") == true, "\(line)")
        #expect(object["control"] as? String == served.pool + ".control")
        #expect((object["metrics"] as? String)?.hasSuffix("/metrics") == true)
    }

    @Test(.enabled(if: Peers.need("python3-nbd")))
    func stdioServesOneConnection() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "16M")
        let script = """
            import nbd, sys
            h = nbd.NBD()
            h.connect_command(sys.argv[1:])
            assert h.get_size() == 16 << 20
            h.pwrite(b"s" * 4096, 4096)
            h.flush()
            assert h.pread(4096, 4096) == b"s" * 4096
            h.shutdown()
            print("ok")
            """
        let result = try Program.run(
            "/usr/bin/python3", ["-c", script, CLI.executable, "serve", served.pool, "--stdio", "--default-export", "disk"])
        expectSuccess(result, "libnbd connect_command over --stdio")
        expectSuccess(try served.cli(["check", "POOL"]), "check after stdio")
    }

    @Test(.enabled(if: Peers.need("nbdinfo")))
    func socketActivationServesThePassedSocket() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "16M")
        // nbdinfo's [ CMD ] form starts CMD with LISTEN_PID/LISTEN_FDS (systemd socket activation).
        let result = try Program.run(Peers.path("nbdinfo"), ["--size", "--", "[", CLI.executable, "serve", served.pool, "--default-export", "disk", "]"])
        expectSuccess(result, "nbdinfo with socket activation")
        #expect(result.stdout.contains("16777216"))
    }

    /// The shipped unit files: valid for systemd, and their ExecStart serves a socket
    /// passed by socket activation and stops cleanly.
    @Test(.enabled(if: Peers.need("systemd-analyze", "nbdinfo")))
    func systemdUnitsServeThroughSocketActivation() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "16M")
        let units = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../tools/systemd").standardized.path
        let socketPath = served.directory.path + "/thinbd.sock"
        func installed(_ name: String) throws -> String {
            try String(contentsOfFile: units + "/" + name, encoding: .utf8)
                .replacingOccurrences(of: "/usr/local/bin/thinbd", with: CLI.executable)
                .replacingOccurrences(of: "/var/lib/thinbd/default.pool", with: served.pool)
                .replacingOccurrences(of: "/run/thinbd/thinbd.sock", with: socketPath)
        }
        let service = try installed("thinbd.service")
        let socketUnit = try installed("thinbd.socket")
        #expect(service != (try String(contentsOfFile: units + "/thinbd.service", encoding: .utf8)), "ExecStart paths changed")
        try service.write(toFile: served.directory.path + "/thinbd.service", atomically: true, encoding: .utf8)
        try socketUnit.write(toFile: served.directory.path + "/thinbd.socket", atomically: true, encoding: .utf8)
        let verify = try Program.run(Peers.path("systemd-analyze"), [
            "verify", served.directory.path + "/thinbd.socket", served.directory.path + "/thinbd.service",
        ])
        expectSuccess(verify, "systemd-analyze verify")
        #expect(!verify.stderr.contains("thinbd"), "\(verify.stderr)")

        let execStart = service.split(separator: "\n").first { $0.hasPrefix("ExecStart=") }!.dropFirst("ExecStart=".count)
        let listen = socketUnit.split(separator: "\n").first { $0.hasPrefix("ListenStream=") }!.dropFirst("ListenStream=".count)
        #expect(String(listen) == socketPath)
        // The unit's command under socket activation (nbdinfo's [ CMD ] passes a listening
        // socket as systemd does, then stops the server with SIGTERM, as systemctl does).
        let command = execStart.split(separator: " ").map(String.init)
        let size = try Program.run(Peers.path("nbdinfo"), ["--size", "--", "["] + command + ["--default-export", "disk", "]"])
        expectSuccess(size, "nbdinfo through the unit's command")
        #expect(size.stdout.contains("16777216"))
        expectSuccess(try served.cli(["check", "POOL"]), "check after stop")
    }

    @Test func withoutAControlSocketThePoolIsLocked() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "16M")
        try served.start(["--no-control"])
        let result = try served.cli(["volume", "create", "POOL", "x", "--size", "1G"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("in use by thinbd serve (pid \(served.pid))"), "\(result.stderr)")
        #expect(result.stderr.contains("no server control socket answers"), "\(result.stderr)")
        #expect(served.stop() == 0)
        expectSuccess(try served.cli(["volume", "create", "POOL", "x", "--size", "1G"]), "create after serve")
    }

    /// A served pool file renamed away and a new pool made at its path: the old server
    /// keeps its control socket, and commands meant for the new file must not reach it
    /// (they would change the file the server holds, not the one named).
    @Test func aServerWhoseFileWasReplacedGetsNoCommandsForTheNewFile() throws {
        let served = try ServedPool()
        try served.createVolume("old", size: "16M")
        try served.start()
        expectSuccess(try served.cli(["volume", "list", "POOL"]), "list while served")
        let moved = served.pool + ".moved"
        try FileManager.default.moveItem(atPath: served.pool, toPath: moved)
        expectSuccess(try served.cli(["create", "POOL", "--size", "1G"]), "create at the served file's old path")

        let listed = try served.cli(["volume", "list", "POOL", "--json"])
        #expect(listed.status == 1)
        #expect(listed.stdout.contains(#""code" : "other-pool""#), "\(listed.stdout)")
        let made = try served.cli(["volume", "create", "POOL", "new", "--size", "16M"])
        #expect(made.status == 1)
        #expect(made.stderr.contains("pid \(served.pid)") && made.stderr.contains("removed, renamed or replaced"), "\(made.stderr)")
        // Naming the socket does not change which file the path names.
        let explicit = try served.cli(["volume", "list", "POOL", "--control", served.pool + ".control"])
        #expect(explicit.status == 1)

        #expect(served.stop() == 0)
        let old = try served.cli(["volume", "list", moved])
        expectSuccess(old, "list of the moved file")
        #expect(old.stdout.contains("old") && !old.stdout.contains("new"), "\(old.stdout)")
        let fresh = try served.cli(["volume", "list", "POOL"])
        expectSuccess(fresh, "list of the new file, no server left")
        #expect(!fresh.stdout.contains("old") && !fresh.stdout.contains("new"), "\(fresh.stdout)")
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "fio", "nbdinfo")))
    func poolCommandsWorkWhileServedUnderLoad() throws {
        let served = try ServedPool()
        try served.createVolume("vm", size: "64M")
        try served.start()
        // fio writes (and later verifies) the second half of vm while the script writes
        // the first, snapshots it, checks the pool and manages volumes, all live.
        let fio = Process()
        fio.executableURL = URL(fileURLWithPath: Peers.path("fio"))
        fio.arguments = [
            "--name=load", "--ioengine=nbd", "--uri=\(served.uri("vm"))", "--rw=randwrite", "--bs=4k", "--offset=32M",
            "--size=32M", "--iodepth=16", "--loops=2", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--verify_state_save=0",
        ]
        let fioOutput = Pipe()
        fio.standardOutput = fioOutput
        fio.standardError = fioOutput
        try fio.run()
        let load = try Peers.python("live_ops.py", [CLI.executable, served.pool, served.socket, "load"])
        let fioText = String(decoding: fioOutput.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        fio.waitUntilExit()
        expectSuccess(load, "live snapshot and check under load")
        #expect(fio.terminationStatus == 0 && fioText.contains("err= 0"), "fio: \(fioText.suffix(2000))")
        print(load.stdout)
        expectSuccess(try Peers.python("live_ops.py", [CLI.executable, served.pool, served.socket, "manage"]), "live management")

        // Pool-level commands through the server too.
        let grown = try served.cli(["grow", "POOL", "--size", "3G", "--json"])
        expectSuccess(grown, "live grow")
        #expect(try jsonObject(grown)["total_bytes"] as? Int == 3 << 30, "\(grown.stdout)")
        expectSuccess(try served.cli(["volume", "rename", "POOL", "vm", "disk"]), "live rename")
        expectSuccess(try served.cli(["volume", "create", "POOL", "extra", "--size", "1G"]), "live volume create")
        expectSuccess(try served.cli(["clone", "POOL", "disk@gold", "work"]), "live clone")
        expectSuccess(try served.cli(["volume", "resize", "POOL", "work", "--size", "128M"]), "live grow of a volume")
        let exports = try Program.run(Peers.path("nbdinfo"), ["--list", "--json", served.uri("")])
        #expect(exports.stdout.contains("\"extra\"") && exports.stdout.contains("\"work\""), "new volumes are not served: \(exports.stdout)")
        expectSuccess(try served.cli(["volume", "delete", "POOL", "extra"]), "live delete")
        let tree = try served.cli(["tree", "POOL"])
        #expect(tree.stdout.contains("disk  (volume") && tree.stdout.contains("└── disk@gold"), "\(tree.stdout)")
        #expect(served.stop() == 0)
        #expect(served.stderr.contains("control: snapshot vm@live done"), "\(served.stderr)")
        expectSuccess(try served.cli(["check", "POOL"]), "offline check afterwards")
    }

    /// tools/ci-example.sh: a golden ext4 buildroot, 4 builds at once on ephemeral clones
    /// through nbdfuse and loop mounts, e2fsck clean on each, space back afterwards.
    @Test(.enabled(if: Peers.need("nbdfuse", "mkfs.ext4", "e2fsck", "gcc", "make") && getuid() == 0))
    func ciExampleRunsFourBuildsOnEphemeralClones() throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("tools/ci-example.sh").path
        let result = try Program.run(
            "/bin/bash", [script, "--builds", "4", "--files", "40", "--size", "256M"], environment: ["THINBD": CLI.executable],
            timeout: 300)
        expectSuccess(result, "ci-example.sh")
        #expect(result.stdout.components(separatedBy: " clean ").count - 1 == 4, "\(result.stdout)")
        #expect(result.stdout.contains("ci-example: ok") && result.stdout.contains("(clones deleted)"), "\(result.stdout)")
        print(result.stdout)
    }

    @Test(.enabled(if: Peers.need("python3-nbd")))
    func metricsLowWaterAndAutogrow() throws {
        let served = try ServedPool(size: "16M")
        try served.createVolume("disk", size: "8M")
        try served.createVolume("small", size: "32M")
        try served.start([
            "--metrics", "127.0.0.1:0", "--low-water", "50", "--autogrow", "8M", "--autogrow-max", "24M", "--log-level", "debug",
        ])
        expectSuccess(try Peers.python("metrics.py", [CLI.executable, served.pool, served.socket]), "metrics")
        #expect(served.stop() == 0)
        #expect(served.stderr.contains("notice thinbd: [ThinServe] autogrow: pool"), "\(served.stderr)")
        #expect(served.stderr.contains("warning thinbd: [ThinServe] pool") && served.stderr.contains("low-water mark 50%"), "\(served.stderr)")
        #expect(served.stderr.contains("debug thinbd: [ThinServe] client connected to small"), "\(served.stderr)")
        let info = try served.cli(["info", "POOL", "--json"])
        #expect(try jsonObject(info)["total_bytes"] as? Int == 24 << 20, "the grown size was not committed: \(info.stdout)")
        expectSuccess(try served.cli(["check", "POOL"]), "check")
    }

    @Test(.enabled(if: Peers.need("python3-nbd")))
    func sigtermFinishesWritesAndCommits() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "64M")
        try served.start()
        let script = """
            import nbd, sys
            h = nbd.NBD(); h.connect_uri(sys.argv[1])
            for i in range(64):
                h.pwrite(bytes([i + 1]) * 65536, i * 65536)
            print("written", flush=True)
            """
        let writer = try Program.run("/usr/bin/python3", ["-c", script, served.uri("disk")])
        expectSuccess(writer, "writer")
        kill(served.pid, SIGTERM)
        #expect(served.stop() == 0)
        #expect(served.stderr.contains("shutting down"))
        expectSuccess(try served.cli(["check", "POOL"]), "check after SIGTERM")
        // Written but never flushed by the client: the shutdown commit made them durable.
        try served.start()
        let reader = """
            import nbd, sys
            h = nbd.NBD(); h.connect_uri(sys.argv[1])
            for i in range(64):
                assert h.pread(65536, i * 65536) == bytes([i + 1]) * 65536, i
            print("ok")
            """
        expectSuccess(try Program.run("/usr/bin/python3", ["-c", reader, served.uri("disk")]), "reader")
        #expect(served.stop() == 0)
    }
}
