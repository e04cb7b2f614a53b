import Glibc

/// A blocking client connection on a stream socket (Unix or TCP): what the CLI uses to
/// talk to a server's control socket and, as an NBD client, to NBD servers. Closed when
/// released.
public final class StreamConnection {
    private let descriptor: Int32

    /// Connects to the socket at `path`. Fails with `.noEntry` when there is no socket
    /// file and `.connectionRefused` when nothing listens on it (a server that died),
    /// the two answers that mean "no server here".
    public init(connectingTo path: String) throws(SystemError) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard pathBytes.count < capacity else {
            throw SystemError(.nameTooLong, "socket path \(path) is longer than \(capacity - 1) bytes")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        let fd = try Syscall.retrying("socket") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let result = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if result != 0 {
            let error = SystemError.current("connect \(path)")
            Syscall.close(fd)
            throw error
        }
        descriptor = fd
    }

    /// Connects to TCP `host:port` (a name or a numeric IPv4/IPv6 address), trying each
    /// address the name resolves to.
    public init(host: String, port: Int) throws(SystemError) {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &list)
        guard status == 0, let first = list else {
            throw SystemError(.noEntry, "resolve \(host): \(String(cString: gai_strerror(status)))")
        }
        defer { freeaddrinfo(list) }
        var lastError = SystemError(.connectionRefused, "connect \(host):\(port)")
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let info = entry {
            entry = info.pointee.ai_next
            let fd = socket(info.pointee.ai_family, info.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), info.pointee.ai_protocol)
            if fd < 0 { continue }
            if connect(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 {
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                descriptor = fd
                return
            }
            lastError = SystemError.current("connect \(host):\(port)")
            Syscall.close(fd)
        }
        throw lastError
    }

    deinit { Syscall.close(descriptor) }

    /// Makes a send or receive that waits longer than `seconds` fail (ETIMEDOUT-like
    /// EAGAIN), so a peer that stops answering cannot hold a caller forever.
    public func setTimeout(seconds: Int) {
        var limit = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Sends all of `bytes`.
    public func send(_ bytes: UnsafeRawBufferPointer) throws(SystemError) {
        var sent = 0
        while sent < bytes.count {
            sent += try Syscall.retrying("send") { Glibc.send(descriptor, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
        }
    }

    /// Reads what has arrived into `buffer` (blocking until something has); 0 is the end
    /// of the stream.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        try Syscall.retrying("recv") { recv(descriptor, buffer.baseAddress, buffer.count, 0) }
    }

    public func send(_ text: String) throws(SystemError) {
        let bytes = Array(text.utf8)
        let result = bytes.withUnsafeBytes { raw in Result { () throws(SystemError) in try send(raw) } }
        try result.get()
    }

    /// Reads what has arrived (blocking until something has); an empty result is the end
    /// of the stream.
    public func receive(maxBytes: Int = 65536) throws(SystemError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: maxBytes)
        let n = try buffer.withUnsafeMutableBytes { raw in Result { () throws(SystemError) in try receive(into: raw) } }.get()
        return Array(buffer[..<n])
    }
}

extension SystemInfo {
    /// Sets a file's permission bits (chmod).
    public static func setPermissions(_ path: String, mode: UInt32) throws(SystemError) {
        if chmod(path, mode_t(mode)) != 0 { throw SystemError.current("chmod \(path)") }
    }

    /// Where to bind a Unix socket that should appear at `path` only once it listens: a
    /// hidden sibling named after this process (`publishSocket` then renames it into
    /// place). Nil when that name would not fit in a socket address (107 bytes); the
    /// caller then binds `path` itself, which exists a moment before it listens.
    public static func socketStagingPath(for path: String) -> String? {
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { String(path[...$0]) } ?? ""
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        let staged = "\(directory).\(name).\(getpid()).binding"
        return staged.utf8.count <= 107 ? staged : nil
    }

    /// Renames the listening socket bound at `staged` to `path` in one step: from the
    /// moment `path` exists, connections to it are accepted, where a socket bound at
    /// `path` exists between bind(2) and listen(2) and refuses them. A stale socket at
    /// `path` is replaced, as binding there would replace it; anything else there is
    /// an error. `staged` is gone afterwards either way.
    public static func publishSocket(_ staged: String, at path: String) throws(SystemError) {
        var status = stat()
        if lstat(path, &status) == 0 && status.st_mode & S_IFMT != S_IFSOCK {
            _ = unlink(staged)
            throw SystemError(.exists, "\(path) exists and is not a socket")
        }
        if rename(staged, path) != 0 {
            let error = SystemError.current("rename \(staged) to \(path)")
            _ = unlink(staged)
            throw error
        }
    }

    /// Runs `body` with the process's file-creation mask at `mask` (at least as strict as
    /// it was), then puts it back: files and sockets made meanwhile never exist with wider
    /// permissions, not even between their creation and a chmod. The mask is the
    /// process's: files other threads create meanwhile are made as strictly.
    public static func withCreationMask<T>(_ mask: UInt32, _ body: () throws -> T) rethrows -> T {
        let previous = umask(mode_t(mask))
        umask(previous | mode_t(mask))
        defer { umask(previous) }
        return try body()
    }
}

/// What `stat` says of a path, for the security checks of the control socket's place.
public struct FileStatus: Sendable, Equatable {
    public var mode: UInt32
    public var owner: UInt32

    /// Group or others may write (create or remove entries, for a directory).
    public var isWritableByOthers: Bool { mode & 0o022 != 0 }
    /// The sticky bit: in a directory, only an entry's owner may remove or rename it.
    public var isSticky: Bool { mode & 0o1000 != 0 }
}

extension SystemInfo {
    /// The effective user id of this process.
    public static var effectiveUserID: UInt32 { geteuid() }

    /// `lstat` of `path` (a symbolic link is described, not followed), or `stat` with
    /// `followingLinks`; nil when it does not exist or cannot be looked at.
    public static func status(of path: String, followingLinks: Bool = false) -> FileStatus? {
        var info = stat()
        guard (followingLinks ? stat(path, &info) : lstat(path, &info)) == 0 else { return nil }
        return FileStatus(mode: UInt32(info.st_mode & 0o7777), owner: info.st_uid)
    }

    /// The whole contents of a small file (credentials, keys). Refuses files over
    /// `limit` bytes instead of reading without bound.
    public static func readSmallFile(_ path: String, limit: Int = 1 << 20) throws(SystemError) -> [UInt8] {
        let descriptor = try Syscall.open(path, flags: O_RDONLY)
        defer { Syscall.close(descriptor) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { raw in Glibc.read(descriptor, raw.baseAddress, raw.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw SystemError.current("read \(path)")
            }
            if count == 0 { return bytes }
            bytes.append(contentsOf: chunk[0..<count])
            if bytes.count > limit { throw SystemError(.invalidArgument, "\(path) is larger than \(limit) bytes") }
        }
    }
}

extension SystemInfo {
    /// `count` bytes from the kernel's random source (/dev/urandom): for UUIDs.
    public static func randomBytes(_ count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var filled = 0
        if let descriptor = try? Syscall.open("/dev/urandom", flags: O_RDONLY) {
            defer { Syscall.close(descriptor) }
            while filled < count {
                let got = bytes.withUnsafeMutableBytes { raw in Glibc.read(descriptor, raw.baseAddress! + filled, count - filled) }
                if got <= 0 {
                    if got < 0 && errno == EINTR { continue }
                    break
                }
                filled += got
            }
        }
        if filled < count {
            // No /dev/urandom (a chroot): time and pid are unique enough for an identity.
            var rng = SplitMix64(seed: monotonicNanoseconds() ^ wallClockSeconds() << 20 ^ UInt64(processID) << 40)
            for i in filled..<count { bytes[i] = UInt8(truncatingIfNeeded: rng.next()) }
        }
        return bytes
    }
}
