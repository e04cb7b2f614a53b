import Foundation
import Testing
import TestSupport

/// kill -9 at the process level: the server is killed at random moments while two libnbd
/// connections write and flush; after each, `thinbd check` is clean and every flushed
/// write is there (crash_rounds.py). tools/crash-rounds.sh runs it for longer.
@Suite struct CrashRoundsTests {
    @Test(.enabled(if: Peers.need("python3-nbd")))
    func killNineWhileWritingLosesNoFlushedWrite() throws {
        let directory = TemporaryDirectory("thinbd-crash")
        let pool = directory.path + "/pool"
        expectSuccess(try CLI.run(["create", pool, "--size", "256M"]), "create")
        expectSuccess(try CLI.run(["volume", "create", pool, "v", "--size", "64M"]), "volume create")
        let result = try Peers.python("crash_rounds.py", [CLI.executable, pool, directory.path, "8"], timeout: 600)
        expectSuccess(result, "crash rounds")
        #expect(result.stdout.contains("8 rounds"), "\(result.stdout)")
    }

    /// The same under `--cache writeback` with a snapshot before every round, so each
    /// round's first writes copy shared blocks: the copies go to the file with O_DIRECT,
    /// the rest through the page cache, and the auto-commit and FLUSH make both durable.
    @Test(.enabled(if: Peers.need("python3-nbd")))
    func killNineWhileCopyingUnderWritebackLosesNoFlushedWrite() throws {
        let directory = TemporaryDirectory("thinbd-crash-cow")
        let pool = directory.path + "/pool"
        expectSuccess(try CLI.run(["create", pool, "--size", "512M"]), "create")
        expectSuccess(try CLI.run(["volume", "create", pool, "v", "--size", "64M"]), "volume create")
        let result = try Peers.python(
            "crash_rounds.py", [CLI.executable, pool, directory.path, "8"],
            environment: ["THINBD_CRASH_SNAPSHOTS": "1", "THINBD_CRASH_SERVE_ARGS": "--cache writeback"], timeout: 600)
        expectSuccess(result, "crash rounds")
        #expect(result.stdout.contains("8 rounds"), "\(result.stdout)")
    }
}
