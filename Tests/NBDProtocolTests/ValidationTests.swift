import NBDProtocol
import NBDServer
import NIOCore
import Testing

let writable = NBDSession(
    export: NBDExportDescription(name: "disk", size: 1 << 20, isReadOnly: false, description: ""),
    flags: [], structuredReplies: true,
    metaContexts: [NBDSelectedMetaContext(id: 1, name: NBDHandshake.allocationContext, kind: .allocation)])
let readOnly = NBDSession(
    export: NBDExportDescription(name: "disk@s", size: 1 << 20, isReadOnly: true, description: ""),
    flags: [], structuredReplies: false, metaContexts: [])

func verdict(_ command: NBDCommand, _ offset: UInt64, _ length: UInt32, flags: NBDCommandFlags = [], session: NBDSession = writable) -> NBDRequestValidator.Verdict {
    NBDRequestValidator.validate(NBDRequestHeader(flags: flags, command: command, cookie: 1, offset: offset, length: length), session: session)
}

func code(_ v: NBDRequestValidator.Verdict) -> NBDError? {
    if case .reject(let e, _) = v { return e }
    return nil
}

@Suite struct ValidationTests {
    @Test func rangesAndOverflow() {
        #expect(verdict(.read, 0, 4096) == .execute(.read(offset: 0, length: 4096, dontFragment: false)))
        #expect(code(verdict(.read, (1 << 20) - 1, 2)) == .invalid)
        #expect(code(verdict(.write, (1 << 20) - 1, 2)) == .noSpace)
        #expect(code(verdict(.writeZeroes, 1 << 20, 1)) == .noSpace)
        #expect(code(verdict(.trim, UInt64.max, 10)) == .invalid)
        #expect(code(verdict(.read, UInt64.max - 5, 10)) == .invalid)
        #expect(code(verdict(.blockStatus, 1 << 20, 1)) == .invalid)
        #expect(code(verdict(.cache, 1 << 20, 1)) == .invalid)
        #expect(code(verdict(.read, 0, UInt32(33 << 20))) == .invalid)
        #expect(verdict(.read, 1 << 20, 0) == .execute(.read(offset: 1 << 20, length: 0, dontFragment: false)))
    }

    @Test func flagsPerCommand() {
        #expect(verdict(.read, 0, 1, flags: .dontFragment) == .execute(.read(offset: 0, length: 1, dontFragment: true)))
        #expect(code(verdict(.read, 0, 1, flags: .dontFragment, session: readOnly)) == .invalid, "DF needs structured replies")
        #expect(code(verdict(.read, 0, 1, flags: .noHole)) == .invalid)
        #expect(code(verdict(.write, 0, 1, flags: .requestOne)) == .invalid)
        #expect(code(verdict(.read, 0, 1, flags: NBDCommandFlags(rawValue: 1 << 9))) == .invalid)
        #expect(verdict(.flush, 0, 0, flags: .fua) == .execute(.blocking(.flush)))
        #expect(code(verdict(.flush, 1, 0)) == .invalid)
        #expect(verdict(.writeZeroes, 0, 512, flags: [.fastZero]) == .execute(.blocking(.writeZeroes(offset: 0, length: 512, mayTrim: true, fua: false))))
        #expect(code(verdict(.writeZeroes, 0, 512, flags: [.fastZero, .noHole])) == .notSupported)
        #expect(verdict(.blockStatus, 0, 512, flags: .requestOne) == .execute(.blocking(.blockStatus(offset: 0, length: 512, onlyOne: true))))
        #expect(code(verdict(.blockStatus, 0, 0)) == .invalid)
        #expect(code(verdict(NBDCommand(rawValue: 42), 0, 0)) == .invalid)
    }

    @Test func readOnlyAndNegotiation() {
        #expect(code(verdict(.write, 0, 1, session: readOnly)) == .permission)
        #expect(code(verdict(.trim, 0, 1, session: readOnly)) == .permission)
        #expect(code(verdict(.writeZeroes, 0, 1, session: readOnly)) == .permission)
        #expect(verdict(.read, 0, 1, session: readOnly) == .execute(.read(offset: 0, length: 1, dontFragment: false)))
        #expect(code(verdict(.blockStatus, 0, 1, session: readOnly)) == .invalid, "no metadata context negotiated")
    }
}
