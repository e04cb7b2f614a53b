import NBDProtocol
import NBDServer
import NIOCore
import Testing

@Suite struct ReplyEncoderTests {
    @Test func sparseReadBecomesDataAndHoleChunks() throws {
        var data = ByteBuffer(repeating: 0, count: 12288)
        data.setRepeatingByte(0x41, count: 4096, at: 0)
        data.setRepeatingByte(0x42, count: 4096, at: 8192)
        let extents = [
            NBDExtent(offset: 0, length: 4096, isHole: false), NBDExtent(offset: 4096, length: 4096, isHole: true),
            NBDExtent(offset: 8192, length: 4096, isHole: false),
        ]
        var out = ByteBuffer()
        NBDReplyEncoder.read(cookie: 7, offset: 0, data: data, extents: extents, structured: true, dontFragment: false, into: &out)
        var chunks: [NBDStructuredChunk] = []
        while let c = try out.readNBDStructuredChunk() { chunks.append(c) }
        #expect(chunks.map(\.flags) == [[], [], .done])
        #expect(chunks[1].payload == .offsetHole(offset: 4096, length: 4096))
        #expect(chunks[2].payload == .offsetData(offset: 8192, data: ByteBuffer(repeating: 0x42, count: 4096)))

        #expect(out.readableBytes == 0)

        // Unfragmented replies leave the data to be sent after the header, uncopied.
        var df = ByteBuffer()
        let follows = NBDReplyEncoder.read(cookie: 7, offset: 0, data: data, extents: extents, structured: true, dontFragment: true, into: &df)
        #expect(follows == data)
        df.writeImmutableBuffer(follows!)
        let single = try df.readNBDStructuredChunk()
        #expect(single?.flags == .done)
        #expect(single?.payload == .offsetData(offset: 0, data: data))
        #expect(df.readableBytes == 0)

        var simple = ByteBuffer()
        let simpleData = NBDReplyEncoder.read(cookie: 9, offset: 0, data: data, extents: extents, structured: false, dontFragment: false, into: &simple)
        #expect(simpleData == data)
        #expect(try simple.readNBDSimpleReplyHeader() == NBDSimpleReplyHeader(error: .none, cookie: 9))
        #expect(simple.readableBytes == 0)
    }

    @Test func blockStatusMergesClipsAndHonoursRequestOne() throws {
        let extents = [
            NBDExtent(offset: 0, length: 8192, isHole: true), NBDExtent(offset: 8192, length: 4096, isHole: true),
            NBDExtent(offset: 12288, length: 4096, isHole: false), NBDExtent(offset: 16384, length: 1 << 20, isHole: true),
        ].map(NBDReplyEncoder.allocationStatus)
        var out = ByteBuffer()
        NBDReplyEncoder.blockStatus(cookie: 1, contextID: 1, offset: 0, length: 20000, extents: extents, onlyOne: false, into: &out)
        let chunk = try out.readNBDStructuredChunk()
        #expect(chunk?.payload == .blockStatus(contextID: 1, descriptors: [
            BlockStatusDescriptor(length: 12288, flags: 3), BlockStatusDescriptor(length: 4096, flags: 0), BlockStatusDescriptor(length: 20000 - 16384, flags: 3),
        ]))
        var one = ByteBuffer()
        NBDReplyEncoder.blockStatus(cookie: 1, contextID: 1, offset: 0, length: 100, extents: extents, onlyOne: true, into: &one)
        #expect(try one.readNBDStructuredChunk()?.payload == .blockStatus(contextID: 1, descriptors: [BlockStatusDescriptor(length: 100, flags: 3)]))
    }

    @Test func blockStatusChunksOfSeveralContextsEndWithOneDone() throws {
        let changed = [NBDStatusExtent(offset: 0, length: 4096, flags: 1), NBDStatusExtent(offset: 4096, length: 8192, flags: 0)]
        var out = ByteBuffer()
        NBDReplyEncoder.blockStatus(cookie: 9, contextID: 1, offset: 0, length: 12288, extents: changed, onlyOne: false, isLast: false, into: &out)
        NBDReplyEncoder.blockStatus(cookie: 9, contextID: 2, offset: 0, length: 12288, extents: changed, onlyOne: false, into: &out)
        let first = try #require(try out.readNBDStructuredChunk())
        let second = try #require(try out.readNBDStructuredChunk())
        #expect(!first.flags.contains(.done) && second.flags.contains(.done))
        #expect(first.payload == .blockStatus(contextID: 1, descriptors: [BlockStatusDescriptor(length: 4096, flags: 1), BlockStatusDescriptor(length: 8192, flags: 0)]))
        guard case .blockStatus(contextID: 2, _) = second.payload else { Issue.record("second chunk is not context 2's"); return }
    }

    @Test func errorsUseStructuredChunksWhenNegotiated() throws {
        var structured = ByteBuffer()
        NBDReplyEncoder.error(.noSpace, message: "full", cookie: 3, structured: true, into: &structured)
        #expect(try structured.readNBDStructuredChunk() == NBDStructuredChunk(flags: .done, cookie: 3, payload: .error(.noSpace, message: "full")))
        var simple = ByteBuffer()
        NBDReplyEncoder.error(.noSpace, message: "full", cookie: 3, structured: false, into: &simple)
        #expect(try simple.readNBDSimpleReplyHeader() == NBDSimpleReplyHeader(error: .noSpace, cookie: 3))
    }
}
