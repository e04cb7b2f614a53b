/// Volume and snapshot naming rules. A snapshot is named `VOLUME@SNAPSHOT`; export
/// names are exactly these names.
public enum VolumeName {
    /// Checks a plain name (a volume, or one side of `@`).
    public static func validate(_ name: Substring) -> String? {
        if name.isEmpty { return "name is empty" }
        if name.utf8.count > 128 { return "longer than 128 bytes" }
        if name.hasPrefix("-") { return "starts with '-'" }
        for scalar in name.unicodeScalars {
            if scalar.value < 0x20 || scalar.value == 0x7F { return "contains a control character" }
            if "@/\\ \"'".unicodeScalars.contains(scalar) { return "contains '\(scalar)'" }
        }
        return nil
    }

    /// Splits `VOL@SNAP` into its parts; nil for a plain name.
    public static func splitSnapshot(_ name: String) -> (volume: Substring, snapshot: Substring)? {
        guard let at = name.firstIndex(of: "@") else { return nil }
        return (name[..<at], name[name.index(after: at)...])
    }
}
