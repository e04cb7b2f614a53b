/// One connection's life after the greeting, as a value that returns actions: when to
/// read from the socket, when to parse the next request, when to close. The handler
/// keeps no flags of its own; it reports events here and carries out what comes back.
///
/// ```
///                enterTransmission        DISC / shutdown      idle, input processed
///   handshake ───────────────────► active ───────────────► draining ─────────────────► closed
///       │                             │                                                  ▲
///       └─────────────────────────────┴── channel closed, handshake ends it, shutdown ───┘
/// ```
///
/// Back-pressure lives here: requests run at most `maxInFlight` at once and hold at most
/// about `maxInFlightBytes` of payload (read buffers and write data), and nothing more is
/// read or parsed while the socket's outbound buffer is above its high-water mark
/// (a client that stops reading replies stops being read), so a connection's memory is
/// bounded whatever its client does.
struct NBDConnectionState {
    enum DrainReason: Equatable {
        /// NBD_CMD_DISC: nothing more is parsed; close when the running requests are done.
        case clientDisconnect
        /// The server shuts down: requests that arrive get ESHUTDOWN; close when idle.
        case serverShutdown
        /// The client shut down its sending side (libnbd does right after NBD_CMD_DISC):
        /// what arrived is still parsed and run, and the connection closes once it is
        /// all answered.
        case inputEnded
    }

    enum Phase: Equatable {
        case handshake
        case active
        case draining(DrainReason)
        case closed
    }

    /// What the handler is to do, carried out in this order: parse, read, close. A set,
    /// not an array: requests finish at tens of thousands a second, and each one
    /// returns this.
    struct Actions: OptionSet, Equatable {
        let rawValue: UInt8
        /// Parse what has arrived (room opened up).
        static let parse = Actions(rawValue: 1 << 0)
        /// Ask the channel for more bytes.
        static let read = Actions(rawValue: 1 << 1)
        /// Flush, then close the connection.
        static let close = Actions(rawValue: 1 << 2)
    }

    /// What to do with a request that was parsed.
    enum Admission: Equatable {
        /// Validate and run it.
        case run
        /// Answer ESHUTDOWN (the server is shutting down).
        case refuseShuttingDown
        /// Drop it: the connection is closing.
        case drop
    }

    let maxInFlight: Int
    let maxInFlightBytes: Int
    private(set) var phase: Phase = .handshake
    private(set) var inFlight = 0
    private(set) var inFlightBytes = 0
    /// The channel asked to read while reading was not allowed; read once it is.
    private(set) var readHeld = false
    private(set) var writable = true

    init(maxInFlight: Int, maxInFlightBytes: Int) {
        precondition(maxInFlight > 0 && maxInFlightBytes > 0)
        self.maxInFlight = maxInFlight
        self.maxInFlightBytes = maxInFlightBytes
    }

    /// Whether replies may still be written.
    var isOpen: Bool { phase != .closed }

    var isInTransmission: Bool {
        switch phase {
        case .active, .draining: true
        case .handshake, .closed: false
        }
    }

    private var hasRoom: Bool { inFlight < maxInFlight && inFlightBytes < maxInFlightBytes && writable }

    /// Whether the next message may be taken from the input now.
    var mayParse: Bool {
        switch phase {
        case .handshake: writable
        case .active, .draining(.inputEnded): hasRoom
        // What arrived is answered with small ESHUTDOWN replies; the input is bounded
        // (reading stopped with the socket's room), so this needs no room of its own.
        case .draining(.serverShutdown): true
        case .draining(.clientDisconnect), .closed: false
        }
    }

    private var mayRead: Bool {
        switch phase {
        case .handshake, .draining(.serverShutdown): writable
        case .active: hasRoom
        case .draining(.clientDisconnect), .draining(.inputEnded), .closed: false
        }
    }

    /// The channel wants to read: do it now, or hold it until there is room.
    mutating func readRequested() -> Actions {
        guard mayRead else {
            readHeld = true
            return []
        }
        return .read
    }

    /// The handshake ended; requests may come.
    mutating func enterTransmission() {
        guard phase == .handshake else { return }
        phase = .active
    }

    /// A parsed request: run it, refuse it, or drop it.
    func admit() -> Admission {
        switch phase {
        case .active, .draining(.inputEnded): .run
        case .draining(.serverShutdown): .refuseShuttingDown
        case .handshake, .draining(.clientDisconnect), .closed: .drop
        }
    }

    /// A request started running, holding `bytes` of payload (read buffer or write data).
    mutating func requestStarted(bytes: Int) {
        precondition(phase == .active || phase == .draining(.inputEnded), "requests start only while active")
        inFlight += 1
        inFlightBytes += bytes
    }

    /// A request's reply was written (or dropped).
    mutating func requestFinished(bytes: Int) -> Actions {
        precondition(inFlight > 0 && inFlightBytes >= bytes, "a request finished that never started")
        inFlight -= 1
        inFlightBytes -= bytes
        return roomChanged()
    }

    /// NBD_CMD_DISC: stop taking requests; close once the running ones are answered
    /// (see `inputProcessed`).
    mutating func disconnectRequested() {
        guard phase == .active || phase == .draining(.inputEnded) else { return }
        phase = .draining(.clientDisconnect)
    }

    /// The handler parsed what it could: a draining connection with nothing running
    /// closes now (a shutting-down one has answered what had arrived with ESHUTDOWN).
    mutating func inputProcessed() -> Actions {
        // With the input ended, a pass that stopped for want of socket room may have left
        // requests unparsed: they are parsed once it is writable again.
        if phase == .draining(.inputEnded) && !writable { return [] }
        if case .draining = phase, inFlight == 0 { return close() }
        return []
    }

    /// Whether the client's sending side is shut: a parsing pass is then worth running
    /// with no input left, since its end (`inputProcessed`) is where the connection
    /// notices it is done.
    var inputHasEnded: Bool { phase == .draining(.inputEnded) }

    /// The client shut down its sending side (end of file on the socket): nothing more
    /// arrives. During the handshake that ends the connection; in transmission, what
    /// arrived is parsed and answered first (`.parse`), then it closes.
    mutating func inputEnded() -> Actions {
        switch phase {
        case .handshake:
            return close()
        case .active:
            phase = .draining(.inputEnded)
            readHeld = false
            return [.parse]
        case .draining(.serverShutdown):
            // Closes when idle already; a pass notices if it is idle now.
            return [.parse]
        case .draining(.clientDisconnect), .draining(.inputEnded), .closed:
            return []
        }
    }

    /// The server shuts down: running requests finish, requests that arrived get
    /// ESHUTDOWN, then the connection closes. A connection still in its handshake answers
    /// the options that arrived (NBD_REP_ERR_SHUTDOWN, from the handshake) and closes.
    mutating func shutdownRequested() -> Actions {
        switch phase {
        case .handshake:
            return [.parse, .close]
        case .active:
            phase = .draining(.serverShutdown)
            return [.parse]
        case .draining, .closed:
            return []
        }
    }

    /// The socket's outbound buffer crossed a water mark.
    mutating func writabilityChanged(_ isWritable: Bool) -> Actions {
        writable = isWritable
        return isWritable ? roomChanged() : []
    }

    /// Closing for any other reason (handshake ended it, errors, timeouts, the peer).
    mutating func closed() {
        phase = .closed
        readHeld = false
    }

    private mutating func close() -> Actions {
        phase = .closed
        readHeld = false
        return [.close]
    }

    private mutating func roomChanged() -> Actions {
        if phase == .draining(.clientDisconnect) && inFlight == 0 { return close() }
        var actions: Actions = []
        if mayParse { actions.insert(.parse) }
        if readHeld && mayRead {
            readHeld = false
            actions.insert(.read)
        }
        return actions
    }
}
