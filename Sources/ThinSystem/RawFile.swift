import Glibc

/// A plain file (or block device) read or written as a raw image by `thinbd import` and
/// `export`, with the sparse-file queries that let a copy skip holes without reading them.
public final class RawFile {
    public let path: String
    private let descriptor: Int32

    /// Opens an existing file or block device for reading.
    public init(readingAt path: String) throws(SystemError) {
        self.path = path
        descriptor = try Syscall.open(path, flags: O_RDONLY)
    }

    /// Creates `path` for writing; an existing file is refused unless `replacing`, and
    /// then truncated.
    public init(creatingAt path: String, replacing: Bool) throws(SystemError) {
        self.path = path
        descriptor = try Syscall.open(path, flags: O_WRONLY | O_CREAT | (replacing ? O_TRUNC : O_EXCL), mode: 0o644)
    }

    deinit { Syscall.close(descriptor) }

    /// The size in bytes (for a block device too).
    public func size() throws(SystemError) -> UInt64 {
        let end = lseek(descriptor, 0, SEEK_END)
        if end < 0 { throw SystemError.current("size of \(path)") }
        return UInt64(end)
    }

    /// Reads up to `buffer.count` bytes at `offset`; returns how many (fewer at the end).
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        try Syscall.preadFully(descriptor, buffer, offset)
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(SystemError) {
        try Syscall.pwriteFully(descriptor, buffer, offset)
    }

    /// Sets the size (growing leaves a hole).
    public func setSize(_ size: UInt64) throws(SystemError) { try Syscall.ftruncate(descriptor, size) }

    public func sync() throws(SystemError) { try Syscall.fdatasync(descriptor) }

    /// Where the next data at or after `offset` starts (nil: only a hole follows), as
    /// the file system reports it; files without hole support report all data.
    public func nextData(from offset: UInt64) -> UInt64? {
        let at = lseek(descriptor, off_t(offset), Self.seekData)
        if at < 0 { return errno == ENXIO ? nil : offset }
        return UInt64(at)
    }

    /// Where the hole at or after `offset` starts (the end of the file if none).
    public func nextHole(from offset: UInt64) -> UInt64 {
        let at = lseek(descriptor, off_t(offset), Self.seekHole)
        if at < 0 { return UInt64.max }
        return UInt64(at)
    }

    /// What a path is, to refuse overwriting the wrong thing: nil when nothing is there.
    public struct Identity: Equatable, Sendable {
        public var device: UInt64
        public var inode: UInt64
        public var isRegularFile: Bool
    }

    public static func identity(of path: String) -> Identity? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return Identity(st)
    }

    // Linux's values; Glibc's module hides them behind _GNU_SOURCE.
    private static let seekData: Int32 = 3
    private static let seekHole: Int32 = 4
}

extension RawFile.Identity {
    /// From a stat or fstat result.
    init(_ st: stat) {
        self.init(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), isRegularFile: st.st_mode & S_IFMT == S_IFREG)
    }
}
