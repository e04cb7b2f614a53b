import Foundation
import Testing
import TestSupport

/// The surfaces a server exposes besides NBD: the control socket's place and mode, the
/// metrics endpoint's default address, and the warning for plain text on the network.
@Suite(.serialized) struct ExposureTests {
    /// `serve --run true` with `arguments`: its status and standard error.
    func serveOnce(_ served: ServedPool, _ arguments: [String]) throws -> CLI.Result {
        try served.cli(["serve", "POOL", "--socket", served.directory.path + "/once.sock", "--run", "true"] + arguments)
    }

    @Test func controlSocketIsOwnerOnlyAndRefusesUnsafeDirectories() throws {
        let served = try ServedPool(size: "64M")
        try served.start()
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: served.pool + ".control") && Date() < deadline { usleep(20_000) }
        let mode = try #require(try FileManager.default.attributesOfItem(atPath: served.pool + ".control")[.posixPermissions] as? Int)
        #expect(mode & 0o777 == 0o600, "control socket mode \(String(mode, radix: 8))")
        #expect(served.stop() == 0)

        // A directory anyone may write to, without the sticky bit: refused, by the
        // server (an explicit --control fails) and by the CLI.
        let open = served.directory.path + "/open"
        try FileManager.default.createDirectory(atPath: open, withIntermediateDirectories: true)
        #expect(chmod(open, 0o777) == 0)
        let refused = try serveOnce(served, ["--control", open + "/c.sock"])
        #expect(refused.status != 0 && refused.stderr.contains("writable by other users"), "\(refused.stderr)")
        // A socket file there (planted by anyone) is not trusted by the CLI.
        #expect(FileManager.default.createFile(atPath: open + "/planted.sock", contents: Data()))
        let client = try served.cli(["volume", "list", "POOL", "--control", open + "/planted.sock"])
        #expect(client.status != 0 && client.stderr.contains("writable by other users"), "\(client.stderr)")

        // Sticky, like /tmp: allowed, unless the path holds another user's file.
        let sticky = served.directory.path + "/sticky"
        try FileManager.default.createDirectory(atPath: sticky, withIntermediateDirectories: true)
        #expect(chmod(sticky, 0o1777) == 0)
        let allowed = try serveOnce(served, ["--control", sticky + "/c.sock"])
        #expect(allowed.status == 0, "\(allowed.stderr)")
        if geteuid() == 0 {
            #expect(FileManager.default.createFile(atPath: sticky + "/theirs.sock", contents: Data()))
            #expect(chown(sticky + "/theirs.sock", 65534, 65534) == 0)
            let theirs = try serveOnce(served, ["--control", sticky + "/theirs.sock"])
            #expect(theirs.status != 0 && theirs.stderr.contains("belongs to another user"), "\(theirs.stderr)")
        }
    }

    @Test func metricsDefaultToLoopbackAndPlainNetworkListenersAreWarnedAbout() throws {
        let served = try ServedPool(size: "64M")
        let port = try TLSTests.freePort()
        let metricsPort = try TLSTests.freePort()
        // The announcement names where metrics went: a bare port is loopback.
        let announced = try serveOnce(served, ["--metrics", String(metricsPort), "--json", "--no-control"])
        #expect(announced.status == 0 && announced.stdout.contains("http://127.0.0.1:\(metricsPort)/metrics"), "\(announced.stdout)\(announced.stderr)")

        let plain = try serveOnce(served, ["--listen", "0.0.0.0:\(port)", "--no-control"])
        #expect(plain.status == 0 && plain.stderr.contains("without --tls require"), "\(plain.stderr)")
        let local = try serveOnce(served, ["--listen", "127.0.0.1:\(port)", "--no-control"])
        #expect(local.status == 0 && !local.stderr.contains("warning: listening"), "\(local.stderr)")
        let wideMetrics = try serveOnce(served, ["--metrics", "0.0.0.0:\(metricsPort)", "--no-control"])
        #expect(wideMetrics.stderr.contains("can be read from other hosts"), "\(wideMetrics.stderr)")
        // Credentials without --tls, or --tls without credentials, are usage errors.
        let noMode = try serveOnce(served, ["--tls-psk", "/nonexistent"])
        #expect(noMode.status != 0 && noMode.stderr.contains("--tls is off"), "\(noMode.stderr)")
        let noCredentials = try serveOnce(served, ["--tls", "require"])
        #expect(noCredentials.status != 0 && noCredentials.stderr.contains("needs --tls-certificates"), "\(noCredentials.stderr)")
        let missing = try serveOnce(served, ["--tls", "on", "--tls-certificates", served.directory.path + "/none"])
        #expect(missing.status != 0 && missing.stderr.contains("server-cert.pem does not exist"), "\(missing.stderr)")
    }
}
