import Foundation
import Testing
import ThinPool
import ThinSystem

/// Event loop threads never block: on a thread marked with `NonBlockingThread`, the
/// non-blocking read path works, and every pool call that could wait stops a debug build
/// (an exit test: the call runs in a child process, which must die).
@Suite struct LoopThreadTests {
    @Test func nonBlockingReadsWorkOnAMarkedThread() throws {
        let (pool, _) = try makeMemoryPool()
        _ = try pool.createVolume("v", size: 1 << 20)
        try pool.write("v", at: 0, pattern(8192, seed: 3))
        let id = try pool.volumeID("v")
        let expected = try pool.read("v", at: 0, count: 8192)
        // A fresh thread of its own, so the mark does not leak into other tests.
        let result = runOnMarkedThread { () -> [UInt8]? in
            var bytes = [UInt8](repeating: 0, count: 8192)
            let outcome = bytes.withUnsafeMutableBytes { raw in
                pool.readWithoutBlocking(id, at: 0, into: raw, queue: nil) { _ in }
            }
            guard case .completed(.success) = outcome else { return nil }
            return bytes
        }
        #expect(result == expected)
    }

    #if DEBUG
    @Test func aCommitOnALoopThreadStopsADebugBuild() async {
        await #expect(processExitsWith: .failure) {
            let (pool, _) = try makeMemoryPool()
            NonBlockingThread.markCurrent()
            try pool.commit()
        }
    }

    @Test func aCloneOnALoopThreadStopsADebugBuild() async {
        await #expect(processExitsWith: .failure) {
            let (pool, _) = try makeMemoryPool()
            _ = try pool.createVolume("a", size: 1 << 20)
            NonBlockingThread.markCurrent()
            _ = try pool.clone("a", as: "job-1")
        }
    }

    @Test func aBlockingReadOnALoopThreadStopsADebugBuild() async {
        await #expect(processExitsWith: .failure) {
            let (pool, _) = try makeMemoryPool()
            _ = try pool.createVolume("a", size: 1 << 20)
            NonBlockingThread.markCurrent()
            _ = try pool.read("a", at: 0, count: 4096)
        }
    }
    #endif
}

/// Runs `body` on a new thread marked non-blocking and returns its result.
func runOnMarkedThread<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
    let box = ThreadResult<T>()
    let done = DispatchSemaphore(value: 0)
    // A thread of its own (not a reused pool thread), so the mark ends with it.
    let thread = Thread {
        NonBlockingThread.markCurrent()
        box.value = body()
        done.signal()
    }
    thread.start()
    done.wait()
    return box.value!
}

final class ThreadResult<T>: @unchecked Sendable {
    var value: T?
}
