import Foundation
import Testing
import TestSupport

/// TLS with real clients (nbdinfo, nbdcopy, qemu-img, libnbd) over TCP and a Unix socket:
/// X.509 with client certificates under --tls require, and pre-shared keys under --tls on.
/// The checks themselves are in scripts/tls.py.
@Suite(.serialized) struct TLSTests {
    /// A TCP port nobody listens on now (the kernel's pick, released at once).
    static func freePort() throws -> Int {
        let result = try Program.run("/usr/bin/python3", ["-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"])
        guard let port = Int(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw FixtureError("no free port: \(result.stderr)")
        }
        return port
    }

    /// Serves a pool with one 64 MiB volume `disk` over TLS, runs tls.py in `mode`, then
    /// thinbd's own client: `import` from the nbds:// URI into another pool and `export`
    /// through the server, with `clientArguments`; both copies must match. Returns what
    /// the server logged.
    @discardableResult
    func serveAndCheck(
        _ mode: String, _ tlsArguments: (String) -> [String], client clientArguments: (String) -> [String],
        refusedClients: (String) -> [[String]]
    ) throws -> String {
        let served = try ServedPool(size: "1G")
        try served.createVolume("disk", size: "64M")
        let credentials = served.directory.path + "/tls"
        expectSuccess(try Program.run("/bin/sh", ["\(Peers.scripts)/tlscerts.sh", credentials]), "making test certificates")
        let port = try Self.freePort()
        try served.start(["--listen", "127.0.0.1:\(port)"] + tlsArguments(credentials))
        expectSuccess(try Peers.python("tls.py", [mode, served.socket, String(port), credentials]), "TLS (\(mode))")

        let other = served.directory.path + "/other.pool"
        expectSuccess(try CLI.run(["create", other, "--size", "1G"]), "create")
        let uri = "nbds://localhost:\(port)/disk"
        expectSuccess(try CLI.run(["import", other, "copy", uri] + clientArguments(credentials)), "thinbd import \(uri)")
        let exported = served.directory.path + "/exported.raw"
        let copied = served.directory.path + "/copied.raw"
        expectSuccess(try served.cli(["export", "POOL", "disk", exported] + clientArguments(credentials)), "thinbd export through a TLS server")
        expectSuccess(try CLI.run(["export", other, "copy", copied]), "export of the imported copy")
        let (a, b) = (FileManager.default.contents(atPath: exported), FileManager.default.contents(atPath: copied))
        #expect(a != nil && a == b && a?.count == 64 << 20, "the TLS import and export differ")
        // Without credentials, or with wrong ones, the client refuses or is refused.
        let bare = try CLI.run(["import", other, "bare", uri])
        #expect(bare.status != 0 && bare.stderr.contains("needs TLS credentials"), "\(bare.stderr)")
        for arguments in refusedClients(credentials) {
            let refused = try CLI.run(["import", other, "refused", uri] + arguments)
            #expect(refused.status != 0 && refused.stderr.contains("TLS handshake failed"), "\(arguments): \(refused.stderr)")
        }
        #expect(served.stop() == 0)
        #expect(!served.stderr.contains("warning: listening"), "\(served.stderr)")
        return served.stderr
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "nbdinfo", "nbdcopy", "qemu-img", "openssl")))
    func x509RequiredWithClientCertificates() throws {
        let log = try serveAndCheck(
            "x509", { ["--tls", "require", "--tls-certificates", $0 + "/server", "--tls-verify-peer"] },
            client: { ["--tls-certificates", $0 + "/client"] },
            // A server certificate from another CA (the client trusts only "other"), and
            // a client without a certificate of its own.
            refusedClients: { [["--tls-certificates", $0 + "/wrongca"], ["--tls-certificates", $0 + "/anon"]] })
        // The revoked client passed the CA check in the TLS handshake; the CRL stopped it.
        #expect(log.contains("the client's certificate is revoked (ca-crl.pem)"), "\(log)")
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "nbdinfo", "nbdcopy", "qemu-img", "openssl")))
    func preSharedKeysOffered() throws {
        try serveAndCheck(
            "psk", { ["--tls", "on", "--tls-psk", $0 + "/keys.psk"] },
            client: { ["--tls-psk", $0 + "/keys.psk", "--tls-username", "bob"] },
            refusedClients: { [["--tls-psk", $0 + "/wrong.psk"]] })
    }
}
