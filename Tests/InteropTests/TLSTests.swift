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

    /// Serves a pool with one 64 MiB volume `disk` over TLS, runs tls.py in `mode`.
    /// Returns what the server logged.
    @discardableResult
    func serveAndCheck(_ mode: String, _ tlsArguments: (String) -> [String]) throws -> String {
        let served = try ServedPool(size: "1G")
        try served.createVolume("disk", size: "64M")
        let credentials = served.directory.path + "/tls"
        expectSuccess(try Program.run("/bin/sh", ["\(Peers.scripts)/tlscerts.sh", credentials]), "making test certificates")
        let port = try Self.freePort()
        try served.start(["--listen", "127.0.0.1:\(port)"] + tlsArguments(credentials))
        expectSuccess(try Peers.python("tls.py", [mode, served.socket, String(port), credentials]), "TLS (\(mode))")
        #expect(served.stop() == 0)
        #expect(!served.stderr.contains("warning: listening"), "\(served.stderr)")
        return served.stderr
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "nbdinfo", "nbdcopy", "qemu-img", "openssl")))
    func x509RequiredWithClientCertificates() throws {
        let log = try serveAndCheck("x509") { ["--tls", "require", "--tls-certificates", $0 + "/server", "--tls-verify-peer"] }
        // The revoked client passed the CA check in the TLS handshake; the CRL stopped it.
        #expect(log.contains("the client's certificate is revoked (ca-crl.pem)"), "\(log)")
    }

    @Test(.enabled(if: Peers.need("python3-nbd", "nbdinfo", "nbdcopy", "qemu-img", "openssl")))
    func preSharedKeysOffered() throws {
        try serveAndCheck("psk") { ["--tls", "on", "--tls-psk", $0 + "/keys.psk"] }
    }
}
