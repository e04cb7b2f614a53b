import Foundation
import Testing
import TestSupport
import ThinPool

/// One client or command never stalls the others (issue: the server deadlocked when a
/// CI job opened its ephemeral clone while another job read).
@Suite(.serialized) struct IsolationTests {
    /// Reads in flight on every event loop while ephemeral clones are opened (one at a
    /// time, then 40 at once), snapshots are taken and volumes created and deleted
    /// through the control socket: every step finishes, every reader keeps reading.
    /// Before the handshake moved off the loop, opening the second clone hung the server.
    /// With `--cache writeback` the pool's pages keep being dropped from the page cache,
    /// so the reads in flight are io_uring reads of the page cache on the loop.
    @Test(.enabled(if: Peers.need("python3-nbd")), arguments: ["none", "writeback"])
    func eventLoopNeverWaitsWhileClonesOpenAndCommandsRun(cache: String) throws {
        let served = try ServedPool()
        try served.createVolume("a", size: "64M")
        do {
            let pool = try Pool.open(path: served.pool)
            var rng = SystemRandomNumberGenerator()
            let bytes = (0..<(64 << 20) / 8).map { _ in rng.next() as UInt64 }
            try bytes.withUnsafeBytes { try pool.write(try pool.volumeID("a"), at: 0, from: $0) }
            try pool.close()
        }
        try served.start(["--ephemeral", "job-*=a", "--ephemeral-grace", "0.2", "--cache", cache])
        let result = try Peers.python(
            "loop_never_waits.py", [served.socket, CLI.executable, served.pool, "6"] + (cache == "writeback" ? ["--drop-cache"] : []),
            timeout: 400)
        expectSuccess(result, "reads in flight while clones open and commands run")
        print(result.stdout)
        #expect(served.stop() == 0)
        expectSuccess(try served.cli(["check", "POOL"]), "check")
    }

    /// `--idle-poll`: with a 50 ms window, a client at queue depth 1 still gets every
    /// read, write and flush answered at once (a poll never holds a request, nor an
    /// off-loop write's completion), the poll catches requests after short pauses and
    /// waits through reads from the disk (the event loops hardly sleep), and it stops
    /// for pauses longer than the window. Under writeback, a loop sleeps while the page-
    /// cache thread copies 1 MiB cached reads instead of polling, on either
    /// transmission. The server must not have reported that its loops cannot poll.
    @Test(.enabled(if: Peers.need("python3-nbd")), arguments: [
        ("none", "lean"), ("writeback", "lean"), ("writeback", "nio"),
    ])
    func idlePollAnswersAtOnceAndStopsForLongPauses(cache: String, transmission: String) throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "64M")
        try served.start(["--idle-poll", "50000", "--cache", cache, "--transmission", transmission])
        let result = try Peers.python(
            "idle_poll.py", [served.uri("disk"), String(served.pid), "50000", served.pool, cache], timeout: 120)
        expectSuccess(result, "idle poll")
        print(result.stdout)
        #expect(served.stop() == 0)
        #expect(!served.stderr.contains("sleep at once"), "\(served.stderr)")
    }

    /// `--limit` and `thinbd limit`: two connections to a limited export share its rate,
    /// an unlimited export is not held back, and live changes reach open connections.
    @Test(.enabled(if: Peers.need("python3-nbd")))
    func perExportLimitsAreSharedAndChangeLive() throws {
        let served = try ServedPool()
        try served.createVolume("lim-a", size: "16M")
        try served.createVolume("free", size: "16M")
        try served.start(["--limit", "lim-*=200"])
        let result = try Peers.python("limits.py", [served.socket, CLI.executable, served.pool], timeout: 120)
        expectSuccess(result, "per-export limits")
        print(result.stdout)
        #expect(served.stop() == 0)
    }

    /// Thousands of connects and disconnects (a tenth of them to new ephemeral names)
    /// leave no descriptor, no memory and no metric series behind.
    @Test(.enabled(if: Peers.need("python3-nbd")))
    func connectionChurnLeaksNothing() throws {
        let served = try ServedPool()
        try served.createVolume("disk", size: "16M")
        try served.start(["--metrics", "127.0.0.1:0", "--ephemeral", "churn-*=blank:1M", "--ephemeral-grace", "0"])
        let result = try Peers.python("churn.py", [served.socket, served.pool + ".control", "6000"], timeout: 300)
        expectSuccess(result, "connection churn")
        print(result.stdout)
        #expect(served.stop() == 0)
        expectSuccess(try served.cli(["check", "POOL"]), "check")
    }

    /// The soak (tools/soak.py), shortened for CI: 512 connections on 32 exports doing
    /// fio-verified writes; no error, no mismatch, memory levels off, descriptors return.
    @Test(.enabled(if: Peers.need("fio", "nbdinfo")))
    func shortSoakWith512Connections() throws {
        let soak = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("tools/soak.py").path
        let directory = TemporaryDirectory("thinbd-soak")
        let transmission = ServedPool.transmission.map { ["--transmission", $0] } ?? []
        let result = try Program.run(
            "/usr/bin/python3", [soak, CLI.executable, "--seconds", "20", "--dir", directory.path] + transmission, timeout: 600)
        expectSuccess(result, "soak")
        print(result.stdout)
    }
}
