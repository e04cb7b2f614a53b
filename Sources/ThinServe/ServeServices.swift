import Dispatch
import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

/// The parts of a running server, in the order they were set up, each with the one
/// action that stops it. `run` hands them to a swift-service-lifecycle `ServiceGroup`,
/// which stops them in reverse order once a stop is requested; `stopAll` does the same
/// by hand when setting up failed half-way. Either way each part stops exactly once.
final class ServeServices: Sendable {
    private let parts = NIOLockedValueBox<[ServePart]>([])

    /// Records a part that is now running, with how to stop it (may block).
    func add(_ name: String, stop: @escaping @Sendable () -> Void) {
        parts.withLockedValue { $0.append(ServePart(name: name, stop: stop)) }
    }

    /// Stops every part, in reverse order of setup.
    func stopAll() {
        for part in parts.withLockedValue({ $0 }).reversed() { part.stopOnce() }
    }

    /// Runs the parts until `stop` is requested, then stops them in reverse order.
    /// Blocks the calling thread meanwhile: call it from a thread of its own (the
    /// process's main thread), never from Swift concurrency's pool or an event loop.
    func run(until stop: StopRequest, logger: Logger) {
        let finished = DispatchSemaphore(value: 0)
        Task {
            await runGroup(until: stop, logger: logger)
            finished.signal()
        }
        finished.wait()
    }

    /// `run`, for callers in Swift concurrency.
    func runGroup(until stop: StopRequest, logger: Logger) async {
        let configured = parts.withLockedValue { $0 }.map { part in
            ServiceGroupConfiguration.ServiceConfiguration(
                service: part, successTerminationBehavior: .gracefullyShutdownGroup,
                failureTerminationBehavior: .gracefullyShutdownGroup, serviceName: part.name)
        }
        // The request to stop is a service of its own, last: it returns when a stop is
        // requested, and the group then shuts the others down, last set up first.
        let trigger = ServiceGroupConfiguration.ServiceConfiguration(
            service: stop, successTerminationBehavior: .gracefullyShutdownGroup, serviceName: "stop request")
        var groupLogger = logger
        groupLogger.logLevel = max(logger.logLevel, .notice)
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: configured + [trigger], logger: groupLogger))
        do {
            try await group.run()
        } catch {
            logger.error("shutting down: \(error)")
        }
        // A part the group could not reach (cancelled early) still stops.
        stopAll()
    }
}

/// One part of the server as a `Service`: it runs until the group shuts down, then
/// stops off the cooperative thread pool (stopping may wait for connections, commits).
final class ServePart: Service, Sendable {
    let name: String
    private let stop: @Sendable () -> Void
    private let stopped = NIOLockedValueBox(false)

    init(name: String, stop: @escaping @Sendable () -> Void) {
        self.name = name
        self.stop = stop
    }

    func run() async throws {
        try? await gracefulShutdown()
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async {
                self.stopOnce()
                done.resume()
            }
        }
    }

    func stopOnce() {
        let first = stopped.withLockedValue { stopped -> Bool in
            defer { stopped = true }
            return !stopped
        }
        if first { stop() }
    }
}

/// A request to stop the server (a signal, the end of `--run`'s command or of the
/// `--stdio` connection), from any thread, any number of times. As a `Service`, it
/// returns once requested, or when the group shuts down for another reason.
final class StopRequest: Service, Sendable {
    private let state = NIOLockedValueBox<(requested: Bool, waiter: CheckedContinuation<Void, Never>?)>((false, nil))

    func request() {
        let waiter = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
            state.requested = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume()
    }

    func run() async throws {
        await withGracefulShutdownHandler {
            await withCheckedContinuation { (waiter: CheckedContinuation<Void, Never>) in
                let now = state.withLockedValue { state -> Bool in
                    if state.requested { return true }
                    state.waiter = waiter
                    return false
                }
                if now { waiter.resume() }
            }
        } onGracefulShutdown: {
            self.request()
        }
    }
}

/// Whether closing the pool failed (the exit status says so).
final class ClosedBox: Sendable {
    private let failure = NIOLockedValueBox(false)
    func failed() { failure.withLockedValue { $0 = true } }
    var hasFailed: Bool { failure.withLockedValue { $0 } }
}
