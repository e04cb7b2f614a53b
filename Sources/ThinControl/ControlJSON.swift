import FoundationEssentials

/// How the control protocol and `--json` write JSON: FoundationEssentials' `JSONEncoder`
/// with keys sorted (its output is then the same every time) and `/` left unescaped.
/// Strings escape `"`, `\` and control characters; everything else is written as UTF-8.
public enum ControlJSON {
    /// One compact line (without its newline): requests and replies on the control
    /// socket, `serve --json`.
    public static func line(_ value: some Encodable) -> String {
        encode(value, [.sortedKeys, .withoutEscapingSlashes])
    }

    /// Indented two spaces a level, for people and scripts: what `--json` prints.
    public static func pretty(_ value: some Encodable) -> String {
        encode(value, [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
    }

    private static func encode(_ value: some Encodable, _ formatting: JSONEncoder.OutputFormatting) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = formatting
        do {
            return String(decoding: try encoder.encode(value), as: UTF8.self)
        } catch {
            // Messages hold strings, whole numbers, booleans, null, arrays and objects,
            // all of which always encode.
            preconditionFailure("a control message did not encode: \(error)")
        }
    }

    /// Why a text could not be read as the message expected, for error messages.
    static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "\(error)" }
        switch error {
        case .dataCorrupted(let context) where context.codingPath.isEmpty:
            return "malformed JSON (\(context.debugDescription))"
        case .dataCorrupted(let context):
            return "\(path(context.codingPath)): \(context.debugDescription)"
        case .keyNotFound(let key, let context):
            return "\(path(context.codingPath + [key])) is missing"
        case .typeMismatch(let type, let context), .valueNotFound(let type, let context):
            return "\(path(context.codingPath)) is not \(type)"
        @unknown default:
            return "\(error)"
        }
    }

    /// `"result.volumes[0].size"`-like, for a coding path.
    private static func path(_ keys: [any CodingKey]) -> String {
        var text = ""
        for key in keys {
            if let index = key.intValue {
                text += "[\(index)]"
            } else {
                text += (text.isEmpty ? "" : ".") + key.stringValue
            }
        }
        return text.isEmpty ? "the message" : "\"" + text + "\""
    }
}
