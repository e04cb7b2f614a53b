import Foundation
import NBDTLS
import NIOSSL
import Testing

@Suite struct PSKKeysTests {
    func parse(_ text: String) throws(NBDTLSError) -> PSKKeys {
        try PSKKeys(parsing: Array(text.utf8), source: "keys.psk")
    }

    @Test func readsPsktoolFiles() throws {
        let keys = try parse("alice:00ff10\r\n\n  \nbob:DEADbeef\n")
        #expect(keys.identities == ["alice", "bob"])
        #expect(keys.keys["alice"] == [0x00, 0xFF, 0x10])
        #expect(keys.keys["bob"] == [0xDE, 0xAD, 0xBE, 0xEF])
        // The key is after the last colon, so an identity may hold colons.
        #expect(try parse("host:port:0102").keys["host:port"] == [1, 2])
    }

    @Test func refusesWhatIsNotAKeyFile() {
        let bad: [(String, String)] = [
            ("alice", "expected IDENTITY:HEXKEY"),
            ("alice:abc", "hex digits"),
            ("alice:zz", "hex digits"),
            ("alice:", "hex digits"),
            (":0102", "identity must be"),
            ("a\u{1}b:0102", "identity must be"),
            (String(repeating: "x", count: 129) + ":0102", "identity must be"),
            ("alice:" + String(repeating: "00", count: 257), "hex digits"),
            ("alice:01\nalice:02", "appears twice"),
            ("\n\n", "no keys"),
        ]
        for (text, reason) in bad {
            #expect(throws: NBDTLSError.self, "\(text)") { try parse(text) }
            do {
                _ = try parse(text)
            } catch {
                #expect(error.description.contains(reason) && error.description.hasPrefix("keys.psk"), "\(text): \(error)")
            }
        }
        #expect(throws: NBDTLSError.self) { try PSKKeys(parsing: [0xFF, 0xFE, 0x3A, 0x30], source: "k") }
    }
}

@Suite struct RevocationListTests {
    func der(_ pem: String) throws -> [UInt8] {
        try NIOSSLCertificate(bytes: Array(pem.utf8), format: .pem).toDERBytes()
    }

    @Test func revokesExactlyTheListedCertificate() throws {
        let list = try RevocationList(pem: Fixtures.crl, source: "ca-crl.pem")
        #expect(list.revokes(certificateDER: try der(Fixtures.revokedCertificate)))
        #expect(!list.revokes(certificateDER: try der(Fixtures.goodCertificate)))
        // Another CA's certificate is not on this CA's list, whatever its serial.
        #expect(!list.revokes(certificateDER: try der(Fixtures.foreignCertificate)))
        // What cannot be parsed is refused.
        #expect(list.revokes(certificateDER: [0x30, 0x03, 0x02, 0x01, 0x01]))
        #expect(list.revokes(certificateDER: []))
    }

    @Test func refusesMalformedLists() {
        for text in ["", "not pem", Fixtures.goodCertificate, "-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----"] {
            #expect(throws: NBDTLSError.self, "\(text.prefix(40))") { try RevocationList(pem: text, source: "ca-crl.pem") }
        }
    }
}

@Suite struct CredentialLoadingTests {
    /// A directory with the given files.
    func directory(_ files: [String: String]) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("thinbd-tls-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        for (name, contents) in files { try contents.write(toFile: path + "/" + name, atomically: true, encoding: .utf8) }
        return path
    }

    @Test func loadsQemuLayoutAndNamesWhatIsMissing() throws {
        let complete = try directory([
            "ca-cert.pem": Fixtures.caCertificate, "server-cert.pem": Fixtures.serverCertificate,
            "server-key.pem": Fixtures.serverKey, "ca-crl.pem": Fixtures.crl,
        ])
        let loaded = try NBDTLSServerCredentials.load(.certificates(directory: complete), verifyPeer: true)
        #expect(loaded.verifiesPeer)
        _ = try NBDTLSClientCredentials.load(.certificates(directory: complete))

        let noKey = try directory(["ca-cert.pem": Fixtures.caCertificate, "server-cert.pem": Fixtures.serverCertificate])
        do {
            _ = try NBDTLSServerCredentials.load(.certificates(directory: noKey), verifyPeer: false)
            Issue.record("loaded without a key")
        } catch {
            #expect(error.description.contains("server-key.pem does not exist"), "\(error)")
        }
        let badCRL = try directory([
            "ca-cert.pem": Fixtures.caCertificate, "server-cert.pem": Fixtures.serverCertificate,
            "server-key.pem": Fixtures.serverKey, "ca-crl.pem": "garbage",
        ])
        #expect(throws: NBDTLSError.self) { try NBDTLSServerCredentials.load(.certificates(directory: badCRL), verifyPeer: true) }
        let swapped = try directory([
            "ca-cert.pem": Fixtures.caCertificate, "server-cert.pem": Fixtures.serverKey, "server-key.pem": Fixtures.serverCertificate,
        ])
        #expect(throws: NBDTLSError.self) { try NBDTLSServerCredentials.load(.certificates(directory: swapped), verifyPeer: false) }
    }

    @Test func pskCredentials() throws {
        let dir = try directory(["keys.psk": "alice:" + String(repeating: "ab", count: 32) + "\n"])
        _ = try NBDTLSServerCredentials.load(.psk(file: dir + "/keys.psk"), verifyPeer: false)
        _ = try NBDTLSClientCredentials.load(.psk(file: dir + "/keys.psk"))
        #expect(throws: NBDTLSError.self) { try NBDTLSServerCredentials.load(.psk(file: dir + "/keys.psk"), verifyPeer: true) }
        #expect(throws: NBDTLSError.self) { try NBDTLSClientCredentials.load(.psk(file: dir + "/keys.psk"), username: "bob") }
        #expect(throws: NBDTLSError.self) { try NBDTLSServerCredentials.load(.psk(file: dir + "/missing.psk"), verifyPeer: false) }
    }
}
