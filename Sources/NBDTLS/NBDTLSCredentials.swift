import NIOCore
import NIOSSL
import ThinSystem

/// Where TLS credentials come from, as qemu-nbd, nbdkit and libnbd take them.
public enum NBDTLSSource: Sendable, Equatable {
    /// A directory in qemu's and nbdkit's layout: `ca-cert.pem`; `server-cert.pem` and
    /// `server-key.pem` for a server, `client-cert.pem` and `client-key.pem` (optional)
    /// for a client; `ca-crl.pem` when it exists.
    case certificates(directory: String)
    /// A key file in psktool's format (`identity:hexkey` lines).
    case psk(file: String)
}

/// What both ends agree on. TLS 1.2 is the floor (the NBD spec's minimum). PSK runs on
/// TLS 1.2 only: BoringSSL's external pre-shared keys do not reach TLS 1.3, and GnuTLS
/// clients (qemu, libnbd) then settle on ECDHE-PSK-CHACHA20-POLY1305.
enum NBDTLSPolicy {
    static let pskCipherSuites =
        "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES128-CBC-SHA:ECDHE-PSK-AES256-CBC-SHA:PSK-AES128-CBC-SHA:PSK-AES256-CBC-SHA"
    /// How long a closing TLS connection waits for the peer's close_notify (qemu never sends one).
    static let shutdownTimeout: TimeAmount = .seconds(1)

    static func file(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    static func readPSK(_ path: String) throws(NBDTLSError) -> PSKKeys {
        let bytes: [UInt8]
        do {
            bytes = try SystemInfo.readSmallFile(path)
        } catch {
            throw NBDTLSError("cannot read the PSK file: \(error)")
        }
        return try PSKKeys(parsing: bytes, source: path)
    }

    static func certificates(_ path: String) throws(NBDTLSError) -> [NIOSSLCertificate] {
        guard SystemInfo.fileExists(path) else { throw NBDTLSError("\(path) does not exist") }
        do {
            let chain = try NIOSSLCertificate.fromPEMFile(path)
            guard !chain.isEmpty else { throw NBDTLSError("\(path) holds no certificate") }
            return chain
        } catch let error as NBDTLSError {
            throw error
        } catch {
            throw NBDTLSError("\(path): not a PEM certificate (\(error))")
        }
    }

    static func privateKey(_ path: String) throws(NBDTLSError) -> NIOSSLPrivateKey {
        guard SystemInfo.fileExists(path) else { throw NBDTLSError("\(path) does not exist") }
        do {
            return try NIOSSLPrivateKey(file: path, format: .pem)
        } catch {
            throw NBDTLSError("\(path): not a PEM private key (\(error))")
        }
    }

    static func context(_ configuration: TLSConfiguration, for what: String) throws(NBDTLSError) -> NIOSSLContext {
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw NBDTLSError("cannot set up TLS with \(what): \(error)")
        }
    }
}

/// A server's TLS credentials, loaded once at start. Loading reads files (blocking);
/// making a handler per connection is cheap and never blocks.
public struct NBDTLSServerCredentials: Sendable {
    /// Clients must present a certificate signed by the CA (`--tls-verify-peer`).
    public let verifiesPeer: Bool
    private let context: NIOSSLContext
    private let revocations: RevocationList?

    public static func load(_ source: NBDTLSSource, verifyPeer: Bool) throws(NBDTLSError) -> NBDTLSServerCredentials {
        var configuration: TLSConfiguration
        var revocations: RevocationList?
        switch source {
        case .certificates(let directory):
            let chain = try NBDTLSPolicy.certificates(NBDTLSPolicy.file(directory, "server-cert.pem"))
            let key = try NBDTLSPolicy.privateKey(NBDTLSPolicy.file(directory, "server-key.pem"))
            configuration = .makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
            let ca = NBDTLSPolicy.file(directory, "ca-cert.pem")
            if verifyPeer {
                let roots = try NBDTLSPolicy.certificates(ca)
                configuration.trustRoots = .certificates(roots)
                configuration.certificateVerification = .noHostnameVerification
                configuration.sendCANameList = true
            }
            let crl = NBDTLSPolicy.file(directory, "ca-crl.pem")
            if SystemInfo.fileExists(crl) {
                let text: [UInt8]
                do {
                    text = try SystemInfo.readSmallFile(crl, limit: 64 << 20)
                } catch {
                    throw NBDTLSError("cannot read \(crl): \(error)")
                }
                revocations = try RevocationList(pem: String(decoding: text, as: UTF8.self), source: crl)
            }
        case .psk(let file):
            guard !verifyPeer else {
                throw NBDTLSError("--tls-verify-peer checks client certificates; with a PSK every client proves the key instead")
            }
            let keys = try NBDTLSPolicy.readPSK(file)
            configuration = .makePreSharedKeyConfiguration()
            configuration.maximumTLSVersion = .tlsv12
            configuration.cipherSuites = NBDTLSPolicy.pskCipherSuites
            configuration.pskServerProvider = { context in
                // An unknown identity fails the handshake (unknown_psk_identity).
                guard let key = keys.keys[context.clientIdentity], key.count <= context.maxPSKLength else {
                    throw NBDTLSError("unknown PSK identity")
                }
                var secret = NIOSSLSecureBytes()
                secret.append(key)
                return PSKServerIdentityResponse(key: secret)
            }
        }
        configuration.minimumTLSVersion = .tlsv12
        configuration.shutdownTimeout = NBDTLSPolicy.shutdownTimeout
        let context = try NBDTLSPolicy.context(configuration, for: "\(source)")
        return NBDTLSServerCredentials(verifiesPeer: verifyPeer, context: context, revocations: revocations)
    }

    /// The handler a connection puts at the front of its pipeline after STARTTLS.
    public func makeHandler() -> NIOSSLServerHandler {
        NIOSSLServerHandler(context: context)
    }

    /// Why a client that finished the TLS handshake must still be refused (its
    /// certificate is on the CRL), or nil. Call on the connection's event loop.
    public func refusal(of handler: NIOSSLServerHandler) -> String? {
        guard verifiesPeer, let revocations else { return nil }
        guard let certificate = handler.peerCertificate else { return "the client presented no certificate" }
        guard let der = try? certificate.toDERBytes(), !revocations.revokes(certificateDER: der) else {
            return "the client's certificate is revoked (ca-crl.pem)"
        }
        return nil
    }
}

/// A client's TLS credentials (`thinbd import` and `export` with `nbds://` URIs).
public struct NBDTLSClientCredentials: Sendable {
    /// Checks the server's name as well as its CA (connections by host name).
    private let verifyingName: NIOSSLContext
    /// Checks only the CA (Unix sockets and IP addresses: no name to check).
    private let verifyingChain: NIOSSLContext

    /// `username` picks the PSK identity (default: the file's first).
    public static func load(_ source: NBDTLSSource, username: String? = nil) throws(NBDTLSError) -> NBDTLSClientCredentials {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        configuration.shutdownTimeout = NBDTLSPolicy.shutdownTimeout
        switch source {
        case .certificates(let directory):
            configuration.trustRoots = .certificates(try NBDTLSPolicy.certificates(NBDTLSPolicy.file(directory, "ca-cert.pem")))
            let certificate = NBDTLSPolicy.file(directory, "client-cert.pem")
            if SystemInfo.fileExists(certificate) {
                configuration.certificateChain = try NBDTLSPolicy.certificates(certificate).map { .certificate($0) }
                configuration.privateKey = .privateKey(try NBDTLSPolicy.privateKey(NBDTLSPolicy.file(directory, "client-key.pem")))
            }
        case .psk(let file):
            let keys = try NBDTLSPolicy.readPSK(file)
            let identity = username ?? keys.identities[0]
            guard let key = keys.keys[identity] else { throw NBDTLSError("\(file) has no key for '\(identity)'") }
            configuration.maximumTLSVersion = .tlsv12
            configuration.cipherSuites = NBDTLSPolicy.pskCipherSuites
            configuration.certificateVerification = .none
            configuration.pskClientProvider = { _ in
                var secret = NIOSSLSecureBytes()
                secret.append(key)
                return PSKClientIdentityResponse(key: secret, identity: identity)
            }
        }
        let verifyingName = try NBDTLSPolicy.context(configuration, for: "\(source)")
        if case .certificates = source { configuration.certificateVerification = .noHostnameVerification }
        let verifyingChain = try NBDTLSPolicy.context(configuration, for: "\(source)")
        return NBDTLSClientCredentials(verifyingName: verifyingName, verifyingChain: verifyingChain)
    }

    /// A handler that starts the TLS handshake as a client. `hostName` is the server's
    /// name to verify (nil for a Unix socket or an IP address: the CA alone is checked).
    public func makeHandler(hostName: String?) throws(NBDTLSError) -> NIOSSLClientHandler {
        do {
            if let hostName { return try NIOSSLClientHandler(context: verifyingName, serverHostname: hostName) }
            return try NIOSSLClientHandler(context: verifyingChain, serverHostname: nil)
        } catch {
            throw NBDTLSError("cannot start TLS: \(error)")
        }
    }
}
