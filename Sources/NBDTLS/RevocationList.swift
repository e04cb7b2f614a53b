import SwiftASN1

/// Certificate revocation lists (`ca-crl.pem`): per issuer, the serial numbers it revoked.
///
/// swift-nio-ssl does not check CRLs, so the server does: once a client's certificate
/// has passed the TLS handshake (which checked it against the CA), its issuer and serial
/// are looked up here, and a revoked one ends the connection before any NBD byte is
/// read over TLS. The file is configuration placed by the administrator beside the CA
/// certificate, trusted as that is: its signature is not verified here.
public struct RevocationList: Sendable, Equatable {
    /// Revoked serial numbers (big-endian, without leading zero bytes) by the issuer's
    /// DER-encoded name.
    public private(set) var revoked: [[UInt8]: Set<[UInt8]>] = [:]

    /// Parses one or more PEM `X509 CRL` blocks. Cost: O(file).
    public init(pem text: String, source: String) throws(NBDTLSError) {
        let documents: [PEMDocument]
        do {
            documents = try PEMDocument.parseMultiple(pemString: text)
        } catch {
            throw NBDTLSError("\(source): not a PEM file (\(error))")
        }
        let lists = documents.filter { $0.discriminator == "X509 CRL" }
        guard !lists.isEmpty else { throw NBDTLSError("\(source): no X509 CRL block") }
        for document in lists {
            do {
                let (issuer, serials) = try Self.parseList(document.derBytes)
                revoked[issuer, default: []].formUnion(serials)
            } catch {
                throw NBDTLSError("\(source): malformed CRL (\(error))")
            }
        }
    }

    /// Whether the certificate (DER) is revoked by a list of its issuer.
    /// A certificate that cannot be parsed counts as revoked: it is refused.
    public func revokes(certificateDER der: [UInt8]) -> Bool {
        guard let (issuer, serial) = try? Self.issuerAndSerial(ofCertificate: der) else { return true }
        return revoked[issuer]?.contains(serial) ?? false
    }

    struct Malformed: Error, CustomStringConvertible {
        var description: String
    }

    /// CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signature }
    /// TBSCertList ::= SEQUENCE { version INTEGER OPTIONAL, signature, issuer Name,
    ///   thisUpdate, nextUpdate OPTIONAL, revokedCertificates SEQUENCE OF SEQUENCE
    ///   { userCertificate INTEGER, revocationDate, extensions OPTIONAL } OPTIONAL,
    ///   [0] extensions OPTIONAL }
    static func parseList(_ der: [UInt8]) throws -> (issuer: [UInt8], serials: Set<[UInt8]>) {
        let list = try children(of: try DER.parse(der), "CertificateList")
        guard let tbs = list.first else { throw Malformed(description: "empty CertificateList") }
        var fields = try children(of: tbs, "TBSCertList")[...]
        if fields.first?.identifier == .integer { fields = fields.dropFirst() }  // version
        guard fields.count >= 3 else { throw Malformed(description: "TBSCertList is too short") }
        let issuer = fields[fields.startIndex + 1]
        guard issuer.identifier == .sequence else { throw Malformed(description: "the issuer is not a Name") }
        var serials = Set<[UInt8]>()
        // After thisUpdate: nextUpdate (a time) may come, then the revoked list (a SEQUENCE).
        for field in fields.dropFirst(3) where field.identifier == .sequence {
            for entry in try children(of: field, "revokedCertificates") {
                guard let serial = try children(of: entry, "revoked entry").first, serial.identifier == .integer,
                    case .primitive(let bytes) = serial.content
                else { throw Malformed(description: "a revoked entry without a serial number") }
                serials.insert(normalizedSerial(bytes))
            }
            break
        }
        return (Array(issuer.encodedBytes), serials)
    }

    /// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    ///   serialNumber INTEGER, signature, issuer Name, ... }, ... }
    static func issuerAndSerial(ofCertificate der: [UInt8]) throws -> (issuer: [UInt8], serial: [UInt8]) {
        let certificate = try children(of: try DER.parse(der), "Certificate")
        guard let tbs = certificate.first else { throw Malformed(description: "empty Certificate") }
        var fields = try children(of: tbs, "TBSCertificate")[...]
        if let first = fields.first, first.identifier.tagClass == .contextSpecific { fields = fields.dropFirst() }
        guard fields.count >= 3, fields[fields.startIndex].identifier == .integer,
            case .primitive(let serial) = fields[fields.startIndex].content,
            fields[fields.startIndex + 2].identifier == .sequence
        else { throw Malformed(description: "TBSCertificate lacks a serial number or issuer") }
        return (Array(fields[fields.startIndex + 2].encodedBytes), normalizedSerial(serial))
    }

    private static func children(of node: ASN1Node, _ what: String) throws -> [ASN1Node] {
        guard node.identifier == .sequence, case .constructed(let nodes) = node.content else {
            throw Malformed(description: "\(what) is not a SEQUENCE")
        }
        return Array(nodes)
    }

    /// A serial's bytes without the leading zeros DER adds to keep it positive.
    static func normalizedSerial(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
        let trimmed = bytes.drop { $0 == 0 }
        return trimmed.isEmpty ? [0] : Array(trimmed)
    }
}
