import NBDProtocol
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ThinSystem

/// A transmission loop outside swift-nio: one thread that polls its connections'
/// sockets and its own disk queue, and drives each connection's `NBDConnectionCore`
/// with plain reads and one gathered send per flush. Connections come to it after a
/// plain-text handshake on swift-nio (`NBDServer.Configuration.transmission == .lean`);
/// what may block still runs on the server's thread pool, and its outcome comes back
/// through the loop's inbox and wake-up counter.
///
/// Why: where the disk outruns one loop, the channel pipeline's cost per request is
/// the bound (docs/performance.md, "A transmission path outside the channel pipeline").
///
/// Threading: everything but `execute`, `stop` and the handle's calls runs on the
/// loop's own thread. The loop never waits except in its poller, with nothing to do.
final class LeanLoop: @unchecked Sendable {
    private let server: NBDServer
    private let index: Int
    private let poller: SocketPoller
    private let wakeup: WakeupCounter
    /// Work other threads handed to the loop, run on its thread in order.
    private let inbox = NIOLockedValueBox(Inbox())
    private struct Inbox {
        var tasks: [() -> Void] = []
        var stopped = false
    }
    /// Completes when the thread has ended (its queue closed, its connections gone).
    private let finished: EventLoopPromise<Void>

    // Loop-thread state (confined to the loop's thread, so without run-time
    // exclusivity checks, as `LoopIO`'s).
    @exclusivity(unchecked) private var connections: [UInt64: LeanConnection] = [:]
    @exclusivity(unchecked) private var nextToken: UInt64 = 2
    @exclusivity(unchecked) private(set) var queue: NBDLoopQueue?
    private var readinessDescriptor: Int32 = -1
    @exclusivity(unchecked) private var timers = TimerQueue()
    /// Connections whose replies wait for the flush at the end of this round.
    @exclusivity(unchecked) private var needFlush: [LeanConnection] = []
    @exclusivity(unchecked) private var flushBudget = CompletionFlushBudget()
    @exclusivity(unchecked) private var stopping = false
    /// The inbox's tasks, swapped out to run without the lock.
    @exclusivity(unchecked) private var running: [() -> Void] = []
    /// How long the loop polls before it sleeps.
    @exclusivity(unchecked) private var idleWindow: IdlePollWindow
    /// Work other threads owe the loop (thread-pool jobs, reads the device completes on
    /// its own thread): while there is any, the loop does not poll before sleeping.
    @exclusivity(unchecked) private var offLoopInFlight = 0

    private static let wakeupToken: UInt64 = 0
    private static let readinessToken: UInt64 = 1

    init(server: NBDServer, index: Int, finished: EventLoopPromise<Void>) throws {
        self.server = server
        self.index = index
        self.finished = finished
        idleWindow = IdlePollWindow(maximum: UInt64(clamping: max(0, server.configuration.idlePoll.nanoseconds)))
        poller = try SocketPoller()
        wakeup = try WakeupCounter()
        try poller.add(wakeup.descriptor, token: Self.wakeupToken)
    }

    /// Starts the loop's thread.
    func start() throws {
        try DetachedThread.start { [self] in run() }
    }

    /// Runs `task` on the loop's thread; false (nothing will run) once the loop stopped.
    /// Any thread.
    @discardableResult
    func execute(_ task: @escaping () -> Void) -> Bool {
        let accepted = inbox.withLockedValue { inbox -> Bool in
            guard !inbox.stopped else { return false }
            inbox.tasks.append(task)
            return true
        }
        if accepted { wakeup.signal() }
        return accepted
    }

    /// Asks the loop to end once its connections are gone: the caller closed or drained
    /// them first. Any thread. `finished` completes when it has.
    func stop() {
        execute { [self] in
            stopping = true
            for connection in Array(connections.values) { connection.close(flush: false) }
        }
    }

    // MARK: The loop

    private func run() {
        SocketIO.nameCurrentThread("thinbd-lean-\(index)")
        RecycledMemory.keepFreedBlocksOnThisThread()
        server.configuration.eventLoopThreadSetup?()
        startQueue()
        while true {
            if !pollBeforeSleeping() {
                let ready = poller.wait(timeoutMilliseconds: timers.timeoutMilliseconds(now: SystemInfo.monotonicNanoseconds())) {
                    event in handle(event)
                }
                if ready > 0 && idleWindow.measuring { idleWindow.workArrived(at: SystemInfo.monotonicNanoseconds()) }
            }
            runInbox()
            timers.runDue(now: SystemInfo.monotonicNanoseconds())
            endRound()
            if stopping && connections.isEmpty { break }
        }
        inbox.withLockedValue { $0.stopped = true }
        // Tasks that came in meanwhile are outcomes for connections that are gone.
        runInbox()
        if let queue {
            self.queue = nil
            queue.close()
            flushPending()
        }
        finished.succeed(())
    }

    /// Polls for the next event without sleeping, for up to the idle window's budget
    /// (`NBDServer.Configuration.idlePoll`, adapted as on swift-nio's loops by
    /// `IdlePollWindow`), unless the thread pool or the disk queue's own thread owes the
    /// loop work (spinning would take the CPU that work needs: 1 MiB cached reads under
    /// writeback ran 7-10 % slower polling while the page-cache thread copied them,
    /// docs/performance.md) or a timer comes sooner. Returns true when it caught
    /// events (and handled them); false when the loop is to sleep.
    private func pollBeforeSleeping() -> Bool {
        guard idleWindow.maximum > 0, offLoopInFlight == 0, !(queue?.isBusyOnItsThread ?? false) else { return false }
        let start = SystemInfo.monotonicNanoseconds()
        let timeout = timers.timeoutMilliseconds(now: start)
        guard timeout != 0 else { return false }
        var budget = idleWindow.budget
        if timeout > 0 { budget = min(budget, UInt64(timeout) * 1_000_000) }
        if budget > 0 {
            while true {
                if poller.wait(timeoutMilliseconds: 0, { event in handle(event) }) > 0 { return true }
                if SystemInfo.monotonicNanoseconds() &- start >= budget { break }
                // Two-core machines: the client may need this CPU to send what is awaited.
                SystemInfo.yieldProcessor()
            }
        }
        idleWindow.sleeping(at: SystemInfo.monotonicNanoseconds())
        return false
    }

    private func startQueue() {
        guard let candidate = server.provider.makeLoopQueue() else { return }
        do {
            let descriptor = try candidate.makeReadinessDescriptor()
            do {
                try SocketIO.makeNonBlocking(descriptor)
                try poller.add(descriptor, token: Self.readinessToken)
            } catch {
                candidate.releaseReadinessDescriptor(descriptor)
                throw error
            }
            readinessDescriptor = descriptor
            queue = candidate
        } catch {
            server.log("disk completions stay off the lean loop: \(error)")
            candidate.close()
        }
    }

    private func handle(_ event: SocketPoller.Event) {
        switch event.token {
        case Self.wakeupToken:
            wakeup.reset()
        case Self.readinessToken:
            runCompletions()
        default:
            guard let connection = connections[event.token] else { return }
            if event.writable { connection.socketWritable() }
            if event.readable || event.failed { connection.socketReadable(failed: event.failed) }
        }
    }

    private func runInbox() {
        // Swapped, so both arrays keep their capacity and the lock is held for no task.
        inbox.withLockedValue { swap(&running, &$0.tasks) }
        for task in running { task() }
        running.removeAll(keepingCapacity: true)
    }

    private func runCompletions() {
        guard let queue else { return }
        SocketIO.resetCounter(readinessDescriptor)
        flushBudget.runCompletions(of: queue) { flushPending() }
    }

    /// The end of a round: replies written by completions and tasks go out, and what
    /// the round queued on the disk leaves in one submission.
    private func endRound() {
        flushBudget.reset()
        flushPending()
        queue?.submitQueued()
    }

    private func flushPending() {
        guard !needFlush.isEmpty else { return }
        for connection in needFlush { connection.flush() }
        needFlush.removeAll(keepingCapacity: true)
    }

    // MARK: For connections (loop thread)

    func flushAtEndOfRound(_ connection: LeanConnection) {
        needFlush.append(connection)
    }

    /// A completion wrote a read reply with `count` data bytes (see `CompletionFlushBudget`).
    func readDataQueued(_ count: Int) {
        flushBudget.readDataQueued(count)
    }

    func schedule(after delay: TimeAmount, _ task: @escaping () -> Void) {
        let wait = UInt64(clamping: max(0, delay.nanoseconds))
        timers.add(at: SystemInfo.monotonicNanoseconds() &+ wait, task)
    }

    /// Runs `body` on the server's thread pool and `completion` with its result back on
    /// this loop; a failure means the pool has stopped.
    func offLoop<T>(_ body: @escaping () -> T, completion: @escaping (Result<T, Error>) -> Void) {
        awaitingOtherThread()
        let job = OffLoopJob(loop: self, body: body) { [self] outcome in
            otherThreadAnswered()
            completion(outcome)
        }
        server.threadPool.submit { state in
            if case .active = state {
                job.run()
            } else {
                job.refuse()
            }
        }
    }

    /// Counts work another thread will hand back through `execute` (loop thread).
    func awaitingOtherThread() { offLoopInFlight += 1 }

    /// That work came back (loop thread).
    func otherThreadAnswered() { offLoopInFlight -= 1 }

    func socketInterestChanged(_ connection: LeanConnection, readable: Bool, writable: Bool) {
        do {
            try poller.modify(connection.descriptor, token: connection.token, readable: readable, writable: writable)
        } catch {
            server.log("closing connection: \(error)")
            connection.close(flush: false)
        }
    }

    func connectionClosed(_ connection: LeanConnection) {
        connections[connection.token] = nil
        SocketIO.close(connection.descriptor)
    }

    // MARK: Adoption

    /// Takes a connection handed off after its handshake (on the loop's thread); its
    /// `leftover` bytes (what arrived after the handshake's last option) are parsed
    /// first.
    func adopt(_ handOff: LeanHandOff) {
        let token = nextToken
        nextToken += 1
        let connection = LeanConnection(loop: self, server: server, token: token, handOff: handOff)
        do {
            try poller.add(handOff.descriptor, token: token)
        } catch {
            server.log("closing connection: \(error)")
            SocketIO.close(handOff.descriptor)
            connection.abandon()
            return
        }
        connections[token] = connection
        connection.start(leftover: handOff.leftover, shuttingDown: stopping)
    }

    func connection(_ token: UInt64) -> LeanConnection? { connections[token] }
}

/// What a connection brings to a lean loop.
struct LeanHandOff: @unchecked Sendable {
    var descriptor: Int32
    var session: NBDSession
    var export: NBDExport
    var leftover: ByteBuffer
    var handle: LeanConnectionHandle
}

/// A lean connection as the server's registry knows it (any thread).
final class LeanConnectionHandle: Sendable {
    let loop: LeanLoop
    let closed: EventLoopPromise<Void>
    /// Set by the loop when it adopts the connection.
    private let token = NIOLockedValueBox<UInt64?>(nil)

    init(loop: LeanLoop, closed: EventLoopPromise<Void>) {
        self.loop = loop
        self.closed = closed
    }

    func adopted(as token: UInt64) { self.token.withLockedValue { $0 = token } }

    private func withConnection(_ body: @escaping (LeanConnection) -> Void) {
        let loop = self.loop
        loop.execute { [self] in
            guard let token = token.withLockedValue({ $0 }), let connection = loop.connection(token) else { return }
            body(connection)
        }
    }

    /// Running requests finish, later ones get ESHUTDOWN, then it closes.
    func requestShutdown() { withConnection { $0.shutdownRequested() } }

    func close() { withConnection { $0.close(flush: false) } }
}

/// Work a lean loop hands to the thread pool: `body` runs there, `completion` back on
/// the loop. Its fields are touched by one thread at a time (the pool's hand-off and
/// the loop's inbox order them).
private final class OffLoopJob<T>: @unchecked Sendable {
    private let loop: LeanLoop
    private let body: () -> T
    private let completion: (Result<T, Error>) -> Void
    private var outcome: Result<T, Error>?

    init(loop: LeanLoop, body: @escaping () -> T, completion: @escaping (Result<T, Error>) -> Void) {
        self.loop = loop
        self.body = body
        self.completion = completion
    }

    func run() {
        outcome = .success(body())
        loop.execute(finish)
    }

    func refuse() {
        outcome = .failure(NIOThreadPoolError.ThreadPoolInactive())
        loop.execute(finish)
    }

    private func finish() {
        if let outcome { completion(outcome) }
    }
}

/// A loop-thread-only value carried through another thread and back, untouched there.
struct LoopBound<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

/// Timers of a lean loop: a binary heap by deadline (ties in the order added).
struct TimerQueue {
    private struct Entry {
        var deadline: UInt64
        var sequence: UInt64
        var task: () -> Void
        func precedes(_ other: Entry) -> Bool {
            (deadline, sequence) < (other.deadline, other.sequence)
        }
    }
    private var heap: [Entry] = []
    private var sequence: UInt64 = 0

    mutating func add(at deadline: UInt64, _ task: @escaping () -> Void) {
        sequence += 1
        heap.append(Entry(deadline: deadline, sequence: sequence, task: task))
        var child = heap.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard heap[child].precedes(heap[parent]) else { break }
            heap.swapAt(child, parent)
            child = parent
        }
    }

    /// How long the loop may sleep: -1 (no timer), or the milliseconds to the earliest,
    /// rounded up so that it never wakes early and spins.
    func timeoutMilliseconds(now: UInt64) -> Int32 {
        guard let first = heap.first else { return -1 }
        guard first.deadline > now else { return 0 }
        let nanoseconds = first.deadline - now
        // Rounded up without adding (a deadline far off must not overflow).
        return Int32(clamping: nanoseconds / 1_000_000 + (nanoseconds % 1_000_000 == 0 ? 0 : 1))
    }

    /// Runs every timer due by `now`, earliest first.
    mutating func runDue(now: UInt64) {
        while let first = heap.first, first.deadline <= now {
            removeFirst()
            first.task()
        }
    }

    private mutating func removeFirst() {
        heap.swapAt(0, heap.count - 1)
        heap.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var first = parent
            if left < heap.count && heap[left].precedes(heap[first]) { first = left }
            if right < heap.count && heap[right].precedes(heap[first]) { first = right }
            guard first != parent else { return }
            heap.swapAt(parent, first)
            parent = first
        }
    }
}
