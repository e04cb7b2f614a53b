import ThinPool
import ArgumentParser

/// A size argument: bytes, or a number with K, M, G, T or P (powers of 1024), optionally
/// followed by "iB" or "B": `10G`, `512K`, `1.5T`, `65536`.
public struct ByteSize: ExpressibleByArgument, Sendable, Equatable {
    public var bytes: UInt64

    public init(bytes: UInt64) { self.bytes = bytes }

    public init?(argument: String) {
        guard let bytes = Self.parse(argument) else { return nil }
        self.bytes = bytes
    }

    /// How `--help` shows a default: in the largest unit that divides it (`64K`).
    public var defaultValueDescription: String {
        for (unit, shift) in [("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)] as [(String, UInt64)]
        where bytes != 0 && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(unit)"
        }
        return "\(bytes)"
    }

    public static func parse(_ text: String) -> UInt64? {
        var s = text.trimmingCharacters(in: " ").uppercased()
        for suffix in ["IB", "B"] where s.hasSuffix(suffix) && s.count > suffix.count {
            s.removeLast(suffix.count)
            break
        }
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50]
        var multiplier: UInt64 = 1
        if let last = s.last, let unit = units[last] {
            multiplier = unit
            s.removeLast()
        }
        guard !s.isEmpty else { return nil }
        if let whole = UInt64(s) {
            let (value, overflow) = whole.multipliedReportingOverflow(by: multiplier)
            return overflow ? nil : value
        }
        // Fractions like 1.5G: exact in binary units for the sizes people type.
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, multiplier > 1, let whole = UInt64(parts[0].isEmpty ? "0" : parts[0]),
            let fraction = UInt64(parts[1]), parts[1].count <= 6
        else { return nil }
        var scale: UInt64 = 1
        for _ in 0..<parts[1].count { scale *= 10 }
        let (wholeBytes, o1) = whole.multipliedReportingOverflow(by: multiplier)
        guard !o1 else { return nil }
        return wholeBytes + fraction * multiplier / scale
    }

    public static var defaultCompletionKind: CompletionKind { .default }
}

extension String {
    func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set { s.removeFirst() }
        while s.last == set { s.removeLast() }
        return String(s)
    }
}

