import Foundation
import Logging
import Testing

@testable import ThinServe

/// The server's lifecycle: parts stop in reverse order of setup, each exactly once,
/// whether the ServiceGroup stops them or a failed setup does.
@Suite struct ServeServicesTests {
    final class Recorder: @unchecked Sendable {
        private let lock = NSLock()
        private var names: [String] = []
        func record(_ name: String) { lock.withLock { names.append(name) } }
        var stopped: [String] { lock.withLock { names } }
    }

    @Test func aStopRequestStopsEveryPartInReverseOrder() async {
        let services = ServeServices()
        let recorder = Recorder()
        for name in ["pool", "auto-committer", "listeners", "control socket"] {
            services.add(name) {
                // A slow stop must not let the next one start early.
                if name == "listeners" { usleep(50_000) }
                recorder.record(name)
            }
        }
        let stop = StopRequest()
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(100)) { stop.request() }
        await services.runGroup(until: stop, logger: Logger(label: "test"))
        #expect(recorder.stopped == ["control socket", "listeners", "auto-committer", "pool"])
        services.stopAll()
        #expect(recorder.stopped.count == 4, "each part stops once")
    }

    @Test func aStopRequestedBeforeRunningStillStopsEverything() async {
        let services = ServeServices()
        let recorder = Recorder()
        services.add("a") { recorder.record("a") }
        services.add("b") { recorder.record("b") }
        let stop = StopRequest()
        stop.request()
        stop.request()
        await services.runGroup(until: stop, logger: Logger(label: "test"))
        #expect(recorder.stopped == ["b", "a"])
    }

    @Test func aFailedSetupStopsWhatWasUpInReverse() {
        let services = ServeServices()
        let recorder = Recorder()
        services.add("pool") { recorder.record("pool") }
        services.add("listeners") { recorder.record("listeners") }
        services.stopAll()
        services.stopAll()
        #expect(recorder.stopped == ["listeners", "pool"])
    }
}
