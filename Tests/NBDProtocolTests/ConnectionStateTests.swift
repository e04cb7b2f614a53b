import Testing

@testable import NBDServer

/// `NBDConnectionState` on its own: back-pressure, draining and closing as actions.
@Suite struct ConnectionStateTests {
    func active(maxInFlight: Int = 2, maxBytes: Int = 1 << 20) -> NBDConnectionState {
        var state = NBDConnectionState(maxInFlight: maxInFlight, maxInFlightBytes: maxBytes)
        state.enterTransmission()
        return state
    }

    @Test func handshakeReadsAndParsesUntilTransmission() {
        var state = NBDConnectionState(maxInFlight: 2, maxInFlightBytes: 100)
        #expect(state.phase == .handshake)
        #expect(state.readRequested() == .read)
        #expect(state.mayParse)
        #expect(state.admit() == .drop, "no request runs before transmission")
        state.enterTransmission()
        #expect(state.phase == .active && state.isInTransmission)
    }

    @Test func inFlightLimitHoldsReadsAndReleasesThemWhenRoomOpens() {
        var state = active()
        state.requestStarted(bytes: 10)
        #expect(state.mayParse)
        state.requestStarted(bytes: 10)
        #expect(!state.mayParse)
        #expect(state.readRequested() == [])
        #expect(state.readHeld)
        #expect(state.requestFinished(bytes: 10) == [.parse, .read])
        #expect(!state.readHeld)
        #expect(state.requestFinished(bytes: 10) == [.parse])
    }

    @Test func payloadBytesAreBoundedToo() {
        var state = active(maxInFlight: 64, maxBytes: 1000)
        state.requestStarted(bytes: 999)
        #expect(state.mayParse, "below the budget")
        state.requestStarted(bytes: 5)
        #expect(!state.mayParse, "at or past the budget nothing more is parsed")
        #expect(state.readRequested() == [])
        #expect(state.requestFinished(bytes: 999) == [.parse, .read])
        #expect(state.inFlightBytes == 5)
    }

    @Test func aClientThatStopsReadingRepliesStopsBeingRead() {
        var state = active()
        #expect(state.writabilityChanged(false) == [])
        #expect(!state.mayParse)
        #expect(state.readRequested() == [])
        #expect(state.writabilityChanged(true) == [.parse, .read])
    }

    @Test func disconnectDrainsThenCloses() {
        var state = active()
        state.requestStarted(bytes: 1)
        state.disconnectRequested()
        #expect(state.phase == .draining(.clientDisconnect))
        #expect(!state.mayParse)
        #expect(state.admit() == .drop)
        #expect(state.inputProcessed() == [], "a request still runs")
        #expect(state.readRequested() == [])
        #expect(state.requestFinished(bytes: 1) == [.close])
        #expect(state.phase == .closed && !state.isOpen)
        var idle = active()
        idle.disconnectRequested()
        #expect(idle.inputProcessed() == [.close])
    }

    @Test func shutdownAnswersWhatArrivedThenCloses() {
        var state = active()
        state.requestStarted(bytes: 1)
        #expect(state.shutdownRequested() == [.parse])
        #expect(state.admit() == .refuseShuttingDown)
        #expect(state.mayParse, "arrived requests are answered with ESHUTDOWN")
        #expect(state.inputProcessed() == [])
        #expect(state.requestFinished(bytes: 1) == [.parse])
        #expect(state.inputProcessed() == [.close])
        #expect(state.shutdownRequested() == [], "once is enough")

        var handshaking = NBDConnectionState(maxInFlight: 2, maxInFlightBytes: 100)
        #expect(handshaking.shutdownRequested() == [.parse, .close])
    }

    @Test func lateCompletionsAfterCloseDoNothing() {
        var state = active()
        state.requestStarted(bytes: 3)
        state.closed()
        #expect(!state.isOpen)
        #expect(state.readRequested() == [])
        #expect(state.admit() == .drop)
        #expect(state.requestFinished(bytes: 3) == [])
        #expect(state.inFlight == 0)
        #expect(state.writabilityChanged(true) == [])
    }

    @Test func anEndedInputIsParsedAndAnsweredBeforeTheClose() {
        var state = active(maxInFlight: 2)
        state.requestStarted(bytes: 10)
        state.requestStarted(bytes: 10)
        // The client half-closes with more requests unparsed (no room for them yet).
        #expect(state.inputEnded() == [.parse])
        #expect(state.isOpen && !state.mayParse)
        #expect(state.readRequested() == [], "nothing more to read")
        #expect(state.requestFinished(bytes: 10) == [.parse], "room: the rest is parsed")
        #expect(state.admit() == .run, "what arrived before the end still runs")
        state.requestStarted(bytes: 10)
        #expect(state.inputProcessed() == [], "requests still running")
        #expect(state.requestFinished(bytes: 10) == [.parse])
        #expect(state.requestFinished(bytes: 10) == [.parse], "a pass notices it is done")
        #expect(state.inputProcessed() == [.close])
        #expect(!state.isOpen)
    }

    @Test func anEndedInputWaitsForSocketRoomBeforeItsLastPass() {
        var state = active()
        _ = state.inputEnded()
        _ = state.writabilityChanged(false)
        #expect(state.inputProcessed() == [], "unparsed requests may wait for room")
        #expect(state.writabilityChanged(true) == [.parse])
        #expect(state.inputProcessed() == [.close])
    }

    @Test func anEndedInputDuringTheHandshakeCloses() {
        var state = NBDConnectionState(maxInFlight: 2, maxInFlightBytes: 100)
        #expect(state.inputEnded() == [.close])
        #expect(!state.isOpen)
    }

    @Test func disconnectAfterTheInputEndedStillDrains() {
        var state = active()
        state.requestStarted(bytes: 1)
        _ = state.inputEnded()
        state.disconnectRequested()
        #expect(state.phase == .draining(.clientDisconnect))
        #expect(state.requestFinished(bytes: 1) == [.close])
    }
}
