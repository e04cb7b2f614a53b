import Foundation
import Testing
import TestSupport

/// The common real failure: a sparse pool on a host file system that fills up. Needs
/// root (a loop mount of a small ext4 image); on a developer machine without it the test
/// skips, in CI it runs.
@Suite struct FullFileSystemTests {
    static var canMount: Bool { getuid() == 0 && Program.find("mkfs.ext4") != nil && Program.find("mount") != nil }

    @Test(.enabled(if: Peers.inCI || (canMount && Peers.has("python3-nbd"))))
    func fullHostFileSystemGivesENOSPCKeepsThePoolAndRecovers() throws {
        let directory = TemporaryDirectory("thinbd-fullfs")
        let image = directory.path + "/fs.img"
        let mountPoint = directory.path + "/mnt"
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        #expect(truncate(image, 64 << 20) == 0)
        let made = try Program.run(Program.find("mkfs.ext4") ?? "/sbin/mkfs.ext4", ["-q", "-F", image])
        try #require(made.status == 0, "mkfs.ext4: \(made.stderr)")
        let mounted = try Program.run(Program.find("mount") ?? "/bin/mount", ["-o", "loop", image, mountPoint])
        try #require(mounted.status == 0, "mount -o loop: \(mounted.stderr)")
        defer { _ = try? Program.run(Program.find("umount") ?? "/bin/umount", [mountPoint]) }

        // 8 MiB that the test frees later; the pool (256 MiB, 16 MiB of metadata
        // preallocated) and a 200 MiB volume on what is left of about 60 MiB.
        let filler = mountPoint + "/filler"
        #expect(FileManager.default.createFile(atPath: filler, contents: Data(repeating: 0x5A, count: 8 << 20)))
        let served = try ServedPool(size: "256M", poolPath: mountPoint + "/pool")
        try served.createVolume("v", size: "200M")
        try served.start()
        let result = try Peers.python("fullfs.py", [served.pool, served.socket, filler])
        expectSuccess(result, "full file system")
        #expect(served.isRunning, "the server died")
        #expect(served.stop() == 0)
        #expect(!served.stderr.contains("fail mode") && !served.stderr.contains("commit failed"), "\(served.stderr)")

        // After the server: the pool is clean and holds every chunk that was written.
        expectSuccess(try served.cli(["check", "POOL"]), "check after ENOSPC")
        let written = result.stdout.split(separator: "\n").compactMap { line in
            line.hasPrefix("WRITTEN ") ? Int(line.dropFirst("WRITTEN ".count)) : nil
        }.first ?? 0
        #expect(written > 4, "\(result.stdout)")
        let exported = directory.path + "/v.raw"
        expectSuccess(try served.cli(["export", "POOL", "v", exported]), "export")
        let data = try #require(FileManager.default.contents(atPath: exported))
        for i in 0..<written where data[i << 20] != UInt8(i % 250 + 1) || data[(i << 20) + (1 << 20) - 1] != UInt8(i % 250 + 1) {
            Issue.record("chunk \(i) lost after the file system filled")
            break
        }
    }
}
