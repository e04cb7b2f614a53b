import Foundation
import Testing
import TestSupport

/// kill -9 at the process level: the server is killed at random moments while two libnbd
/// connections write and flush; after each, `thinbd check` is clean and every flushed
/// write is there (crash_rounds.py). tools/crash-rounds.sh runs it for longer.
@Suite struct CrashRoundsTests {
    @Test(.enabled(if: Peers.need("python3-nbd")))
    func killNineWhileWritingLosesNoFlushedWrite() throws {
        try Self.runRounds(poolSize: "256M")
    }

    /// The same under `--cache writeback` with a snapshot before every round, so each
    /// round's first writes copy shared blocks: the copies go to the file with O_DIRECT,
    /// the rest through the page cache, and the auto-commit and FLUSH make both durable.
    @Test(.enabled(if: Peers.need("python3-nbd")))
    func killNineWhileCopyingUnderWritebackLosesNoFlushedWrite() throws {
        try Self.runRounds(
            poolSize: "512M", environment: ["THINBD_CRASH_SNAPSHOTS": "1", "THINBD_CRASH_SERVE_ARGS": "--cache writeback"])
    }

    /// Power cuts, not only kill -9: tools/powercut.py records every write and FLUSH that
    /// reaches the disk under an ext4 holding the pool (loop device over nbdfuse over an
    /// nbdkit sh plugin), replays the writes up to each device flush into an image, and
    /// checks the pool and every FLUSHed write of a copy-on-write scenario under
    /// `--cache writeback` in each. Root only (loop devices and mounts).
    @Test(.enabled(if: Self.canCutPower))
    func powerCutAtAnyDeviceFlushLosesNoFlushedWrite() throws {
        let result = try Self.cutPower(["--writes", "240", "--step", "2"])
        #expect(result.stdout.contains(" 0 failed"), "\(result.stdout)")
    }

    /// The same with the auto-commit at work between FLUSHes (writes spread over four
    /// seconds, a FLUSH after every 32): its lighter barriers make durable what it maps
    /// and leave data overwritten in place to the next FLUSH. Each image also keeps a
    /// random subset of the writes up to the next device flush, as a disk cache may,
    /// which is where a missing barrier would show.
    @Test(.enabled(if: Self.canCutPower))
    func powerCutAmongAutoCommitsLosesNoFlushedWrite() throws {
        let result = try Self.cutPower(["--writes", "240", "--flush-every", "32", "--pace", "4", "--keep-after-flush", "--step", "2"])
        #expect(result.stdout.contains(" 0 failed"), "\(result.stdout)")
        // More commits than client FLUSHes: the auto-commit ran between them.
        func number(before marker: String) -> Int? {
            guard let range = result.stdout.range(of: marker) else { return nil }
            return result.stdout[..<range.lowerBound].split(separator: " ").last.flatMap { Int($0) }
        }
        let (flushes, commits) = (number(before: " client FLUSHes;") ?? 0, number(before: " commits by the server") ?? 0)
        #expect(flushes > 0 && commits > flushes, "\(result.stdout)")
    }

    static var canCutPower: Bool {
        Peers.inCI || (FullFileSystemTests.canMount && Peers.has("python3-nbd", "nbdkit", "nbdfuse"))
    }

    /// Runs tools/powercut.py against this build with `arguments`; root only.
    static func cutPower(_ arguments: [String]) throws -> CLI.Result {
        let tool = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("tools/powercut.py").path
        let result = try Program.run("/usr/bin/python3", [tool, CLI.executable] + arguments, timeout: 600)
        expectSuccess(result, "power-cut images")
        return result
    }

    /// Eight rounds of crash_rounds.py on a new pool with a 64 MiB volume "v".
    static func runRounds(poolSize: String, environment: [String: String] = [:]) throws {
        let directory = TemporaryDirectory("thinbd-crash")
        let pool = directory.path + "/pool"
        expectSuccess(try CLI.run(["create", pool, "--size", poolSize]), "create")
        expectSuccess(try CLI.run(["volume", "create", pool, "v", "--size", "64M"]), "volume create")
        let result = try Peers.python(
            "crash_rounds.py", [CLI.executable, pool, directory.path, "8"], environment: environment, timeout: 600)
        expectSuccess(result, "crash rounds")
        #expect(result.stdout.contains("8 rounds"), "\(result.stdout)")
    }
}
