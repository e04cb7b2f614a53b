import Glibc

/// Polls an event loop's epoll instance without sleeping: what a loop does for up to a
/// few hundred microseconds when it has nothing left to do but wait for its own
/// descriptors, so that the client's next request, or the disk's completion, finds its
/// CPU awake (see `IdlePollWindow` in NBDServer for when and how long).
///
/// The loop (SwiftNIO's) does not hand out its epoll descriptor. The poller finds it
/// through a descriptor the caller registered with the loop: the epoll instance whose
/// watch list (/proc/self/fdinfo, proc(5)) holds that descriptor. An epoll descriptor is
/// itself pollable: readable when any descriptor it watches has an event it asks for,
/// which is exactly "the loop has something to do". The poller keeps its own duplicate,
/// so the number stays valid whatever the loop does with its own.
public final class EventLoopPoller: @unchecked Sendable {
    private let epollDescriptor: Int32

    private init(epollDescriptor: Int32) {
        self.epollDescriptor = epollDescriptor
    }

    /// The poller of the epoll instance that watches `descriptor`, or nil when none does
    /// (another kind of loop) or /proc cannot tell. Cost: reads /proc/self/fd and the
    /// fdinfo of each epoll descriptor found there (a few system calls per open
    /// descriptor); call it off event loops, once per loop.
    public static func forEpoll(watching descriptor: Int32) -> EventLoopPoller? {
        guard descriptor >= 0, let directory = opendir("/proc/self/fd") else { return nil }
        defer { closedir(directory) }
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard let candidate = Int32(name), isEpoll(candidate),
                let info = try? SystemInfo.readSmallFile("/proc/self/fdinfo/\(candidate)", limit: 1 << 22),
                watchList(ofEpollFdinfo: info).contains(descriptor)
            else { continue }
            let copy = fcntl(candidate, F_DUPFD_CLOEXEC, 0)
            // Still an epoll instance: the number may have been closed and reused since.
            guard copy >= 0 else { return nil }
            guard isEpoll(copy) else {
                Syscall.close(copy)
                return nil
            }
            return EventLoopPoller(epollDescriptor: copy)
        }
        return nil
    }

    private static func isEpoll(_ descriptor: Int32) -> Bool {
        var target = [CChar](repeating: 0, count: 64)
        let length = readlink("/proc/self/fd/\(descriptor)", &target, target.count - 1)
        guard length > 0 else { return false }
        let link = String(decoding: target[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return link == "anon_inode:[eventpoll]"
    }

    /// The descriptors an epoll instance's fdinfo lists ("tfd: N ..." lines, proc(5)).
    /// Lines that do not parse are skipped.
    static func watchList(ofEpollFdinfo info: [UInt8]) -> [Int32] {
        var watched: [Int32] = []
        for line in info.split(separator: UInt8(ascii: "\n")) {
            let fields = line.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: true)
                .flatMap { $0.split(separator: UInt8(ascii: "\t"), omittingEmptySubsequences: true) }
            guard fields.count >= 2, fields[0].elementsEqual("tfd:".utf8),
                let number = Int32(String(decoding: fields[1], as: UTF8.self))
            else { continue }
            watched.append(number)
        }
        return watched
    }

    /// Returns true as soon as the epoll instance has an event, false once `nanoseconds`
    /// have passed without one, or at once if polling fails. Cost: the calling thread
    /// stays busy for up to `nanoseconds`, with a poll(2) and a sched_yield(2) per
    /// round: the yield hands the CPU to any other thread waiting for it there (the
    /// client, a worker), so the poll takes only time the CPU would otherwise idle.
    public func pollUntilReady(nanoseconds: UInt64) -> Bool {
        let start = SystemInfo.monotonicNanoseconds()
        var entry = pollfd(fd: epollDescriptor, events: Int16(POLLIN), revents: 0)
        while true {
            entry.revents = 0
            let ready = Glibc.poll(&entry, 1, 0)
            if ready > 0 { return true }
            if ready < 0 && errno != EINTR { return false }
            if SystemInfo.monotonicNanoseconds() &- start >= nanoseconds { return false }
            sched_yield()
        }
    }

    /// Closes the poller's duplicate (the loop's own descriptor is untouched).
    public func close() {
        Syscall.close(epollDescriptor)
    }
}
