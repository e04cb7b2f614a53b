import CThinSupport
import Glibc

/// Thin wrappers over the syscalls thinbd uses. Every call retries on EINTR and reports
/// failures as `SystemError`; nothing outside this module calls into Glibc.
enum Syscall {
    @inline(__always)
    static func retrying<T: BinaryInteger>(_ operation: String, _ body: () -> T) throws(SystemError) -> T {
        while true {
            let result = body()
            if result >= 0 { return result }
            if errno == EINTR { continue }
            throw SystemError.current(operation)
        }
    }

    static func open(_ path: String, flags: Int32, mode: mode_t = 0o644) throws(SystemError) -> Int32 {
        try retrying("open \(path)") { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    /// Reads exactly `buffer.count` bytes unless end of file comes first; returns the count read.
    static func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, _ offset: UInt64) throws(SystemError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = try retrying("pread") {
                Glibc.pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    static func pwriteFully(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, _ offset: UInt64) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let n = try retrying("pwrite") {
                Glibc.pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { throw SystemError(.io, "pwrite made no progress") }
            done += n
        }
    }

    static func fdatasync(_ fd: Int32) throws(SystemError) {
        _ = try retrying("fdatasync") { Glibc.fdatasync(fd) }
    }

    /// Writes `buffer` at `offset` with RWF_DSYNC: each call returns once its bytes are
    /// durable, as a fdatasync of that range would make them (on ext4 and XFS that is
    /// the range's write-back, the inode's journal or log, and a device cache flush).
    /// Returns false, having written nothing, when the kernel has no RWF_DSYNC.
    static func pwriteDurably(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, _ offset: UInt64) throws(SystemError) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = thinbd_pwrite_dsync(fd, buffer.baseAddress! + done, UInt(buffer.count - done), Int64(offset) + Int64(done))
            if n < 0 {
                let code = errno
                if code == EINTR { continue }
                if done == 0 && (code == EOPNOTSUPP || code == EINVAL) { return false }
                throw SystemError(SystemError.Code(rawValue: code), "pwritev2 RWF_DSYNC")
            }
            if n == 0 { throw SystemError(.io, "pwritev2 made no progress") }
            done += n
        }
        return true
    }

    /// Writes back the ranges' dirty pages and waits for them (sync_file_range): every
    /// range's write-back is started first, then each is waited for, so the disk has
    /// them all at once. No device cache flush and no file system metadata: not
    /// durable by itself.
    static func writeBack(_ fd: Int32, _ ranges: [Range<UInt64>]) throws(SystemError) {
        for wait: Int32 in [0, 1] {
            for range in ranges {
                _ = try retrying("sync_file_range") { thinbd_write_back_range(fd, Int64(range.lowerBound), Int64(range.count), wait) }
            }
        }
    }

    /// The file system's magic number (statfs f_type), nil when it cannot be had.
    static func fileSystemType(_ fd: Int32) -> Int64? {
        let type = thinbd_file_system_type(fd)
        return type < 0 ? nil : type
    }

    /// Dirty pages the page cache holds in the range, nil when the kernel cannot say
    /// (cachestat, Linux 6.5). For tests of what a barrier wrote back.
    static func dirtyPages(_ fd: Int32, _ offset: UInt64, _ length: UInt64) -> Int64? {
        let count = thinbd_range_dirty_pages(fd, Int64(offset), UInt(length))
        return count < 0 ? nil : count
    }

    static func fileSize(_ fd: Int32) throws(SystemError) -> UInt64 {
        var st = stat()
        _ = try retrying("fstat") { Glibc.fstat(fd, &st) }
        return UInt64(clamping: st.st_size)
    }

    /// Which file `fd` is (device and inode), nil when fstat fails.
    static func identity(_ fd: Int32) -> RawFile.Identity? {
        var st = stat()
        guard Glibc.fstat(fd, &st) == 0 else { return nil }
        return RawFile.Identity(st)
    }

    /// Bytes actually allocated on the host file system (for sparse files).
    static func allocatedBytes(_ fd: Int32) throws(SystemError) -> UInt64 {
        var st = stat()
        _ = try retrying("fstat") { Glibc.fstat(fd, &st) }
        return UInt64(st.st_blocks) * 512
    }

    static func ftruncate(_ fd: Int32, _ size: UInt64) throws(SystemError) {
        _ = try retrying("ftruncate") { Glibc.ftruncate(fd, off_t(size)) }
    }

    /// Allocates host storage for the byte range (fallocate, size unchanged). Returns
    /// false when the file system cannot (EOPNOTSUPP); ENOSPC and other errors throw.
    static func allocate(_ fd: Int32, _ offset: UInt64, _ length: UInt64) throws(SystemError) -> Bool {
        while true {
            if thinbd_allocate(fd, Int64(offset), Int64(length)) == 0 { return true }
            let code = errno
            if code == EINTR { continue }
            if code == EOPNOTSUPP { return false }
            throw SystemError(SystemError.Code(rawValue: code), "fallocate")
        }
    }

    /// Returns false when the file system cannot punch holes.
    static func punchHole(_ fd: Int32, _ offset: UInt64, _ length: UInt64) -> Bool {
        while true {
            let r = thinbd_punch_hole(fd, Int64(offset), Int64(length))
            if r == 0 { return true }
            if errno == EINTR { continue }
            return false
        }
    }

    /// Takes an exclusive (or shared) lock on the open file description without blocking.
    static func tryLock(_ fd: Int32, exclusive: Bool) throws(SystemError) -> Bool {
        let op = (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB
        while true {
            if flock(fd, op) == 0 { return true }
            if errno == EINTR { continue }
            if errno == EWOULDBLOCK { return false }
            throw SystemError.current("flock")
        }
    }
}

extension Syscall {
    /// Takes a write record lock on byte 0 (best effort) so F_GETLK can name the holder.
    static func recordOwnership(_ fd: Int32) {
        var lock = flock()
        lock.l_type = Int16(F_WRLCK)
        lock.l_whence = Int16(SEEK_SET)
        lock.l_start = 0
        lock.l_len = 1
        _ = fcntl(fd, F_SETLK, &lock)
    }

    /// The pid holding the record lock on byte 0, if any.
    static func lockHolder(_ fd: Int32) -> Int32? {
        var lock = flock()
        lock.l_type = Int16(F_WRLCK)
        lock.l_whence = Int16(SEEK_SET)
        lock.l_start = 0
        lock.l_len = 1
        guard fcntl(fd, F_GETLK, &lock) == 0, lock.l_type != Int16(F_UNLCK), lock.l_pid > 0 else { return nil }
        return lock.l_pid
    }
}

/// Small process-level facts the CLI and engine need without importing Glibc.
public enum SystemInfo {
    public static var processID: Int32 { getpid() }

    /// Gives the processor to another runnable thread, if any (sched_yield).
    public static func yieldProcessor() { sched_yield() }

    /// Raises the soft limit on open descriptors to the hard limit (a server with many
    /// connections needs one per connection); returns the limit now in force.
    @discardableResult
    public static func raiseOpenFileLimit() -> UInt64 {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        return UInt64(limit.rlim_cur)
    }

    public static func isTerminal(_ fd: Int32) -> Bool { isatty(fd) == 1 }

    /// Tells glibc's allocator to keep the memory of freed buffers below 32 MiB instead of
    /// handing it back to the kernel, for a server that allocates and frees such buffers
    /// (read replies, write payloads) many times a second. 32 MiB is the most glibc takes;
    /// only a request of the largest size, whose buffer is a little above, is still mapped
    /// and unmapped on its own. Returns false when the allocator refused either setting
    /// (then nothing changes but speed).
    ///
    /// Why: by default glibc maps buffers above its mmap threshold one by one, raises the
    /// threshold to the largest mapped buffer freed so far (so 1 MiB buffers soon come
    /// from a heap), and hands a heap's free top back to the kernel (madvise DONTNEED)
    /// once it exceeds twice the threshold. With 1 MiB reads at queue depth 8 the top kept
    /// crossing that line: every page of the next reply buffer faulted in again, zeroed,
    /// about 280 faults per request, and sequential reads ran at a third of their speed
    /// in some runs and not others (docs/performance.md, "Freed buffers stay mapped").
    /// Fixed thresholds also stop moving with the allocation history.
    ///
    /// Cost: each allocator arena may hold up to 64 MiB of freed memory it does not hand
    /// back; memory in use is unchanged. Process-wide; the server calls it once at start.
    @discardableResult
    public static func keepFreedBuffersMapped() -> Bool {
        // Above this, buffers are mapped and unmapped one by one: glibc's ceiling.
        let mappedAbove: Int32 = 32 << 20
        let keptFree: Int32 = 64 << 20
        return thinbd_set_allocator_thresholds(mappedAbove, keptFree) == 1
    }

    /// The process's working directory ("/" if it cannot be read).
    public static func workingDirectory() -> String {
        var buffer = [CChar](repeating: 0, count: 4096)
        guard getcwd(&buffer, buffer.count) != nil else { return "/" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Monotonic nanoseconds, for measuring durations.
    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Wall-clock seconds since the Unix epoch.
    /// Sleeps the calling thread (not for event loops).
    public static func sleep(milliseconds: Int) {
        var request = timespec(tv_sec: milliseconds / 1000, tv_nsec: (milliseconds % 1000) * 1_000_000)
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }

    public static func wallClockSeconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec)
    }

    public static func environment(_ name: String) -> String? {
        guard let value = getenv(name) else { return nil }
        return String(cString: value)
    }

    public static func fileExists(_ path: String) -> Bool {
        access(path, F_OK) == 0
    }

    public static func removeFile(_ path: String) {
        _ = unlink(path)
    }

    /// Creates `path` and its missing parents (like `mkdir -p`).
    public static func makeDirectories(_ path: String) throws(SystemError) {
        var prefix = path.hasPrefix("/") ? "/" : ""
        for component in path.split(separator: "/") {
            prefix += component
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                throw SystemError.current("mkdir \(prefix)")
            }
            prefix += "/"
        }
    }

    /// Writes text to standard error without buffering, all of it (retrying short
    /// writes and EINTR); may block while the reader of standard error is slow.
    public static func writeStandardError(_ text: String) {
        var copy = text
        copy.withUTF8 { bytes in
            var offset = 0
            while offset < bytes.count {
                let written = Glibc.write(2, bytes.baseAddress! + offset, bytes.count - offset)
                if written > 0 {
                    offset += written
                } else if written < 0 && errno == EINTR {
                    continue
                } else {
                    return
                }
            }
        }
    }

    /// Writes to standard output now (print() may buffer when stdout is not a terminal).
    public static func flushStandardOutput() {
        fflush(nil)
    }

    public static func exit(_ code: Int32) -> Never {
        Glibc.exit(code)
    }
}
