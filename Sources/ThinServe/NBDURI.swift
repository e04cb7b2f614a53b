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

    public static func tcp(host: String, port: Int, export: String?) -> String {
        let shownHost = host.contains(":") ? "[\(host)]" : host
        let portPart = port == 10809 ? "" : ":\(port)"
        return "nbd://\(shownHost)\(portPart)" + (export.map { "/" + encode($0) } ?? "")
    }

    public static func unix(socket: String, export: String?) -> String {
        "nbd+unix:///" + (export.map { encode($0) } ?? "") + "?socket=" + encode(socket, keepSlash: true)
    }
}
