import Dispatch
import Glibc

/// Signal handling without touching Glibc elsewhere.
public enum Signals {
    private static let sources = Lock()
    nonisolated(unsafe) private static var installed: [DispatchSourceSignal] = []

    /// Calls `handler` (on a private queue) when SIGINT or SIGTERM arrives, instead of
    /// terminating the process. SIGPIPE is ignored.
    public static func onTermination(_ handler: @escaping @Sendable (Int32) -> Void) {
        signal(SIGPIPE, SIG_IGN)
        let queue = DispatchQueue(label: "thinbd.signals")
        for number in [SIGINT, SIGTERM] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
            source.setEventHandler { handler(number) }
            source.resume()
            sources.withLock { installed.append(source) }
        }
    }
}

/// A child process started through `/bin/sh -c`.
public final class ChildProcess: Sendable {
    public let pid: Int32

    private init(pid: Int32) { self.pid = pid }

    /// Starts `command` with the current environment plus `environment`; standard
    /// input, output and error are inherited.
    public static func shell(_ command: String, environment: [String: String]) throws(SystemError) -> ChildProcess {
        var entries: [String] = []
        var index = 0
        while let entry = environ[index] {
            let text = String(cString: entry)
            let key = text.split(separator: "=", maxSplits: 1).first.map(String.init) ?? text
            if environment[key] == nil { entries.append(text) }
            index += 1
        }
        for (key, value) in environment { entries.append("\(key)=\(value)") }
        let argv = ["/bin/sh", "-c", command]
        var pid: pid_t = 0
        let result = withCStrings(argv) { cArgs in
            withCStrings(entries) { cEnv in
                posix_spawn(&pid, "/bin/sh", nil, nil, cArgs, cEnv)
            }
        }
        guard result == 0 else { throw SystemError(SystemError.Code(rawValue: result), "posix_spawn /bin/sh") }
        return ChildProcess(pid: pid)
    }

    /// Blocks until the child exits; returns its exit status (128+N when killed by signal N).
    public func wait() -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return 127 }
        }
        let signalNumber = status & 0x7F
        if signalNumber == 0 { return (status >> 8) & 0xFF }
        return 128 + signalNumber
    }
}

private func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    pointers.append(nil)
    defer { for p in pointers { free(p) } }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}

extension SystemInfo {
    /// The command line of process `pid`, from /proc (nil when unreadable).
    public static func commandLine(of pid: Int32) -> [String]? {
        let fd = open("/proc/\(pid)/cmdline", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 4096)
        let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        return bytes[0..<n].split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
    }

    /// The listening sockets systemd passed (LISTEN_PID/LISTEN_FDS), starting at fd 3.
    public static func socketActivationDescriptors() -> [Int32] {
        guard let pidText = environment("LISTEN_PID"), let pid = Int32(pidText), pid == getpid(),
            let countText = environment("LISTEN_FDS"), let count = Int32(countText), count > 0
        else { return [] }
        return (0..<count).map { 3 + $0 }
    }
}
