import Foundation

/// Runs the built `thinbd` executable and other programs for end-to-end tests.
public enum CLI {
    public static let executable: String = {
        // The test runner lives in the build products directory, beside the executable.
        let products = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        var candidates = [products.appendingPathComponent("thinbd").path]
        candidates.append(products.deletingLastPathComponent().appendingPathComponent("thinbd").path)
        candidates.append(products.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("thinbd").path)
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
    }()

    public struct Result {
        public var status: Int32
        public var stdout: String
        public var stderr: String
    }

    /// Runs `thinbd ARGUMENTS`.
    @discardableResult
    public static func run(_ arguments: [String], timeout: TimeInterval = 120) throws -> Result {
        try Program.run(executable, arguments, timeout: timeout)
    }
}

public enum Program {
    /// Runs a program to completion, capturing output. After `timeout` it is killed by
    /// its pid, and so is every process it started (found by parent pid in /proc):
    /// output is read until its last holder closes it, and a grandchild left running
    /// (a `serve --run` script waiting on nbdfuse) once kept a test waiting for ever.
    @discardableResult
    public static func run(
        _ path: String, _ arguments: [String], environment: [String: String] = [:], stdin: Data? = nil,
        timeout: TimeInterval = 120
    ) throws -> CLI.Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let out = Pipe()
        let err = Pipe()
        let input = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = input
        try process.run()
        if let stdin { input.fileHandleForWriting.write(stdin) }
        try? input.fileHandleForWriting.close()
        let deadline = DispatchTime.now() + timeout
        // The killer and the standard output reader have threads of their own: on
        // Dispatch's global queue, whose threads parallel tests keep blocked in reads
        // like these, a timeout once fired minutes late.
        let exited = DispatchSemaphore(value: 0)
        let killer = Thread { [pid = process.processIdentifier] in
            guard exited.wait(timeout: deadline) == .timedOut else { return }
            // Listed before any is killed: an orphan's parent is no longer its starter.
            for target in [pid] + descendants(of: pid) { kill(target, SIGKILL) }
        }
        killer.start()
        let outputRead = DispatchSemaphore(value: 0)
        let collected = DataBox()
        let reader = Thread {
            collected.set(out.fileHandleForReading.readDataToEndOfFile())
            outputRead.signal()
        }
        reader.start()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        outputRead.wait()
        let stdout = collected.get()
        process.waitUntilExit()
        exited.signal()
        return CLI.Result(
            status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
            stderr: String(decoding: stderr, as: UTF8.self))
    }

    /// The fields of /proc/PID/stat after the command name: the state first, then the
    /// parent's pid, and so on. Nil when there is no such process.
    public static func statFields(of pid: pid_t) -> [Substring]? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let nameEnd = stat.lastIndex(of: ")")
        else { return nil }
        return stat[stat.index(after: nameEnd)...].split(separator: " ")
    }

    /// The pids of the processes `root` started, their children, and so on, from the
    /// parent pid in each /proc/PID/stat.
    public static func descendants(of root: pid_t) -> [pid_t] {
        var children: [pid_t: [pid_t]] = [:]
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(entry), let fields = statFields(of: pid), fields.count > 1,
                let parent = pid_t(fields[1])
            else { continue }
            children[parent, default: []].append(pid)
        }
        var found: [pid_t] = []
        var pending = [root]
        while let next = pending.popLast() {
            for child in children[next] ?? [] where !found.contains(child) {
                found.append(child)
                pending.append(child)
            }
        }
        return found
    }

    /// The full path of a program on PATH (or at an absolute path), if installed.
    public static func find(_ name: String) -> String? {
        if name.hasPrefix("/") { return FileManager.default.isExecutableFile(atPath: name) ? name : nil }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") + ["/usr/bin", "/usr/sbin", "/sbin"] {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }
}

/// A directory removed when the value goes away.
public final class TemporaryDirectory: @unchecked Sendable {
    public let path: String
    public init(_ prefix: String = "thinbd-test") {
        path = NSTemporaryDirectory() + "\(prefix)-\(UUID().uuidString.prefix(8))"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

final class DataBox: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func set(_ value: Data) { lock.lock(); data = value; lock.unlock() }
    func get() -> Data { lock.lock(); defer { lock.unlock() }; return data }
}
