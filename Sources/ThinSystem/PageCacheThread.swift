import CThinSupport
import Glibc
import Synchronization

/// A thread of its own that copies an event loop's writes into the page cache
/// (pwrite), and its large reads out of it, for a `URingLoopQueue`.
///
/// Why not io_uring: ext4 refuses non-blocking buffered writes, so io_uring hands every
/// one to an io-wq worker after trying it inline. Measured on this project's VM with 4K
/// `--cache writeback` random writes at QD32, that path cost about 9.6 µs of kernel CPU
/// per write (loop 5.3, io-wq 4.2) where the same writes made by plain pwrite on other
/// threads cost 6.7 (docs/performance.md, "Page-cache writes on a thread of their own").
///
/// Why large reads: a cached read is a copy out of the page cache, and its reply a second
/// copy into the socket. Made on the loop, both copies of a 1 MiB read fell on the
/// loop's core, which set the pace of sequential reads while the other core idled
/// (docs/performance.md, "Large cached reads off the loop"). A read comes here only to be
/// copied: the thread tries it with RWF_NOWAIT, and one the cache cannot serve in full
/// goes back to the owner, whose ring reads it, so that a wait for the disk never holds
/// up the jobs behind it.
///
/// How it moves work: two `HandOffRing`s, jobs out and outcomes back, so neither side
/// ever takes a lock the other may hold. (A mutex and condition variable did this
/// before; under load the loop was caught sleeping in the kernel inside
/// pthread_cond_broadcast, on the condition's internal lock while the writer woke.)
/// - The owner (the loop) stages jobs, publishes them with one store, and writes the
///   thread's wake-up eventfd only when the thread said it is going to sleep.
/// - The thread makes the jobs in order and publishes each outcome as it is done. It
///   writes the owner's readiness eventfd only when the owner has looked since its
///   last signal, so a burst costs one signal and a busy owner none.
/// - Nothing allocates once the rings exist.
///
final class PageCacheThread: @unchecked Sendable {
    struct Job {
        var fd: Int32
        var request: IORequest
        /// The owner's operation slot (`InFlightOperations`).
        var slot: Int
    }

    struct Finished {
        var slot: Int
        var error: SystemError?
        /// A read the page cache could not serve in full without waiting (nothing is
        /// known of its buffer): the owner reads it another way, for the same slot.
        var uncachedRead: Job?
    }

    private let jobs: HandOffRing<Job>
    private let outcomes: HandOffRing<Finished>
    /// Set by the thread just before it sleeps on `wakeup`, cleared by whoever wakes it:
    /// the owner makes a system call only for a thread that sleeps.
    private let sleeping = Atomic<Bool>(false)
    /// Set by the thread when it signals `readiness`, cleared by the owner as it starts
    /// collecting: the thread signals again only once the owner has looked.
    private let signalled = Atomic<Bool>(false)
    private let stopping = Atomic<Bool>(false)
    /// The eventfd the thread sleeps on (blocking reads).
    private let wakeup: Int32
    /// A duplicate of the owner's readiness eventfd: the owner may close its own as
    /// soon as the last job is collected, while the thread may still be about to signal.
    /// Both descriptors close in `deinit`, once the thread and the owner let go.
    private let readiness: Int32

    /// Starts the thread, which signals `readiness` (duplicated here) and takes at most
    /// `capacity` jobs in flight (handed over and not yet collected). Throws when
    /// the thread or a descriptor cannot be made.
    init(readiness eventFD: Int32, capacity: Int) throws(SystemError) {
        jobs = HandOffRing(minimumCapacity: capacity)
        outcomes = HandOffRing(minimumCapacity: capacity)
        let copy = Glibc.dup(eventFD)
        guard copy >= 0 else { throw SystemError.current("dup") }
        let sleeper = thinbd_eventfd()
        guard sleeper >= 0 else {
            Syscall.close(copy)
            throw SystemError.current("eventfd")
        }
        readiness = copy
        wakeup = sleeper
        // On failure deinit closes both descriptors.
        try DetachedThread.start { [self] in run() }
    }

    deinit {
        Syscall.close(wakeup)
        Syscall.close(readiness)
    }

    /// Owner side: whether `count` jobs can be staged now.
    func hasRoom(for count: Int) -> Bool { jobs.hasRoom(for: count) }

    /// Owner side: stages `job`, handed over at the next `submit`. False when the ring is
    /// full: ask `hasRoom` first.
    func stage(_ job: Job) -> Bool { jobs.stage(job) }

    /// Owner side: hands the staged jobs over. Never waits: one store, and one eventfd
    /// write when the thread sleeps.
    func submit() {
        guard jobs.publish() else { return }
        wakeIfSleeping()
    }

    /// Owner side: runs `body` for each job finished, oldest first, at most `limit`.
    /// Never waits. Returns how many ran.
    ///
    /// Call it whenever the readiness eventfd was read, even with no job in flight:
    /// the thread signals only after a collect, and its last signal may come after the
    /// outcome it announced was already collected. Skipping this call then would leave
    /// the next outcome unannounced and the owner asleep.
    func collect(atMost limit: Int, _ body: (Finished) -> Void) -> Int {
        // Before looking: an outcome published after this store is signalled anew.
        signalled.store(false, ordering: .sequentiallyConsistent)
        var count = 0
        while count < limit, let finished = outcomes.take() {
            count += 1
            body(finished)
        }
        return count
    }

    /// Lets the thread end once the jobs handed over are done.
    func stop() {
        stopping.store(true, ordering: .sequentiallyConsistent)
        sleeping.store(false, ordering: .relaxed)
        Self.signal(wakeup)
    }

    private func wakeIfSleeping() {
        // Sequentially consistent, after the ring's publish: either this sees the flag,
        // or the thread, which sets it before looking at the ring, sees the jobs.
        if sleeping.load(ordering: .sequentiallyConsistent), sleeping.exchange(false, ordering: .sequentiallyConsistent) {
            Self.signal(wakeup)
        }
    }

    private static func signal(_ eventFD: Int32) {
        var one: UInt64 = 1
        _ = Glibc.write(eventFD, &one, 8)
    }

    private func run() {
        // Named apart from the loop it was started from (threads inherit the name).
        thinbd_name_this_thread("thinbd-pcache")
        while true {
            while let job = jobs.take() {
                report(Self.carryOut(job))
            }
            if stopping.load(ordering: .sequentiallyConsistent) { return }
            sleeping.store(true, ordering: .sequentiallyConsistent)
            if !jobs.isEmpty || stopping.load(ordering: .sequentiallyConsistent) {
                // Work came in meanwhile. If the owner saw the flag too, its signal stays
                // in the eventfd and costs one spare turn later.
                sleeping.store(false, ordering: .relaxed)
                continue
            }
            var count: UInt64 = 0
            _ = Glibc.read(wakeup, &count, 8)
            sleeping.store(false, ordering: .relaxed)
        }
    }

    /// Makes the write, or tries the read without waiting; what to report back.
    private static func carryOut(_ job: Job) -> Finished {
        let request = job.request
        if request.kind == .read {
            let count = request.buffer.count
            let n = thinbd_pread_nowait(job.fd, request.buffer.baseAddress, UInt(count), Int64(request.offset))
            // Short, EAGAIN or an error: the owner's ring reads it again, whole, and
            // reports a real error with the read's own outcome.
            return n == count ? Finished(slot: job.slot) : Finished(slot: job.slot, uncachedRead: job)
        }
        do {
            try Syscall.pwriteFully(job.fd, UnsafeRawBufferPointer(request.buffer), request.offset)
            return Finished(slot: job.slot)
        } catch {
            return Finished(slot: job.slot, error: error)
        }
    }

    /// Publishes one outcome, signalling the owner when it has looked since the last one.
    private func report(_ finished: Finished) {
        // Room is there: outcomes and jobs together never exceed the owner's capacity.
        // Should that ever break, waiting for the owner to collect is still correct.
        while !outcomes.stage(finished) {
            outcomes.publish()
            announce()
            SystemInfo.yieldProcessor()
        }
        outcomes.publish()
        announce()
    }

    private func announce() {
        if !signalled.exchange(true, ordering: .sequentiallyConsistent) { Self.signal(readiness) }
    }
}
