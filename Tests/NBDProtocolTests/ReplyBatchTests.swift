import NIOCore
import Testing

@testable import NBDServer

/// `ReplyBatch`: each appended byte is handed over once, and handing over never lets a
/// later append change bytes the channel already has.
@Suite struct ReplyBatchTests {
    @Test func appendedBytesAreTakenOnceInOrder() {
        var batch = ReplyBatch()
        #expect(batch.isEmpty && batch.take() == nil)
        batch.bytes.writeBytes([1, 2])
        batch.bytes.writeBytes([3])
        let first = batch.take()
        #expect(first.map { Array($0.readableBytesView) } == [1, 2, 3])
        #expect(batch.take() == nil, "taken bytes are never handed over again")
        batch.bytes.writeBytes([4])
        #expect(batch.take().map { Array($0.readableBytesView) } == [4])
    }

    @Test func anAppendWhileTheChannelHoldsTheBytesLeavesThemAlone() {
        var batch = ReplyBatch()
        batch.bytes.writeBytes([1, 2, 3, 4])
        let handedOver = batch.take()!
        // The channel has not written them yet (it still holds `handedOver`).
        batch.bytes.writeBytes([9, 9])
        batch.rewind()
        batch.bytes.writeBytes([7])
        #expect(Array(handedOver.readableBytesView) == [1, 2, 3, 4])
        #expect(batch.take().map { Array($0.readableBytesView) } == [9, 9, 7], "a rewind with bytes waiting keeps them")
    }

    @Test func rewindReusesTheStorageOnceTheChannelLetGo() {
        var batch = ReplyBatch()
        batch.bytes.writeBytes([UInt8](repeating: 5, count: 100))
        var handedOver: ByteBuffer? = batch.take()
        #expect(handedOver?.readableBytes == 100)
        handedOver = nil  // written and released by the channel
        let capacity = batch.bytes.capacity
        batch.rewind()
        #expect(batch.bytes.writerIndex == 0 && batch.bytes.capacity == capacity)
        batch.bytes.writeBytes([8])
        #expect(batch.take().map { Array($0.readableBytesView) } == [8])
    }

    @Test func storageThatGrewLargeIsLetGoAtTheRewind() {
        var batch = ReplyBatch()
        batch.bytes.writeBytes([UInt8](repeating: 1, count: ReplyBatch.retainedCapacity + 1))
        _ = batch.take()
        batch.rewind()
        #expect(batch.bytes.capacity < ReplyBatch.retainedCapacity)
    }
}
