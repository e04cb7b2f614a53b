import CThinSupport
import Foundation
import Testing
@testable import ThinSystem

/// `EventLoopPoller`: finding an epoll instance by a descriptor it watches, and polling
/// it without sleeping.
@Suite struct EventLoopPollerTests {
    /// An epoll instance watching a fresh eventfd, as an event loop watches its
    /// descriptors; closed by `close`.
    struct Loop {
        let epoll: Int32
        let event: Int32

        init() throws {
            event = thinbd_eventfd()
            guard event >= 0 else { throw POSIXError(.EMFILE) }
            epoll = thinbd_epoll_watching(event)
            guard epoll >= 0 else {
                Glibc.close(event)
                throw POSIXError(.EMFILE)
            }
        }

        func signal() {
            var one: UInt64 = 1
            _ = write(event, &one, 8)
        }

        func drain() {
            var count: UInt64 = 0
            _ = read(event, &count, 8)
        }

        func close() {
            Glibc.close(event)
            Glibc.close(epoll)
        }
    }

    @Test func findsTheEpollInstanceWatchingADescriptorAndSeesItsEvents() throws {
        let loop = try Loop()
        defer { loop.close() }
        let poller = try #require(EventLoopPoller.forEpoll(watching: loop.event))
        defer { poller.close() }

        let start = Date()
        #expect(!poller.pollUntilReady(nanoseconds: 2_000_000), "nothing is ready yet")
        #expect(Date().timeIntervalSince(start) >= 0.002, "it polled for the whole budget")

        loop.signal()
        #expect(poller.pollUntilReady(nanoseconds: 5_000_000_000), "the eventfd is readable")
        loop.drain()
        #expect(!poller.pollUntilReady(nanoseconds: 0))
    }

    @Test func anEventFromAnotherThreadEndsThePollBeforeItsBudget() throws {
        let loop = try Loop()
        defer { loop.close() }
        let poller = try #require(EventLoopPoller.forEpoll(watching: loop.event))
        defer { poller.close() }
        let signaller = Thread {
            usleep(20_000)
            loop.signal()
        }
        signaller.start()
        let start = Date()
        // A 30-second budget: only the event can end this poll in time for the test.
        #expect(poller.pollUntilReady(nanoseconds: 30_000_000_000))
        #expect(Date().timeIntervalSince(start) < 20, "the poll ended with the event, not its budget")
    }

    @Test func theDuplicateOutlivesTheLoopsOwnDescriptor() throws {
        var loop = try Loop()
        let poller = try #require(EventLoopPoller.forEpoll(watching: loop.event))
        defer { poller.close() }
        loop.signal()
        // The loop closes its epoll descriptor; the instance lives on through the copy.
        Glibc.close(loop.epoll)
        #expect(poller.pollUntilReady(nanoseconds: 1_000_000_000))
        Glibc.close(loop.event)
        loop = try Loop()
        loop.close()
    }

    @Test func aDescriptorNoEpollWatchesHasNoPoller() throws {
        let loop = try Loop()
        defer { loop.close() }
        let unwatched = thinbd_eventfd()
        defer { close(unwatched) }
        #expect(EventLoopPoller.forEpoll(watching: unwatched) == nil)
        #expect(EventLoopPoller.forEpoll(watching: -1) == nil)
    }

    @Test func readsTheWatchListOfAnEpollFdinfo() {
        let info = """
            pos:\t0
            flags:\t02000002
            mnt_id:\t16
            ino:\t2060
            tfd:        7 events:       19 data:                7  pos:0 ino:810 sdev:10
            tfd:       12 events: 80000019 data:  000000000000000c  pos:0 ino:810 sdev:10
            tfd: garbage
            tfd:
            """
        #expect(EventLoopPoller.watchList(ofEpollFdinfo: Array(info.utf8)) == [7, 12])
    }
}
