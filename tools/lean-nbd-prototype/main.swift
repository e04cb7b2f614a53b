// lean-nbd-prototype: a measurement, not a server. How much does thinbd's transmission
// path cost beyond the pool calls it makes? This answers it with the same pool calls
// (`Pool.readWithoutBlocking`, `Pool.writeInPlaceWithoutBlocking`, the loop disk queue
// and its page-cache writer) driven from one thread with poll(2), a reusable input
// buffer parsed in place and one reply buffer written once per pass: no swift-nio, no
// closures per layer beyond the pool's own. docs/performance.md ("Leaving swift-nio:
// a prototype as the bound") has what it measured.
//
// Not part of thinbd and not built by the package (it calls Glibc directly, which the
// package keeps to ThinSystem). To build it, add this target to Package.swift for the
// experiment only:
//
//   .executableTarget(name: "leanproto", dependencies: ["ThinPool", "ThinSystem"],
//                     path: "tools/lean-nbd-prototype"),
//
//   swift build -c release --product leanproto
//   .build/release/leanproto POOL VOLUME SOCKET none|writeback [POLL_MICROSECONDS]
//
// POLL_MICROSECONDS (default 0): after each piece of work, poll without sleeping for
// that long before sleeping in poll(2). One client at a time, fixed newstyle with
// NBD_OPT_GO only (every other option is refused as unsupported), simple replies,
// READ/WRITE/FLUSH/DISC. Writes that cannot start on the loop wait for the writes in
// flight, then run blocking. Anything malformed ends the connection. Nothing it reads
// is trusted beyond what the measurement needs: lengths are capped at 64 KiB and
// ranges checked against the volume.
import Glibc
import ThinPool
import ThinSystem

let args = CommandLine.arguments
let usage = "usage: leanproto POOL VOLUME SOCKET none|writeback [POLL_MICROSECONDS]"
guard (5...6).contains(args.count), let cacheMode = CacheMode(rawValue: args[4]),
    let pollMicros = args.count == 6 ? Int(args[5]).flatMap({ (0...1_000_000).contains($0) ? $0 : nil }) : 0
else {
    logError(usage)
    exit(2)
}
let pool = try Pool.open(path: args[1], cache: cacheMode)
let volumeID = try pool.volumeID(args[2])
let volumeSize = try pool.volumeInfo(args[2]).size
// Used only from the main thread (the queue is not Sendable).
nonisolated(unsafe) let queue = makeLoopDiskQueue()!
let readiness = try queue.makeReadinessDescriptor()

func be64(_ p: UnsafeRawPointer) -> UInt64 { UInt64(bigEndian: p.loadUnaligned(as: UInt64.self)) }
func be32(_ p: UnsafeRawPointer) -> UInt32 { UInt32(bigEndian: p.loadUnaligned(as: UInt32.self)) }
func be16(_ p: UnsafeRawPointer) -> UInt16 { UInt16(bigEndian: p.loadUnaligned(as: UInt16.self)) }

/// Replies gathered for one `write`. Every `put` first makes room, writing out what is
/// gathered when the next piece would not fit: a client that pipelines many requests
/// never runs it past its end.
final class Output {
    let capacity = 4 << 20
    let buffer: UnsafeMutableRawPointer
    let fd: Int32
    var count = 0
    init(fd: Int32) {
        self.fd = fd
        buffer = .allocate(byteCount: capacity, alignment: 64)
    }
    deinit { buffer.deallocate() }
    private func room(_ n: Int) { if count + n > capacity { flush() } }
    func put64(_ v: UInt64) { room(8); buffer.advanced(by: count).storeBytes(of: v.bigEndian, as: UInt64.self); count += 8 }
    func put32(_ v: UInt32) { room(4); buffer.advanced(by: count).storeBytes(of: v.bigEndian, as: UInt32.self); count += 4 }
    func put16(_ v: UInt16) { room(2); buffer.advanced(by: count).storeBytes(of: v.bigEndian, as: UInt16.self); count += 2 }
    func put(_ p: UnsafeRawPointer, _ n: Int) { room(n); buffer.advanced(by: count).copyMemory(from: p, byteCount: n); count += n }
    func reply(error: UInt32, cookie: UInt64) { put32(0x6744_6698); put32(error); put64(cookie) }
    /// Writes out everything gathered. On the non-blocking socket it retries EAGAIN at
    /// once (a spin, acceptable in a measurement tool); an error drops the rest.
    func flush() {
        var done = 0
        while done < count {
            let n = Glibc.write(fd, buffer + done, count - done)
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                count = 0
                return
            }
            done += n
        }
        count = 0
    }
}

final class Buffers {
    var free: [UnsafeMutableRawPointer] = []
    let size = 64 << 10
    deinit { for buffer in free { buffer.deallocate() } }
    func take() -> UnsafeMutableRawPointer { free.popLast() ?? UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096) }
    func give(_ p: UnsafeMutableRawPointer) { free.append(p) }
}

func readFully(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ n: Int) -> Bool {
    var done = 0
    while done < n {
        let r = Glibc.read(fd, p + done, n - done)
        if r <= 0 {
            if r < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            return false
        }
        done += r
    }
    return true
}

/// Fixed newstyle, NBD_OPT_GO only (everything else: unsupported). Blocking socket.
func handshake(_ fd: Int32, _ out: Output) -> Bool {
    out.put64(0x4e42_444d_4147_4943)
    out.put64(0x4948_4156_454F_5054)
    out.put16(3)
    out.flush()
    var scratch = [UInt8](repeating: 0, count: 4096)
    return scratch.withUnsafeMutableBytes { b -> Bool in
        guard readFully(fd, b.baseAddress!, 4) else { return false }
        while true {
            guard readFully(fd, b.baseAddress!, 16) else { return false }
            let option = be32(b.baseAddress! + 8)
            let length = Int(be32(b.baseAddress! + 12))
            guard length <= 4096, readFully(fd, b.baseAddress!, length) else { return false }
            func optionReply(_ type: UInt32, _ data: [UInt8]) {
                out.put64(0x3_e889_0455_65a9)
                out.put32(option)
                out.put32(type)
                out.put32(UInt32(data.count))
                data.withUnsafeBytes { out.put($0.baseAddress ?? UnsafeRawPointer(b.baseAddress!), data.count) }
                out.flush()
            }
            if option == 7 {
                var info: [UInt8] = [0, 0]
                withUnsafeBytes(of: volumeSize.bigEndian) { info += $0 }
                withUnsafeBytes(of: UInt16(1 | 4).bigEndian) { info += $0 }
                optionReply(3, info)
                optionReply(1, [])
                return true
            }
            if option == 2 { return false }
            optionReply(0x8000_0001, [])
        }
    }
}

func serve(_ fd: Int32) {
    let out = Output(fd: fd)
    guard handshake(fd, out) else { return }
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: readiness, events: Int16(POLLIN), revents: 0)]
    let inputCapacity = 1 << 20
    let input = UnsafeMutableRawPointer.allocate(byteCount: inputCapacity, alignment: 64)
    defer { input.deallocate() }
    var start = 0
    var end = 0
    let buffers = Buffers()
    var inFlight = 0
    var open = true
    var blockingWrites = 0

    var deferred: [(UnsafeMutableRawPointer, UInt64, Int, UInt64)] = []
    func startWrite(_ b: UnsafeMutableRawPointer, _ offset: UInt64, _ length: Int, _ cookie: UInt64) -> Bool {
        let data = UnsafeRawBufferPointer(start: b, count: length)
        let started = pool.writeInPlaceWithoutBlocking(volumeID, at: offset, from: data, queue: queue) { error in
            out.reply(error: error == nil ? 0 : 5, cookie: cookie)
            buffers.give(b)
            inFlight -= 1
        }
        if case .started = started {
            inFlight += 1
            return true
        }
        guard inFlight == 0 else { return false }
        blockingWrites += 1
        let ok = (try? pool.write(volumeID, at: offset, from: data)) != nil
        out.reply(error: ok ? 0 : 5, cookie: cookie)
        buffers.give(b)
        return true
    }
    func retryDeferred() {
        guard !deferred.isEmpty else { return }
        let list = deferred
        deferred = []
        for (b, offset, length, cookie) in list where !startWrite(b, offset, length, cookie) { deferred.append((b, offset, length, cookie)) }
    }

    func handleInput() -> Bool {
        while true {
            let n = Glibc.read(fd, input + end, inputCapacity - end)
            if n == 0 { return false }
            if n < 0 { return errno == EAGAIN || errno == EINTR }
            end += n
            while end - start >= 28 {
                let h = input + start
                guard be32(h) == 0x2560_9513 else { return false }
                let type = be16(h + 6)
                let cookie = be64(h + 8)
                let offset = be64(h + 16)
                let length = Int(be32(h + 24))
                switch type {
                case 1:  // write
                    guard end - start >= 28 + length else { break }
                    guard length <= buffers.size, fitsInVolume(offset, length) else { return false }
                    let b = buffers.take()
                    b.copyMemory(from: h + 28, byteCount: length)
                    start += 28 + length
                    if !startWrite(b, offset, length, cookie) { deferred.append((b, offset, length, cookie)) }
                    continue
                case 0:  // read
                    start += 28
                    guard length <= buffers.size, fitsInVolume(offset, length) else { return false }
                    let b = buffers.take()
                    let dest = UnsafeMutableRawBufferPointer(start: b, count: length)
                    let r = pool.readWithoutBlocking(volumeID, at: offset, into: dest, queue: queue) { result in
                        if case .success = result {
                            out.reply(error: 0, cookie: cookie)
                            out.put(b, length)
                        } else {
                            out.reply(error: 5, cookie: cookie)
                        }
                        buffers.give(b)
                        inFlight -= 1
                    }
                    switch r {
                    case .started: inFlight += 1
                    case .completed(.success):
                        out.reply(error: 0, cookie: cookie)
                        out.put(b, length)
                        buffers.give(b)
                    default:
                        let ok = (try? pool.read(volumeID, at: offset, into: dest)) != nil
                        out.reply(error: ok ? 0 : 5, cookie: cookie)
                        if ok { out.put(b, length) }
                        buffers.give(b)
                    }
                    continue
                case 3:  // flush
                    start += 28
                    let ok = (try? pool.commit()) != nil
                    out.reply(error: ok ? 0 : 5, cookie: cookie)
                    continue
                case 2:
                    return false
                default:
                    start += 28
                    out.reply(error: 22, cookie: cookie)
                    continue
                }
                break
            }
            if start == end {
                start = 0
                end = 0
            } else if end > inputCapacity / 2 {
                (input).copyMemory(from: input + start, byteCount: end - start)
                end -= start
                start = 0
            }
            if n < inputCapacity / 4 { return true }
        }
    }

    var lastWork = monotonicNanoseconds()
    while open || inFlight > 0 || !deferred.isEmpty {
        if inFlight == 0 { retryDeferred() }
        queue.submitQueued()
        if out.count > 0 { out.flush() }
        let spinning = pollMicros > 0 && monotonicNanoseconds() - lastWork < UInt64(pollMicros) * 1000
        let count = poll(&fds, 2, spinning ? 0 : -1)
        if count <= 0 {
            if count == 0 { sched_yield() }
            continue
        }
        lastWork = monotonicNanoseconds()
        if fds[0].revents != 0 {
            if open && !handleInput() { open = false; fds[0].fd = -1 }
        }
        if fds[1].revents != 0 {
            var v: UInt64 = 0
            _ = Glibc.read(readiness, &v, 8)
            while queue.runCompletions(atMost: 64) > 0 {}
            retryDeferred()
        }
    }
    out.flush()
    logError("blocking writes: \(blockingWrites)")
}

/// Whether `length` bytes at `offset` (both from the wire) lie inside the volume,
/// without overflow.
func fitsInVolume(_ offset: UInt64, _ length: Int) -> Bool {
    UInt64(length) <= volumeSize && offset <= volumeSize - UInt64(length)
}

func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
func logError(_ s: String) { var t = s + "\n"; t.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) } }

let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
var address = sockaddr_un()
address.sun_family = sa_family_t(AF_UNIX)
let path = args[3]
guard path.utf8.count < MemoryLayout.size(ofValue: address.sun_path) else {
    logError("socket path too long: \(path)")
    exit(2)
}
unlink(path)
withUnsafeMutableBytes(of: &address.sun_path) { p in
    for (i, c) in path.utf8.enumerated() { p[i] = c }
}
_ = withUnsafePointer(to: &address) { p in
    p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
}
listen(listener, 16)
while true {
    let fd = accept(listener, nil, nil)
    if fd < 0 { continue }
    serve(fd)
    Glibc.close(fd)
    try? pool.commit()
}
