import Foundation
import Testing
import TestSupport
import ThinFormat
import ThinPool

/// A pool whose metadata is damaged in a way its checksums cannot see, served to real
/// clients: the damaged range fails, everything else is served, and the pool goes into
/// fail mode, visible in `info`, the metrics and the log, and flagged on disk.
@Suite struct DamageTests {
    static let blockSize = 64 << 10

    /// Writes the volumes with the library, then rewrites bad's mapping leaf so that its
    /// block 1 maps far past the pool, and seals the block again with a correct CRC.
    /// Returns the damaged block's number.
    static func prepare(_ path: String) throws -> UInt64 {
        // Once, in CI under full load, an open here failed as in use with no holder
        // named (no other process holds a record lock on it). Other tests in this
        // process start programs all the while, and a child shares this process's open
        // files, the pool's lock among them, until it execs: a likely cause, not a
        // proven one. Such a hold is brief, so the opens wait for it, up to 20 s.
        func open(readOnly: Bool) throws -> Pool {
            let deadline = Date().addingTimeInterval(20)
            while true {
                do {
                    return try Pool.open(path: path, readOnly: readOnly)
                } catch {
                    guard case .inUse(_, holder: nil) = error, Date() < deadline else { throw error }
                    usleep(20_000)
                }
            }
        }
        let pool = try open(readOnly: false)
        func fill(_ name: String, blocks: Int) throws {
            let id = try pool.volumeID(name)
            for i in 0..<blocks {
                let data = [UInt8](repeating: UInt8(i + 1), count: blockSize)
                try data.withUnsafeBytes { try pool.write(id, at: UInt64(i * blockSize), from: $0) }
            }
        }
        _ = try pool.createVolume("good", size: 8 << 20)
        try fill("good", blocks: 16)
        try pool.commit()
        let before = Set(pool.metadataBlocksInUse())
        _ = try pool.createVolume("bad", size: 8 << 20)
        try fill("bad", blocks: 3)
        try pool.close()
        let reopened = try open(readOnly: true)
        let added = Set(reopened.metadataBlocksInUse()).subtracting(before)
        try reopened.close()

        let file = try #require(FileHandle(forUpdatingAtPath: path))
        defer { try? file.close() }
        func page(_ block: UInt64) throws -> [UInt8] {
            try file.seek(toOffset: block * 4096)
            return [UInt8](try file.read(upToCount: 4096) ?? Data())
        }
        let leaves = try added.filter { block in
            let bytes = try page(block)
            return UInt16(bytes[8]) | UInt16(bytes[9]) << 8 == BlockType.mappingNode.rawValue && bytes[10] == 0 && bytes[11] == 0
        }
        let leaf = try #require(leaves.count == 1 ? leaves.first : nil, "bad's mapping leaves: \(leaves)")
        var bytes = try page(leaf)
        let value = 32 + 8 * NodeView.capacity + 8  // entry 1's data block
        for i in 0..<8 { bytes[value + i] = UInt8(truncatingIfNeeded: UInt64(1 << 40) >> UInt64(8 * i)) }
        let crc = CRC32C.checksum(Array(bytes[4...]))
        for i in 0..<4 { bytes[i] = UInt8(truncatingIfNeeded: crc >> UInt32(8 * i)) }
        try file.seek(toOffset: leaf * 4096)
        try file.write(contentsOf: Data(bytes))
        try file.synchronize()
        return leaf
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "qemu-io")))
    func damagedMappingLeafIsContainedWhileServed() throws {
        let served = try ServedPool(size: "64M")
        let leaf = try Self.prepare(served.pool)
        // The offline check sees it (the leaf is not read at open).
        let checked = try served.cli(["check", "POOL"])
        #expect(checked.status != 0 && checked.stdout.contains("mapping to data block 1099511627776, beyond the pool"), "\(checked.stdout)\(checked.stderr)")

        try served.start(["--metrics", "127.0.0.1:0"])
        expectSuccess(try Peers.python("damaged.py", [served.pool, served.socket]), "damaged pool served")
        // Another client, in fail mode: qemu-io reads the undamaged block 0 (its pattern)
        // and gets EIO for block 1.
        let qemuIO = Peers.path("qemu-io")
        let good = try Program.run(qemuIO, ["-r", "-f", "raw", "-c", "read -P 1 0 64k", served.uri("bad")])
        #expect(
            good.status == 0 && good.stdout.contains("read 65536/65536") && !good.stdout.contains("Pattern verification failed"),
            "\(good.stdout)\(good.stderr)")
        let bad = try Program.run(qemuIO, ["-r", "-f", "raw", "-c", "read 64k 64k", served.uri("bad")])
        #expect((bad.stdout + bad.stderr).contains("Input/output error"), "\(bad.stdout)\(bad.stderr)")
        #expect(served.stop() == 0)
        let logged = served.stderr.components(separatedBy: "pool damaged").count - 1
        #expect(logged == 1, "logged \(logged) times: \(served.stderr)")
        #expect(served.stderr.contains("corrupt block \(leaf)"), "\(served.stderr)")

        // Flagged on disk: serving it read-write again needs a repair or --force.
        let again = try served.cli(["serve", "POOL", "--socket", served.socket + "2", "--run", "true"])
        #expect(again.status != 0 && again.stderr.contains("check --repair"), "\(again.stdout)\(again.stderr)")
        let info = try jsonObject(try served.cli(["info", "POOL", "--json"]))
        #expect(info["state"] as? String == "needs-check", "\(info)")
        let readOnly = try served.cli(["serve", "POOL", "--read-only", "--socket", served.socket + "3", "--run", "true"])
        #expect(readOnly.status == 0, "\(readOnly.stderr)")
    }
}
