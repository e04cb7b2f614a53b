import Dispatch
import Glibc

/// Signal handling without touching Glibc elsewhere.
public enum Signals {
    private static func terminationSet() -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        return set
    }

    /// Blocks SIGINT and SIGTERM in the calling thread and every thread it starts later.
    /// Call first thing, before any thread exists, so that `onTermination`'s thread is
    /// the only one that ever takes them (a thread with them unblocked would let the
    /// default action kill the process mid-request).
    public static func blockTermination() {
        var set = terminationSet()
        pthread_sigmask(SIG_BLOCK, &set, nil)
        signal(SIGPIPE, SIG_IGN)
    }

    /// Calls `handler` (on a thread of its own) for each SIGINT or SIGTERM, instead of
    /// terminating the process. Needs `blockTermination` first. It waits with sigwait,
    /// so it works whatever signal mask the process inherited.
    public static func onTermination(_ handler: @escaping @Sendable (Int32) -> Void) {
        blockTermination()
        // Without the thread, the signals stay blocked and pending: no crash, no handler.
        try? DetachedThread.start {
            var set = Signals.terminationSet()
            while true {
                var number: Int32 = 0
                if sigwait(&set, &number) == 0 { handler(number) }
            }
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
        // The child starts with no signal blocked and default dispositions, whatever
        // this server blocks or ignores.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for number in [SIGINT, SIGTERM, SIGPIPE] { sigaddset(&defaults, number) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let result = withCStrings(argv) { cArgs in
            withCStrings(entries) { cEnv in
                posix_spawn(&pid, "/bin/sh", nil, &attributes, cArgs, cEnv)
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
