import ArgumentParser
import ThinPool
import ThinSystem

/// The pool file argument every command takes first.
struct PoolArgument: ParsableArguments {
    @Argument(help: "Path of the pool file.")
    var pool: String
}

/// Opens the pool (waiting up to `waitingForLock` seconds while another process holds
/// it), runs `body`, and closes (committing) it. Pool errors are printed as one line on
/// standard error and end the command with exit status 1.
func withPool<T>(_ path: String, readOnly: Bool = false, waitingForLock: Double = 0, _ body: (Pool) throws -> T) throws -> T {
    let pool: Pool
    do {
        pool = try Pool.open(path: path, readOnly: readOnly, waitingForLock: waitingForLock)
    } catch {
        throw fail(error)
    }
    do {
        let result = try body(pool)
        try pool.close()
        return result
    } catch {
        try? pool.close()
        throw fail(error)
    }
}

/// Prints `thinbd: error: MESSAGE` and returns the exit code to throw.
func fail(_ error: Error, code: Int32 = 1) -> ExitCode {
    if let exit = error as? ExitCode { return exit }
    SystemInfo.writeStandardError("thinbd: error: \(error)\n")
    return ExitCode(code)
}

func volumeJSON(_ volume: VolumeInfo) -> JSON {
    .object([
        ("name", .string(volume.name)),
        ("kind", .string(volume.kind.rawValue)),
        ("size", .number(volume.size)),
        ("mapped_bytes", .number(volume.mappedBytes)),
        ("parent", volume.parent.map { .string($0) } ?? .null),
        ("read_only", .bool(volume.isReadOnly)),
        ("created", .number(volume.createdAt)),
    ])
}

/// A usage bar like `[#######.............]`.
func usageBar(used: UInt64, total: UInt64, width: Int = 30) -> String {
    let filled = total == 0 ? 0 : Int((Double(used) / Double(total) * Double(width)).rounded())
    return "[" + String(repeating: "#", count: min(filled, width)) + String(repeating: ".", count: max(0, width - filled)) + "]"
}

func percent(_ used: UInt64, _ total: UInt64) -> String {
    guard total > 0 else { return "0.0%" }
    let tenths = Int((Double(used) / Double(total) * 1000).rounded())
    return "\(tenths / 10).\(tenths % 10)%"
}
