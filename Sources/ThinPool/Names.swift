import ThinFormat

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

extension VolumeRecord {
    /// What is wrong with a record read from disk, judged on its own (nil: nothing):
    /// an id of 0 or past the pool's next id, a size outside 1 byte ... 1 EiB, more
    /// mapped blocks than the size holds, unknown flag bits, or a name the naming rules
    /// refuse (a snapshot's is `VOLUME@SNAPSHOT`, a volume's has no `@`). A CRC only
    /// proves some writer wrote the block, so open and `check` both ask this first; with
    /// it answered, sizes and counts from the record cannot overflow later arithmetic.
    func problem(blockSize: UInt64, nextVolumeID: UInt64) -> String? {
        if id == 0 || id >= nextVolumeID { return "volume id \(id) is outside 1..<\(nextVolumeID)" }
        if virtualSize == 0 || virtualSize > Pool.maxVolumeSize { return "size \(virtualSize) is outside 1 byte ... 1 EiB" }
        let blocks = virtualSize / blockSize + (virtualSize % blockSize == 0 ? 0 : 1)
        if mappedBlocks > blocks { return "\(mappedBlocks) mapped blocks, more than its size holds (\(blocks))" }
        if flags & ~Self.knownFlags != 0 { return "unknown flags \(flags)" }
        if let receive, receive.appliedUpTo > virtualSize { return "a receive applied up to \(receive.appliedUpTo), past its size" }
        let nameProblem: String?
        switch (kind, VolumeName.splitSnapshot(name)) {
        case (.volume, nil): nameProblem = VolumeName.validate(name[...])
        case (.volume, _?): nameProblem = "a volume name with '@'"
        case (.snapshot, nil): nameProblem = "a snapshot name without '@'"
        case (.snapshot, let (volume, snapshot)?): nameProblem = VolumeName.validate(volume) ?? VolumeName.validate(snapshot)
        }
        if let nameProblem { return "name \(String(reflecting: name)): \(nameProblem)" }
        return nil
    }
}

extension VolumeRecord {
    /// Decodes a record block (its header already validated) and applies `problem`:
    /// what open and `check` both use, so they refuse the same records.
    static func read(
        _ bytes: UnsafeMutableRawBufferPointer, blockSize: UInt64, nextVolumeID: UInt64
    ) throws(BlockValidationError) -> VolumeRecord {
        let record = try decode(bytes)
        if let problem = record.problem(blockSize: blockSize, nextVolumeID: nextVolumeID) { throw .badContents(problem) }
        return record
    }
}
