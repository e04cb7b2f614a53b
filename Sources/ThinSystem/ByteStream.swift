import Glibc

/// A byte stream read or written in order: standard input or output (a pipe, ssh, a
/// terminal) or a file. What `thinbd send` writes and `receive` reads.
public final class ByteStream {
    public let name: String
    private let descriptor: Int32
    private let owned: Bool
    private let isFile: Bool

    private init(name: String, descriptor: Int32, owned: Bool) {
        self.name = name
        self.descriptor = descriptor
        self.owned = owned
        var status = stat()
        isFile = fstat(descriptor, &status) == 0 && (status.st_mode & S_IFMT) == S_IFREG
    }

    deinit { if owned { Syscall.close(descriptor) } }

    public static func standardInput() -> ByteStream { ByteStream(name: "standard input", descriptor: 0, owned: false) }

    /// Standard output. A reader that goes away (a closed pipe) is reported as an error
    /// by `write`, not by SIGPIPE killing the process.
    public static func standardOutput() -> ByteStream {
        signal(SIGPIPE, SIG_IGN)
        return ByteStream(name: "standard output", descriptor: 1, owned: false)
    }

    public static func reading(_ path: String) throws(SystemError) -> ByteStream {
        ByteStream(name: path, descriptor: try Syscall.open(path, flags: O_RDONLY), owned: true)
    }

    /// Creates `path`; an existing file is refused unless `replacing`, and then truncated.
    public static func creating(_ path: String, replacing: Bool) throws(SystemError) -> ByteStream {
        let descriptor = try Syscall.open(path, flags: O_WRONLY | O_CREAT | (replacing ? O_TRUNC : O_EXCL), mode: 0o644)
        return ByteStream(name: path, descriptor: descriptor, owned: true)
    }

    public var isTerminal: Bool { SystemInfo.isTerminal(descriptor) }

    /// Reads what is there, up to `buffer.count` bytes; 0 at the end of the stream.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        return try Syscall.retrying("read \(name)") { Glibc.read(descriptor, base, buffer.count) }
    }

    /// Writes all of `bytes`.
    public func write(_ bytes: UnsafeRawBufferPointer) throws(SystemError) {
        guard let base = bytes.baseAddress else { return }
        var done = 0
        while done < bytes.count {
            let n = try Syscall.retrying("write \(name)") { Glibc.write(descriptor, base + done, bytes.count - done) }
            if n == 0 { throw SystemError(.io, "write to \(name) made no progress") }
            done += n
        }
    }

    /// Makes a file's contents durable; a pipe has nothing to sync.
    public func sync() throws(SystemError) {
        if isFile { try Syscall.fdatasync(descriptor) }
    }
}
