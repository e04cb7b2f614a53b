/// Pre-shared keys in psktool's format (what qemu, nbdkit and libnbd read): one
/// `identity:hexkey` per line. Blank lines are skipped.
public struct PSKKeys: Sendable, Equatable {
    /// Key bytes by identity, in file order for the first identity a client uses.
    public private(set) var keys: [String: [UInt8]] = [:]
    public private(set) var identities: [String] = []

    /// The longest identity TLS carries (RFC 4279) and the longest key BoringSSL takes.
    public static let maximumIdentityBytes = 128
    public static let maximumKeyBytes = 256

    /// Parses a key file's contents; `source` names it in errors.
    /// Cost: O(file). Nothing from the file is trusted: every line is checked.
    public init(parsing bytes: [UInt8], source: String) throws(NBDTLSError) {
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw NBDTLSError("\(source): not UTF-8 text")
        }
        var lineNumber = 0
        // `isNewline` takes "\r\n" (one Character) as well as "\n".
        for line in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline) {
            lineNumber += 1
            if line.allSatisfy({ $0 == " " || $0 == "\t" }) { continue }
            let at = "\(source) line \(lineNumber)"
            guard let colon = line.lastIndex(of: ":") else {
                throw NBDTLSError("\(at): expected IDENTITY:HEXKEY")
            }
            let identity = String(line[..<colon])
            let hex = line[line.index(after: colon)...]
            guard !identity.isEmpty, identity.utf8.count <= Self.maximumIdentityBytes,
                !identity.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F })
            else {
                throw NBDTLSError("\(at): the identity must be 1 to \(Self.maximumIdentityBytes) bytes without control characters")
            }
            guard let key = Self.decodeHex(hex), !key.isEmpty, key.count <= Self.maximumKeyBytes else {
                throw NBDTLSError("\(at): the key must be 1 to \(Self.maximumKeyBytes) bytes written as an even number of hex digits")
            }
            guard keys[identity] == nil else { throw NBDTLSError("\(at): identity '\(identity)' appears twice") }
            keys[identity] = key
            identities.append(identity)
        }
        guard !identities.isEmpty else { throw NBDTLSError("\(source): no keys (expected IDENTITY:HEXKEY lines)") }
    }

    static func decodeHex(_ text: Substring) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        var index = 0
        while index < digits.count {
            guard let high = hexValue(digits[index]), let low = hexValue(digits[index + 1]) else { return nil }
            bytes.append(high << 4 | low)
            index += 2
        }
        return bytes
    }

    private static func hexValue(_ digit: UInt8) -> UInt8? {
        switch digit {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): digit - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}

/// A TLS set-up problem: unreadable or malformed credentials, a bad option.
public struct NBDTLSError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}
