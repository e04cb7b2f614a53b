import Testing
import ThinPool
import ThinSystem

/// The reference model: every volume is a plain byte array.
struct Model: Equatable {
    struct Volume: Equatable {
        var bytes: [UInt8]
        var isSnapshot: Bool
        var owner: String?
    }

    var volumes: [String: Volume] = [:]
}

/// Drives a pool and the model with the same random operations and compares them.
struct ModelDriver {
    var pool: Pool
    let device: MemoryDevice
    var model = Model()
    var rng: SplitMix64
    let blockSize: Int
    var counter = 0
    var operations: [String: Int] = [:]
    var spaceErrors = 0

    /// A tiny metadata cache makes every traversal run into evictions.
    let cacheBlocks: Int?

    init(seed: UInt64, blockSize: UInt32, dataSize: UInt64, cacheBlocks: Int? = nil) throws {
        rng = SplitMix64(seed: seed)
        self.blockSize = Int(blockSize)
        self.cacheBlocks = cacheBlocks
        (pool, device) = try makeMemoryPool(dataSize: dataSize, blockSize: blockSize)
        if let cacheBlocks { pool.metadataCacheBlocks = cacheBlocks }
    }

    mutating func random(_ n: Int) -> Int { Int(rng.next() % UInt64(max(n, 1))) }

    mutating func pick(_ filter: (String, Model.Volume) -> Bool) -> String? {
        let names = model.volumes.filter { filter($0.key, $0.value) }.keys.sorted()
        return names.isEmpty ? nil : names[random(names.count)]
    }

    mutating func randomRange(size: Int) -> (Int, Int) {
        let aligned = random(3) == 0
        var offset = random(size)
        var length = 1 + random(min(size - offset, blockSize * 3))
        if aligned {
            offset = offset / blockSize * blockSize
            length = max(blockSize, length / blockSize * blockSize)
            length = min(length, size - offset)
        }
        return (offset, max(1, length))
    }

    mutating func step() throws {
        counter += 1
        let choice = random(100)
        switch choice {
        case 0..<6:
            try opCreate()
        case 6..<36:
            try opWrite()
        case 36..<42:
            try opZero()
        case 42..<47:
            try opTrim()
        case 47..<62:
            try opRead()
        case 62..<68:
            try opSnapshot()
        case 68..<72:
            try opClone()
        case 72..<77:
            try opDelete()
        case 77..<80:
            try opRollback()
        case 80..<84:
            try opResize()
        case 84..<87:
            try opRename()
        case 87..<95:
            try opCommit()
        default:
            try opReopen()
        }
    }

    var writable: (String, Model.Volume) -> Bool { { _, v in !v.isSnapshot } }

    mutating func opCreate() throws {
        guard model.volumes.count < 12 else { return }
        let name = "v\(counter)"
        let size = (1 + random(24)) * blockSize + (random(4) == 0 ? random(blockSize) : 0)
        try pool.createVolume(name, size: UInt64(size))
        model.volumes[name] = .init(bytes: [UInt8](repeating: 0, count: size), isSnapshot: false)
        operations["create", default: 0] += 1
    }

    mutating func opWrite() throws {
        guard let name = pick(writable) else { return }
        let size = model.volumes[name]!.bytes.count
        let (offset, length) = randomRange(size: size)
        let data = pattern(length, seed: rng.next())
        if try fitsInPool({ try pool.write(name, at: UInt64(offset), data) }) {
        model.volumes[name]!.bytes.replaceSubrange(offset..<offset + length, with: data)
        } else {
            spaceErrors += 1
        }
        operations["write", default: 0] += 1
    }

    mutating func opZero() throws {
        guard let name = pick(writable) else { return }
        let size = model.volumes[name]!.bytes.count
        let (offset, length) = randomRange(size: size)
        let unmap = random(4) != 0
        if try fitsInPool({ try pool.writeZeroes(pool.volumeID(name), at: UInt64(offset), count: UInt64(length), mayUnmap: unmap) }) {
        model.volumes[name]!.bytes.replaceSubrange(offset..<offset + length, with: [UInt8](repeating: 0, count: length))
        } else {
            spaceErrors += 1
        }
        operations["zero", default: 0] += 1
    }

    mutating func opTrim() throws {
        guard let name = pick(writable) else { return }
        let size = model.volumes[name]!.bytes.count
        let (offset, length) = randomRange(size: size)
        try pool.trim(pool.volumeID(name), at: UInt64(offset), count: UInt64(length))
        let firstWhole = (offset + blockSize - 1) / blockSize * blockSize
        let endWhole = (offset + length) / blockSize * blockSize
        if firstWhole < endWhole {
            model.volumes[name]!.bytes.replaceSubrange(firstWhole..<endWhole, with: [UInt8](repeating: 0, count: endWhole - firstWhole))
        }
        operations["trim", default: 0] += 1
    }

    mutating func opRead() throws {
        guard let name = pick({ _, _ in true }) else { return }
        let size = model.volumes[name]!.bytes.count
        let offset = random(size)
        let length = 1 + random(size - offset)
        let bytes = try pool.read(name, at: UInt64(offset), count: length)
        guard bytes == Array(model.volumes[name]!.bytes[offset..<offset + length]) else {
            throw ModelMismatch("read of \(name) at \(offset)+\(length) differs from the model")
        }
        operations["read", default: 0] += 1
    }

    mutating func opSnapshot() throws {
        guard let name = pick(writable), model.volumes.count < 16 else { return }
        let snap = "\(name)@s\(counter)"
        try pool.snapshot(snap)
        model.volumes[snap] = .init(bytes: model.volumes[name]!.bytes, isSnapshot: true, owner: name)
        operations["snapshot", default: 0] += 1
    }

    mutating func opClone() throws {
        guard let source = pick({ _, _ in true }), model.volumes.count < 16 else { return }
        let name = "c\(counter)"
        try pool.clone(source, as: name)
        model.volumes[name] = .init(bytes: model.volumes[source]!.bytes, isSnapshot: false)
        operations["clone", default: 0] += 1
    }

    mutating func opDelete() throws {
        guard let name = pick({ _, _ in true }) else { return }
        try pool.delete(name)
        model.volumes[name] = nil
        for (other, volume) in model.volumes where volume.owner == name {
            model.volumes[other]!.owner = nil
        }
        operations["delete", default: 0] += 1
    }

    mutating func opRollback() throws {
        guard let snap = pick({ _, v in v.isSnapshot && v.owner != nil }) else { return }
        let owner = model.volumes[snap]!.owner!
        try pool.rollback(snap)
        model.volumes[owner]!.bytes = model.volumes[snap]!.bytes
        operations["rollback", default: 0] += 1
    }

    mutating func opResize() throws {
        guard let name = pick(writable) else { return }
        let old = model.volumes[name]!.bytes.count
        let size = (1 + random(24)) * blockSize + (random(3) == 0 ? random(blockSize) : 0)
        if try fitsInPool({ try pool.resize(name, to: UInt64(size)) }) {
        if size < old {
            model.volumes[name]!.bytes.removeLast(old - size)
        } else {
            model.volumes[name]!.bytes.append(contentsOf: [UInt8](repeating: 0, count: size - old))
        }
        } else {
            spaceErrors += 1
        }
        operations["resize", default: 0] += 1
    }

    mutating func opRename() throws {
        guard let name = pick(writable) else { return }
        let newName = "r\(counter)"
        try pool.rename(name, to: newName)
        let volume = model.volumes.removeValue(forKey: name)!
        model.volumes[newName] = volume
        for (other, v) in model.volumes where v.owner == name {
            let suffix = other.split(separator: "@", maxSplits: 1)[1]
            var moved = model.volumes.removeValue(forKey: other)!
            moved.owner = newName
            model.volumes["\(newName)@\(suffix)"] = moved
        }
        operations["rename", default: 0] += 1
    }

    mutating func opCommit() throws {
        try pool.commit()
        operations["commit", default: 0] += 1
    }

    mutating func opReopen() throws {
        try pool.close()
        pool = try Pool.open(device: device)
        if let cacheBlocks { pool.metadataCacheBlocks = cacheBlocks }
        operations["reopen", default: 0] += 1
    }

    /// Every volume's full contents and the set of names agree with the model.
    func verifyAll() throws {
        let names = Set(pool.listVolumes().map(\.name))
        guard names == Set(model.volumes.keys) else {
            throw ModelMismatch("volumes \(names.sorted()) but model has \(model.volumes.keys.sorted())")
        }
        for (name, volume) in model.volumes {
            let info = try pool.volumeInfo(name)
            guard info.size == UInt64(volume.bytes.count) else { throw ModelMismatch("\(name) size \(info.size)") }
            guard try pool.read(name, at: 0, count: volume.bytes.count) == volume.bytes else {
                throw ModelMismatch("\(name) contents differ from the model")
            }
        }
    }
}

/// Runs `body`; false when it failed because the pool is full (anything else rethrows).
func fitsInPool(_ body: () throws -> Void) throws -> Bool {
    do {
        try body()
        return true
    } catch let error as PoolError {
        if case .noDataSpace = error { return false }
        throw error
    }
}

struct ModelMismatch: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

@Suite struct ModelTests {
    /// Thousands of random operations against the model, with `check` after each one.
    @Test(arguments: [(UInt64(1), UInt32(4096), Int?.none), (2, 4096, 4), (3, 16384, nil), (4, 8192, 6)])
    func randomOperationsMatchModel(seed: UInt64, blockSize: UInt32, cacheBlocks: Int?) throws {
        var driver = try ModelDriver(seed: seed, blockSize: blockSize, dataSize: UInt64(blockSize) * 48, cacheBlocks: cacheBlocks)
        for step in 0..<1500 {
            try driver.step()
            if let problems = driver.pool.checkProblems() {
                Issue.record("seed \(seed) step \(step): check failed:\n\(problems)")
                return
            }
            if step % 100 == 99 { try driver.verifyAll() }
            if step % 25 == 24 {
                let committed = driver.pool.checkCommittedState()
                if !committed.isClean {
                    Issue.record("seed \(seed) step \(step): the committed state's check failed:\n\((committed.damage + committed.fixable).prefix(10).joined(separator: "\n"))")
                    return
                }
            }
        }
        try driver.verifyAll()
        // The run must have exercised the interesting paths, including a full pool.
        for op in ["write", "snapshot", "clone", "delete", "rollback", "resize", "reopen", "trim", "zero"] {
            #expect(driver.operations[op, default: 0] > 5, "operation \(op) ran only \(driver.operations[op, default: 0]) times")
        }
        #expect(driver.spaceErrors > 0, "the pool never filled up")
    }
}
