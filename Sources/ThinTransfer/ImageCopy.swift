import NBDClient
import NBDProtocol
import NBDTLS
import ThinPool
import ThinSystem

/// Why an import or export failed, for a person.
public struct TransferError: Error, Equatable, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Where image bytes come from.
public protocol ImageSource: AnyObject {
    var size: UInt64 { get }
    var maximumReadBytes: Int { get }
    /// Fills `buffer` with the bytes at `offset` (`offset + buffer.count <= size`);
    /// returns ranges of `buffer` known to be holes (zero-filled). Other ranges may be
    /// zero too: the copy checks.
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(TransferError) -> [Range<Int>]
}

/// Where image bytes go. It starts out reading as zeros, so zero runs are not written.
public protocol ImageTarget: AnyObject {
    var maximumWriteBytes: Int { get }
    func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws(TransferError)
    /// Makes everything written durable and gives the target its final size.
    func finish(size: UInt64) throws(TransferError)
}

/// What a copy did.
public struct CopyStatistics: Equatable, Sendable {
    public var bytes: UInt64 = 0
    /// Bytes written; the rest were zeros, left unwritten (unmapped, or holes).
    public var bytesWritten: UInt64 = 0
}

/// Copies an image, skipping zeros: the source is read in large pieces, each piece is
/// checked `granularity` bytes at a time, and only runs that are not all zero are
/// written (so they stay unmapped in a pool, or holes in a file). Cost: one pass over
/// the source's data; holes a source reports are not read.
public enum ImageCopy {
    public static func copy(
        from source: ImageSource, to target: ImageTarget, length: UInt64, granularity: Int,
        progress: (UInt64) -> Void = { _ in }
    ) throws(TransferError) -> CopyStatistics {
        precondition(granularity > 0 && length <= source.size)
        var chunk = max(min(source.maximumReadBytes, target.maximumWriteBytes, 4 << 20), 1)
        // Peers with small request limits get a finer zero check rather than no copy.
        let granularity = min(granularity, chunk)
        chunk -= chunk % granularity
        let buffer = AlignedBuffer(count: chunk)
        var statistics = CopyStatistics()
        var offset: UInt64 = 0
        while offset < length {
            let count = Int(min(UInt64(chunk), length - offset))
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer.bytes[0..<count])
            let holes = try source.read(at: offset, into: piece)
            var runStart: Int?
            var position = 0
            func flushRun(upTo end: Int) throws(TransferError) {
                guard let start = runStart else { return }
                try target.write(at: offset + UInt64(start), from: UnsafeRawBufferPointer(rebasing: piece[start..<end]))
                statistics.bytesWritten += UInt64(end - start)
                runStart = nil
            }
            while position < count {
                let end = min(position + granularity, count)
                let isZero = holes.contains { $0.lowerBound <= position && end <= $0.upperBound }
                    || isAllZero(UnsafeRawBufferPointer(rebasing: piece[position..<end]))
                if isZero {
                    try flushRun(upTo: position)
                } else if runStart == nil {
                    runStart = position
                }
                position = end
            }
            try flushRun(upTo: count)
            offset += UInt64(count)
            statistics.bytes = offset
            progress(offset)
        }
        try target.finish(size: length)
        return statistics
    }

    static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var index = 0
        let words = bytes.count / 8
        // Word at a time (the buffers are aligned), then the tail.
        if let base = bytes.baseAddress, Int(bitPattern: base) % 8 == 0 {
            let pointer = base.assumingMemoryBound(to: UInt64.self)
            while index < words {
                if pointer[index] != 0 { return false }
                index += 1
            }
            index *= 8
        }
        while index < bytes.count {
            if bytes[index] != 0 { return false }
            index += 1
        }
        return true
    }
}

// MARK: Sources and targets

/// Runs an NBD client call, reporting its failure as a transfer error.
func overNBD<T>(_ body: () throws(NBDClientError) -> T) throws(TransferError) -> T {
    do throws(NBDClientError) {
        return try body()
    } catch {
        throw TransferError(error.description)
    }
}

/// A raw file or block device; holes the file system reports are not read.
public final class RawFileSource: ImageSource {
    let file: RawFile
    public let size: UInt64
    public var maximumReadBytes: Int { 4 << 20 }

    public init(path: String) throws(TransferError) {
        do throws(SystemError) {
            file = try RawFile(readingAt: path)
            size = try file.size()
        } catch {
            throw TransferError("\(path): \(error.message)")
        }
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(TransferError) -> [Range<Int>] {
        let end = offset + UInt64(buffer.count)
        var holes: [Range<Int>] = []
        var position = offset
        do throws(SystemError) {
            while position < end {
                let dataStart = min(file.nextData(from: position) ?? end, end)
                if dataStart > position {
                    let range = Int(position - offset)..<Int(dataStart - offset)
                    UnsafeMutableRawBufferPointer(rebasing: buffer[range]).initializeMemory(as: UInt8.self, repeating: 0)
                    holes.append(range)
                    position = dataStart
                    continue
                }
                let dataEnd = min(max(file.nextHole(from: position), position + 1), end)
                let range = Int(position - offset)..<Int(dataEnd - offset)
                let got = try file.read(at: position, into: UnsafeMutableRawBufferPointer(rebasing: buffer[range]))
                guard got == range.count else { throw SystemError(.io, "\(file.path) ended early (it shrank while being read)") }
                position = dataEnd
            }
        } catch {
            throw TransferError("reading \(file.path): \(error)")
        }
        return holes
    }
}

/// An NBD export (`nbd[s]://`, `nbd[s]+unix://`); holes come from structured replies.
public final class NBDSource: ImageSource {
    let connection: NBDClientConnection
    public var size: UInt64 { connection.export.size }
    public var maximumReadBytes: Int { connection.maximumRequestBytes }

    /// `tls`: credentials for a server that needs TLS (see `NBDClientConnection.init`).
    public init(uri: String, tls: NBDTLSClientCredentials? = nil) throws(TransferError) {
        connection = try overNBD { () throws(NBDClientError) in try NBDClientConnection(uri: uri, tls: tls) }
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(TransferError) -> [Range<Int>] {
        try overNBD { () throws(NBDClientError) in try connection.read(at: offset, into: buffer) }
    }
}

/// Writes to an NBD export, then flushes.
public final class NBDTarget: ImageTarget {
    let connection: NBDClientConnection
    public var maximumWriteBytes: Int { connection.maximumRequestBytes }

    public init(uri: String, tls: NBDTLSClientCredentials? = nil) throws(TransferError) {
        connection = try overNBD { () throws(NBDClientError) in try NBDClientConnection(uri: uri, tls: tls) }
        guard !connection.export.isReadOnly else { throw TransferError("\(uri) is read-only") }
    }

    public var size: UInt64 { connection.export.size }

    public func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws(TransferError) {
        try overNBD { () throws(NBDClientError) in try connection.write(at: offset, from: data) }
    }

    public func finish(size: UInt64) throws(TransferError) {
        try overNBD { () throws(NBDClientError) in try connection.flush() }
    }
}

/// A volume or snapshot of a pool this process has open.
public final class PoolVolumeSource: ImageSource {
    let pool: Pool
    let id: UInt64
    public let size: UInt64
    public var maximumReadBytes: Int { 4 << 20 }

    public init(pool: Pool, name: String) throws(TransferError) {
        self.pool = pool
        do throws(PoolError) {
            id = try pool.volumeID(name)
            size = try pool.volumeInfo(name).size
        } catch {
            throw TransferError(error.description)
        }
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(TransferError) -> [Range<Int>] {
        do throws(PoolError) {
            return try pool.read(id, at: offset, into: buffer).filter { !$0.isMapped }.map {
                Int($0.offset - offset)..<Int($0.offset - offset + $0.length)
            }
        } catch {
            throw TransferError(error.description)
        }
    }
}

/// A new volume of a pool this process has open.
public final class PoolVolumeTarget: ImageTarget {
    let pool: Pool
    let id: UInt64
    public var maximumWriteBytes: Int { 4 << 20 }

    public init(pool: Pool, name: String) throws(TransferError) {
        self.pool = pool
        do throws(PoolError) {
            id = try pool.volumeID(name)
        } catch {
            throw TransferError(error.description)
        }
    }

    public func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws(TransferError) {
        do throws(PoolError) {
            try pool.write(id, at: offset, from: data)
        } catch {
            throw TransferError(error.description)
        }
    }

    public func finish(size: UInt64) throws(TransferError) {
        do throws(PoolError) {
            try pool.flush()
        } catch {
            throw TransferError(error.description)
        }
    }
}

/// A new sparse raw file: zero runs stay holes, and it ends at the image's size.
public final class RawFileTarget: ImageTarget {
    let file: RawFile
    public var maximumWriteBytes: Int { 4 << 20 }

    public init(path: String, replacing: Bool) throws(TransferError) {
        do throws(SystemError) {
            file = try RawFile(creatingAt: path, replacing: replacing)
        } catch {
            if error.code == .exists { throw TransferError("\(path) exists; pass --force to replace it") }
            throw TransferError("\(path): \(error.message)")
        }
    }

    public func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws(TransferError) {
        do throws(SystemError) {
            try file.write(at: offset, from: data)
        } catch {
            throw TransferError("writing \(file.path): \(error)")
        }
    }

    public func finish(size: UInt64) throws(TransferError) {
        do throws(SystemError) {
            try file.setSize(size)
            try file.sync()
        } catch {
            throw TransferError("finishing \(file.path): \(error)")
        }
    }
}
