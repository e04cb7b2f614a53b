/// NBD URIs (shared/reference/nbd-uri.md): `nbd://HOST:PORT/EXPORT` and
/// `nbd+unix:///EXPORT?socket=PATH`.
public enum NBDURI {
    static let unreserved = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~@".utf8)

    static func encode(_ text: String, keepSlash: Bool = false) -> String {
        var out = ""
        for byte in text.utf8 {
            if unreserved.contains(byte) || (keepSlash && byte == UInt8(ascii: "/")) {
                out.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                let hex = String(byte, radix: 16, uppercase: true)
                out += "%" + (hex.count == 1 ? "0" : "") + hex
            }
        }
        return out
    }

    /// `tls`: the `nbds` scheme, for a server that requires TLS.
    public static func tcp(host: String, port: Int, export: String?, tls: Bool = false) -> String {
        let shownHost = host.contains(":") ? "[\(host)]" : host
        let portPart = port == 10809 ? "" : ":\(port)"
        return (tls ? "nbds://" : "nbd://") + "\(shownHost)\(portPart)" + (export.map { "/" + encode($0) } ?? "")
    }

    public static func unix(socket: String, export: String?, tls: Bool = false) -> String {
        (tls ? "nbds+unix:///" : "nbd+unix:///") + (export.map { encode($0) } ?? "") + "?socket=" + encode(socket, keepSlash: true)
    }
}

/// Where an NBD URI points: the server's address and the export name.
public struct NBDEndpoint: Equatable, Sendable {
    public enum Address: Equatable, Sendable {
        case tcp(host: String, port: Int)
        case unix(path: String)
    }

    public var address: Address
    public var export: String
    /// The `nbds` schemes: the client must upgrade with STARTTLS and refuses plain text.
    public var requiresTLS = false
    /// libnbd's query parameters `tls-certificates=DIR`, `tls-psk-file=FILE` and
    /// `tls-username=NAME` (a command's own options take precedence).
    public var tlsCertificates: String?
    public var tlsPSKFile: String?
    public var tlsUsername: String?

    /// The name a TLS client checks the server's certificate against: the host of a TCP
    /// address given by name. Nil for IP addresses and Unix sockets (the CA alone).
    public var nameToVerify: String? {
        guard case .tcp(let host, _) = address else { return nil }
        let isIPAddress = host.contains(":") || host.allSatisfy { $0.isNumber || $0 == "." }
        return isIPAddress ? nil : host
    }

    public init(address: Address, export: String, requiresTLS: Bool = false) {
        self.address = address
        self.export = export
        self.requiresTLS = requiresTLS
    }

    /// Parses `nbd[s]://HOST[:PORT][/EXPORT]` (HOST may be `[IPv6]`) and
    /// `nbd[s]+unix:///[EXPORT]?socket=PATH`, with %-escapes and libnbd's `tls-*` query
    /// parameters. Other transports are refused with the reason.
    public init(uri: String) throws(NBDURIError) {
        func decode(_ text: Substring) throws(NBDURIError) -> String {
            var bytes: [UInt8] = []
            var iterator = Array(text.utf8).makeIterator()
            while let byte = iterator.next() {
                guard byte == UInt8(ascii: "%") else {
                    bytes.append(byte)
                    continue
                }
                guard let high = iterator.next(), let low = iterator.next(),
                    let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
                else { throw NBDURIError("bad %-escape in \(uri)") }
                bytes.append(value)
            }
            guard let decoded = String(validating: bytes, as: UTF8.self) else { throw NBDURIError("\(uri) is not UTF-8") }
            return decoded
        }
        guard let colon = uri.firstIndex(of: ":"), uri[colon...].hasPrefix("://") else {
            throw NBDURIError("\(uri) is not an NBD URI (nbd://... or nbd+unix://...)")
        }
        let scheme = uri[..<colon]
        var rest = uri[uri.index(colon, offsetBy: 3)...]
        var query: Substring = ""
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        let authority: Substring
        var path: Substring = ""
        if let slash = rest.firstIndex(of: "/") {
            authority = rest[..<slash]
            path = rest[rest.index(after: slash)...]
        } else {
            authority = rest
        }
        let export = try decode(path)
        var parameters: [String: String] = [:]
        for pair in query.split(separator: "&") {
            let (key, value) = pair.firstIndex(of: "=").map { (pair[..<$0], pair[pair.index(after: $0)...]) } ?? (pair, "")
            parameters[try decode(key)] = try decode(value)
        }
        switch scheme {
        case "nbd", "nbds":
            var host = authority
            var port = 10809
            if host.hasPrefix("["), let close = host.firstIndex(of: "]") {
                let after = host[host.index(after: close)...]
                if after.hasPrefix(":") {
                    guard let p = Int(after.dropFirst()), (1...65535).contains(p) else { throw NBDURIError("bad port in \(uri)") }
                    port = p
                }
                host = host[host.index(after: host.startIndex)..<close]
            } else if let colon = host.lastIndex(of: ":") {
                guard let p = Int(host[host.index(after: colon)...]), (1...65535).contains(p) else { throw NBDURIError("bad port in \(uri)") }
                port = p
                host = host[..<colon]
            }
            if host.isEmpty { host = "localhost" }
            self.init(address: .tcp(host: try decode(host), port: port), export: export, requiresTLS: scheme == "nbds")
        case "nbd+unix", "nbds+unix":
            guard authority.isEmpty else { throw NBDURIError("\(scheme) URIs have no host: \(uri)") }
            guard let socket = parameters["socket"] else { throw NBDURIError("\(uri) has no ?socket=PATH") }
            self.init(address: .unix(path: socket), export: export, requiresTLS: scheme == "nbds+unix")
        default:
            throw NBDURIError("unsupported NBD transport \(scheme):// (use nbd://, nbds://, nbd+unix:// or nbds+unix://)")
        }
        tlsCertificates = parameters["tls-certificates"]
        tlsPSKFile = parameters["tls-psk-file"]
        tlsUsername = parameters["tls-username"]
    }
}

public struct NBDURIError: Error, Equatable, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
