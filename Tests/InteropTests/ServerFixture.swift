import Foundation
import Testing
import TestSupport

/// Real NBD clients the interop tests drive. On a developer machine a missing client
/// skips its tests; in CI (CI=true) it fails them.
enum Peers {
    static let inCI = ProcessInfo.processInfo.environment["CI"] == "true"

    static func has(_ names: String...) -> Bool {
        names.allSatisfy { name in
            if name == "python3-nbd" {
                return FileManager.default.fileExists(atPath: "/usr/bin/python3")
                    && (try? Program.run("/usr/bin/python3", ["-c", "import nbd"]).status) == 0
            }
            return Program.find(name) != nil
        }
    }

    /// The trait for a test that needs these clients.
    static func need(_ names: String...) -> Bool {
        inCI || names.allSatisfy { has($0) }
    }

    static func path(_ name: String) -> String {
        if let found = Program.find(name) { return found }
        Issue.record("interop peer \(name) is not installed (tools/ensure-deps.sh test installs it)")
        return "/nonexistent/\(name)"
    }

    static let scripts = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("scripts").path

    /// Runs one of the Python scripts with /usr/bin/python3 (python3-libnbd).
    static func python(
        _ script: String, _ arguments: [String], environment: [String: String] = [:], timeout: TimeInterval = 300
    ) throws -> CLI.Result {
        try Program.run("/usr/bin/python3", ["\(scripts)/\(script)"] + arguments, environment: environment, timeout: timeout)
    }
}

/// A pool served by `thinbd serve` on a Unix socket in a private directory.
///
/// The server runs in captive mode with `--run 'cat >/dev/null'` reading a pipe this
/// fixture holds: closing the pipe (or this test process dying) ends `cat`, and the
/// server stops by itself. `stop()` closes the pipe, waits, and only if needed signals
/// the server by its own pid.
final class ServedPool {
    let directory = TemporaryDirectory("thinbd-interop")
    let pool: String
    let socket: String
    private var process: Process?
    private var control: Pipe?
    private(set) var stderr = ""
    private var errPipe: Pipe?
    /// Standard error, read as it comes: a server that logs a lot must never block on
    /// a full pipe.
    private let errBytes = LockedBytes()
    private var errReader: Thread?

    /// `poolPath`: where the pool file goes (default: in the fixture's own directory).
    init(size: String = "2G", blockSize: String = "64K", poolPath: String? = nil) throws {
        pool = poolPath ?? directory.path + "/pool"
        socket = directory.path + "/nbd.sock"
        let created = try CLI.run(["create", pool, "--size", size, "--block-size", blockSize])
        guard created.status == 0 else { throw FixtureError("create failed: \(created.stderr)") }
    }

    func cli(_ arguments: [String]) throws -> CLI.Result {
        try CLI.run(arguments.map { $0 == "POOL" ? pool : $0 })
    }

    func createVolume(_ name: String, size: String) throws {
        let result = try CLI.run(["volume", "create", pool, name, "--size", size])
        guard result.status == 0 else { throw FixtureError("volume create failed: \(result.stderr)") }
    }

    func uri(_ export: String) -> String {
        "nbd+unix:///\(export)?socket=\(socket)"
    }

    /// Starts serving; returns when the socket accepts connections.
    /// Starts `serve` in captive mode and returns once the socket file exists, looking
    /// every `pollMicroseconds` (0: as fast as it can).
    func start(_ extra: [String] = [], pollMicroseconds: UInt32 = 20_000) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CLI.executable)
        var extra = extra
        if let transmission = Self.transmission, !extra.contains("--transmission") {
            extra += ["--transmission", transmission]
        }
        process.arguments = ["serve", pool, "--socket", socket, "--run", "cat >/dev/null"] + extra
        let control = Pipe()
        let err = Pipe()
        process.standardInput = control
        process.standardOutput = FileHandle.nullDevice
        process.standardError = err
        try process.run()
        self.process = process
        self.control = control
        self.errPipe = err
        let handle = err.fileHandleForReading
        let bytes = errBytes
        let reader = Thread {
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { return }
                bytes.append(chunk)
            }
        }
        reader.start()
        errReader = reader
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) {
            guard process.isRunning, Date() < deadline else {
                usleep(100_000)
                throw FixtureError("server did not start: \(String(decoding: errBytes.get(), as: UTF8.self))")
            }
            usleep(pollMicroseconds)
        }
    }

    /// THINBD_TEST_TRANSMISSION=nio (or lean) serves every fixture's requests on that
    /// loop instead of the default (tools/test.sh runs the NBD interop suites once more
    /// on nio).
    static let transmission = ProcessInfo.processInfo.environment["THINBD_TEST_TRANSMISSION"]

    var pid: Int32 { process?.processIdentifier ?? 0 }
    var isRunning: Bool { process?.isRunning ?? false }

    /// Stops the server (gracefully); returns its exit status.
    @discardableResult
    func stop() -> Int32 {
        guard let process else { return 0 }
        try? control?.fileHandleForWriting.close()
        let deadline = Date().addingTimeInterval(30)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            let hard = Date().addingTimeInterval(10)
            while process.isRunning && Date() < hard { usleep(20_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        process.waitUntilExit()
        if errPipe != nil {
            // The reader thread ends at end of file, after the server exited.
            let deadline = Date().addingTimeInterval(5)
            while errReader?.isFinished == false && Date() < deadline { usleep(10_000) }
            stderr = String(decoding: errBytes.get(), as: UTF8.self)
        }
        self.process = nil
        return process.terminationStatus
    }

    deinit { stop() }
}

struct FixtureError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Asserts a client run succeeded, showing its output when not.
func expectSuccess(_ result: CLI.Result, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(result.status == 0, "\(what) failed (\(result.status)):\n\(result.stdout.suffix(2000))\n\(result.stderr.suffix(2000))", sourceLocation: sourceLocation)
}

/// A file of `size` bytes with random data in some places and holes in others.
/// The JSON object a `--json` command printed.
func jsonObject(_ result: CLI.Result) throws -> [String: Any] {
    guard let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] else {
        throw FixtureError("not a JSON object: \(result.stdout)")
    }
    return object
}

func makeSparseImage(_ path: String, size: Int, seed: UInt64) throws {
    var rng = seed
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try handle.truncate(atOffset: UInt64(size))
    let chunk = 256 << 10
    for start in stride(from: 0, to: size, by: chunk) where (start / chunk) % 3 != 1 {
        var bytes = [UInt8](repeating: 0, count: min(chunk, size - start))
        for i in stride(from: 0, to: bytes.count, by: 8) {
            rng = rng &* 6364136223846793005 &+ 1442695040888963407
            var word = rng
            for j in i..<min(i + 8, bytes.count) {
                bytes[j] = UInt8(truncatingIfNeeded: word)
                word >>= 8
            }
        }
        try handle.seek(toOffset: UInt64(start))
        handle.write(Data(bytes))
    }
    try handle.close()
}

final class LockedBytes: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func append(_ chunk: Data) { lock.lock(); data.append(chunk); lock.unlock() }
    func get() -> Data { lock.lock(); defer { lock.unlock() }; return data }
}
