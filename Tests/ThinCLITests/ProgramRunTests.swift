import Foundation
import Testing
import TestSupport

/// The harness that runs servers, scripts and peers for the end-to-end tests: a program
/// that outlives its timeout must not keep the test run waiting.
struct ProgramRunTests {
    /// A shell that starts a long sleep in the background (holding the output pipe) and
    /// waits for it: before, the timeout killed the shell alone, and reading the output
    /// then waited for the orphaned sleep (here 300 s; a `serve --run` script waiting on
    /// nbdfuse once hung a whole CI run).
    @Test func aTimeoutKillsWhatTheProgramStartedSoTheOutputEnds() throws {
        let started = Date()
        let result = try Program.run("/bin/sh", ["-c", "sleep 300 & echo $!; wait"], timeout: 1)
        let elapsed = Date().timeIntervalSince(started)
        // Far below the grandchild's 300 s: the call returned because it was killed.
        #expect(elapsed < 120, "Program.run took \(elapsed) s")
        #expect(result.status == SIGKILL, "status \(result.status)")
        let grandchild = try #require(pid_t(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), "\(result.stdout)")
        // Gone, or a zombie waiting for its new parent to reap it. The output ends when
        // the dying sleep closes its files, a moment before it is done: given 10 s.
        var state = Program.statFields(of: grandchild)?.first
        for _ in 0..<200 where state != nil && state != "Z" {
            Thread.sleep(forTimeInterval: 0.05)
            state = Program.statFields(of: grandchild)?.first
        }
        #expect(state == nil || state == "Z", "the background sleep \(grandchild) is still in state \(state ?? "")")
    }

    @Test func descendantsAreFoundThroughEveryGeneration() throws {
        // sh starts sh, which starts sleep: both are found from the first.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "sh -c 'sleep 30; true' & wait"]
        try process.run()
        defer {
            for pid in [process.processIdentifier] + Program.descendants(of: process.processIdentifier) { kill(pid, SIGKILL) }
            process.waitUntilExit()
        }
        var found: [pid_t] = []
        for _ in 0..<100 where found.count < 2 {
            found = Program.descendants(of: process.processIdentifier)
            Thread.sleep(forTimeInterval: 0.05)
        }
        #expect(found.count == 2, "\(found)")
        let names = found.compactMap { try? String(contentsOfFile: "/proc/\($0)/comm", encoding: .utf8) }
        #expect(names.contains("sleep\n"), "\(names)")
    }
}
