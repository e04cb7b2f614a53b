import CThinSupport
import Glibc

/// A thread of its own that copies an event loop's writes into the page cache
/// (pwrite), for a `URingLoopQueue`.
///
/// Why not io_uring: ext4 refuses non-blocking buffered writes, so io_uring hands every
/// one to an io-wq worker after trying it inline. Measured on this project's VM with 4K
/// `--cache writeback` random writes at QD32, that path cost about 9.6 µs of kernel CPU
/// per write (loop 5.3, io-wq 4.2) where the same writes made by plain pwrite on other
/// threads cost 6.7 (docs/performance.md, "Page-cache writes on a thread of their own").
///
/// How it moves work: the owner (the loop) hands over a batch of jobs with one lock and,
/// when the thread sleeps, one wake-up; the thread makes them in order, posts what it
/// finished in one batch, and writes the owner's readiness eventfd only when the
/// finished list goes from empty to non-empty (the owner reads the eventfd before it
/// collects, so no signal is lost and a burst costs one). Arrays are swapped, not
/// rebuilt, so a steady load allocates nothing.
///
/// A write that blocks (dirty-page throttling, a full disk) delays the later writes of
/// its owner, never the owner itself: it only hands over and collects, never waits.
/// Crash safety is the page cache's: a finished write is in the cache, and only a
/// barrier (fdatasync) makes it durable, as with io_uring.
final class PageCacheWriter: @unchecked Sendable {
    struct Job {
        var fd: Int32
        var request: IORequest
        /// The owner's operation slot (`InFlightOperations`).
        var slot: Int
    }

    struct Finished {
        var slot: Int
        var error: SystemError?
    }

    private struct Inbox {
        var jobs: [Job] = []
        var stopping = false
    }

    private let inbox = WaitableValue(Inbox())
    /// Nobody waits on it: the owner learns of new entries from its readiness eventfd.
    private let outbox = LockedValue([Finished]())
    /// A duplicate of the owner's readiness eventfd, closed by the thread as it ends:
    /// the owner may close its own as soon as the last job is collected, while this
    /// thread may still be about to signal.
    private let readiness: Int32

    /// Starts the thread, which signals `readiness` (duplicated here). Throws when
    /// either cannot be made.
    init(readiness eventFD: Int32) throws(SystemError) {
        let copy = Glibc.dup(eventFD)
        guard copy >= 0 else { throw SystemError.current("dup") }
        readiness = copy
        do {
            try DetachedThread.start { [self] in run() }
        } catch {
            Syscall.close(copy)
            throw error
        }
    }

    /// Owner side: hands `jobs` over (leaving it empty, with its capacity kept when the
    /// thread had taken the last batch). Never waits for long: one lock, at most one wake.
    func submit(_ jobs: inout [Job]) {
        guard !jobs.isEmpty else { return }
        inbox.update { inbox in
            if inbox.jobs.isEmpty {
                swap(&inbox.jobs, &jobs)
            } else {
                inbox.jobs.append(contentsOf: jobs)
                jobs.removeAll(keepingCapacity: true)
            }
        }
    }

    /// Owner side: swaps everything finished into `finished` (which must be empty).
    /// Never waits for long.
    func collect(into finished: inout [Finished]) {
        outbox.withLockedValue { outbox in
            guard !outbox.isEmpty else { return }
            swap(&outbox, &finished)
        }
    }

    /// Lets the thread end once the jobs handed over are done.
    func stop() {
        inbox.update { $0.stopping = true }
    }

    private func run() {
        var batch: [Job] = []
        var done: [Finished] = []
        defer { Syscall.close(readiness) }
        // Named apart from the loop it was started from (threads inherit the name).
        thinbd_name_this_thread("thinbd-pcwrite")
        while true {
            let stopping = inbox.wait { inbox -> Bool? in
                if !inbox.jobs.isEmpty {
                    swap(&inbox.jobs, &batch)
                    return false
                }
                return inbox.stopping ? true : nil
            }
            if stopping { return }
            for job in batch {
                var error: SystemError?
                do {
                    try Syscall.pwriteFully(job.fd, UnsafeRawBufferPointer(job.request.buffer), job.request.offset)
                } catch let failure {
                    error = failure
                }
                done.append(Finished(slot: job.slot, error: error))
            }
            batch.removeAll(keepingCapacity: true)
            let wasEmpty = outbox.withLockedValue { outbox -> Bool in
                let wasEmpty = outbox.isEmpty
                if wasEmpty {
                    swap(&outbox, &done)
                } else {
                    outbox.append(contentsOf: done)
                    done.removeAll(keepingCapacity: true)
                }
                return wasEmpty
            }
            if wasEmpty {
                var one: UInt64 = 1
                _ = Glibc.write(readiness, &one, 8)
            }
        }
    }
}
