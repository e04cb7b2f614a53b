import Glibc

/// A blocking client connection on a Unix stream socket: what the CLI uses to talk to a
/// running server's control socket. Closed when released.
public final class UnixStreamConnection {
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

    deinit { Syscall.close(descriptor) }

    public func send(_ text: String) throws(SystemError) {
        let bytes = Array(text.utf8)
        var sent = 0
        while sent < bytes.count {
            let n = try Syscall.retrying("send") {
                bytes.withUnsafeBytes { raw in Glibc.send(descriptor, raw.baseAddress! + sent, raw.count - sent, Int32(MSG_NOSIGNAL)) }
            }
            sent += n
        }
    }

    /// Reads what has arrived (blocking until something has); an empty result is the end
    /// of the stream.
    public func receive(maxBytes: Int = 65536) throws(SystemError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: maxBytes)
        let n = try Syscall.retrying("recv") {
            buffer.withUnsafeMutableBytes { raw in recv(descriptor, raw.baseAddress, raw.count, 0) }
        }
        return Array(buffer[..<n])
    }
}

extension SystemInfo {
    /// Sets a file's permission bits (chmod).
    public static func setPermissions(_ path: String, mode: UInt32) throws(SystemError) {
        if chmod(path, mode_t(mode)) != 0 { throw SystemError.current("chmod \(path)") }
    }
}
