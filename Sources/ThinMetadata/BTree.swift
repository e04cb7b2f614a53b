import ThinFormat

/// What the values in a tree's leaves refer to, so that sharing and releasing a leaf
/// adjusts the right reference counts.
public enum LeafValueKind {
    /// Data block numbers, counted in the data space map (volume mappings).
    case dataBlocks(DataSpaceMap)
    /// Metadata block numbers of the given type (volume records).
    case metadataBlocks(BlockType)
    /// Refcount block numbers packed with free counts (the space map index).
    case packedRefcountBlocks
}

/// A copy-on-write B-tree of u64 keys to u64 values, stored in metadata blocks.
///
/// Every mutation shadows the root-to-leaf path (copying only blocks the last commit or
/// another tree still uses) and returns the new root; the caller stores it. A tree
/// shared with a snapshot is shared node by node: shadowing a shared node adds one
/// reference to each of its children. Lookups cost O(log n) cached block reads.
/// Underfull nodes are not merged; empty nodes are removed and a root with one child
/// collapses.
public struct BTree {
    public let store: MetadataStore
    public let type: BlockType
    public let values: LeafValueKind

    public init(store: MetadataStore, type: BlockType, values: LeafValueKind) {
        self.store = store
        self.type = type
        self.values = values
    }

    // MARK: Checked descent

    // Nothing read from disk is trusted: a block's CRC only proves that some writer wrote
    // it. Every step down a tree checks what the parent promises of the child (one level
    // lower, not empty, keys inside the parent's range for it), and every leaf value is
    // checked before anyone uses it (a data block inside the pool, a metadata block
    // inside the region). Levels only go down, so no walk can loop; keys stay in range,
    // so arithmetic on them cannot overflow for a caller that asked for a bounded range.

    /// Reads the root and checks it can be one (not empty unless it is a lone leaf).
    private func readRoot(_ root: UInt64, cachedOnly: Bool = false) throws(MetadataError) -> NodeView {
        let node = try store.read(root, type, cachedOnly: cachedOnly).node
        guard node.count > 0 || node.isLeaf else { throw .corruptBlock(root, type, "an interior node with no entries") }
        return node
    }

    /// Reads child `i` of the interior node `parent` and checks it against the parent:
    /// one level down, not empty, keys in `parent.key(i) ..< next key` (or `upper`, the
    /// parent's own bound). Returns the child and its upper bound.
    private func readChild(
        of parent: NodeView, at i: Int, upper: UInt64?, cachedOnly: Bool = false
    ) throws(MetadataError) -> (node: NodeView, number: UInt64, upper: UInt64?) {
        let number = parent.value(i)
        let node = try store.read(number, type, cachedOnly: cachedOnly).node
        let bound = i + 1 < parent.count ? parent.key(i + 1) : upper
        try checkChild(node, number, level: parent.level, lower: parent.key(i), upper: bound)
        return (node, number, bound)
    }

    private func checkChild(_ node: NodeView, _ number: UInt64, level parentLevel: UInt16, lower: UInt64, upper: UInt64?) throws(MetadataError) {
        guard node.level + 1 == parentLevel else {
            throw .corruptBlock(number, type, "level \(node.level) under a level \(parentLevel) node")
        }
        guard node.count > 0 else { throw .corruptBlock(number, type, "an empty node below the root") }
        let first = node.key(0)
        let last = node.key(node.count - 1)
        guard first >= lower, upper.map({ last < $0 }) ?? true else {
            let limit = upper.map { String($0) } ?? "end"
            throw .corruptBlock(number, type, "keys \(first)...\(last) lie outside its parent's range \(lower)..<\(limit)")
        }
    }

    /// The one check a writer needs on its way down (it rewrites keys as it goes).
    private func checkLevel(_ node: NodeView, _ number: UInt64, under parentLevel: UInt16) throws(MetadataError) {
        guard node.level + 1 == parentLevel, node.count > 0 else {
            throw .corruptBlock(number, type, "level \(node.level) with \(node.count) entries under a level \(parentLevel) node")
        }
    }

    /// Leaf value `i` of `node` (block `number`), checked against what it refers to.
    private func leafValue(_ node: NodeView, _ i: Int, in number: UInt64) throws(MetadataError) -> UInt64 {
        let value = node.value(i)
        switch values {
        case .dataBlocks(let spaceMap):
            guard value < spaceMap.dataBlocks else {
                throw .corruptBlock(number, type, "key \(node.key(i)) maps to data block \(value), beyond the pool's \(spaceMap.dataBlocks)")
            }
        case .metadataBlocks(let valueType):
            guard store.contains(value) else {
                throw .corruptBlock(number, type, "key \(node.key(i)) points to a \(valueType) at block \(value), outside the metadata region")
            }
        case .packedRefcountBlocks:
            let (block, free) = RefcountLayout.unpackIndexValue(value)
            guard store.contains(block), free <= RefcountLayout.entriesPerBlock else {
                throw .corruptBlock(number, type, "group \(node.key(i)) points to block \(block) with \(free) free entries")
            }
        }
        return value
    }

    // MARK: Lookup

    public func lookup(_ root: UInt64, _ key: UInt64) throws(MetadataError) -> UInt64? {
        try lookupWithSharing(root, key)?.value
    }

    /// Looks `key` up and says whether any node on its path is shared with another tree.
    /// With `cachedOnly`, a node that is not cached throws `.notCached`.
    public func lookupWithSharing(
        _ root: UInt64, _ key: UInt64, cachedOnly: Bool = false
    ) throws(MetadataError) -> (value: UInt64, pathShared: Bool)? {
        guard root != 0 else { return nil }
        var number = root
        var node = try readRoot(root, cachedOnly: cachedOnly)
        var upper: UInt64?
        var shared = store.refcount(root) > 1
        while !node.isLeaf {
            let i = node.childIndex(for: key)
            if i < 0 { return nil }
            (node, number, upper) = try readChild(of: node, at: i, upper: upper, cachedOnly: cachedOnly)
            if store.refcount(number) > 1 { shared = true }
        }
        let i = node.lowerBound(key)
        guard i < node.count, node.key(i) == key else { return nil }
        return (try leafValue(node, i, in: number), shared)
    }

    /// Calls `body` for each entry with `range.lowerBound <= key < range.upperBound`, in
    /// key order, until it returns false. Cost: O(log n + entries visited).
    @discardableResult
    public func forEach(
        _ root: UInt64, in range: Range<UInt64>, cachedOnly: Bool = false,
        _ body: (UInt64, UInt64) throws(MetadataError) -> Bool
    ) throws(MetadataError) -> Bool {
        guard root != 0, !range.isEmpty else { return true }
        return try forEach(readRoot(root, cachedOnly: cachedOnly), root, upper: nil, in: range, cachedOnly: cachedOnly, body)
    }

    private func forEach(
        _ node: NodeView, _ number: UInt64, upper: UInt64?, in range: Range<UInt64>, cachedOnly: Bool,
        _ body: (UInt64, UInt64) throws(MetadataError) -> Bool
    ) throws(MetadataError) -> Bool {
        if node.isLeaf {
            var i = node.lowerBound(range.lowerBound)
            while i < node.count {
                let k = node.key(i)
                if k >= range.upperBound { return true }
                if try !body(k, leafValue(node, i, in: number)) { return false }
                i += 1
            }
            return true
        }
        var i = max(0, node.childIndex(for: range.lowerBound))
        while i < node.count {
            if node.key(i) >= range.upperBound { return true }
            let child = try readChild(of: node, at: i, upper: upper, cachedOnly: cachedOnly)
            if try !forEach(child.node, child.number, upper: child.upper, in: range, cachedOnly: cachedOnly, body) { return false }
            i += 1
        }
        return true
    }

    /// Number of entries in `range`.
    public func count(_ root: UInt64, in range: Range<UInt64> = 0..<UInt64.max) throws(MetadataError) -> UInt64 {
        var n: UInt64 = 0
        try forEach(root, in: range) { _, _ in n += 1; return true }
        return n
    }

    // MARK: Differences

    /// A subtree known by its parent's pointer, read only when it must be (and then kept).
    private struct SubtreeReference {
        var number: UInt64
        /// Level the parent promises (nil for a root: whatever it is).
        var level: UInt16?
        var lower: UInt64
        var upper: UInt64?
        var node: NodeView?
    }

    /// Calls `changed` with the keys of `range` whose entries differ between the trees
    /// `a` and `b` (present in one only, or with different values), in key order, as
    /// maximal runs. Subtrees that both trees reach through the same block are skipped
    /// without being read: two snapshots of one lineage share every subtree a change did
    /// not copy, so the cost follows the change, not the size. A tree of 0 is empty.
    public func differences(
        _ a: UInt64, _ b: UInt64, in range: Range<UInt64> = 0..<UInt64.max,
        _ changed: (Range<UInt64>) throws(MetadataError) -> Void
    ) throws(MetadataError) {
        var runs = RunCollector()
        let left = a == 0 ? nil : SubtreeReference(number: a, level: nil, lower: 0, upper: nil)
        let right = b == 0 ? nil : SubtreeReference(number: b, level: nil, lower: 0, upper: nil)
        try differences(left, right, range, &runs, changed)
        if let last = runs.pending { try changed(last) }
    }

    /// Joins changed keys into runs and hands each finished run on.
    private struct RunCollector {
        var pending: Range<UInt64>?

        mutating func add(_ key: UInt64, _ changed: (Range<UInt64>) throws(MetadataError) -> Void) throws(MetadataError) {
            if let run = pending, run.upperBound == key {
                pending = run.lowerBound..<key + 1
                return
            }
            if let run = pending { try changed(run) }
            pending = key..<key + 1
        }
    }

    /// Reads a referenced subtree (once) and checks it against what its parent promised.
    private func read(_ reference: SubtreeReference) throws(MetadataError) -> SubtreeReference {
        if reference.node != nil { return reference }
        var read = reference
        if let level = reference.level {
            let node = try store.read(reference.number, type).node
            try checkChild(node, reference.number, level: level + 1, lower: reference.lower, upper: reference.upper)
            read.node = node
        } else {
            read.node = try readRoot(reference.number)
        }
        return read
    }

    /// The children of interior `node` whose key ranges meet `range`.
    private func children(of node: NodeView, upper: UInt64?, meeting range: Range<UInt64>) -> [SubtreeReference] {
        var result: [SubtreeReference] = []
        var i = max(0, node.childIndex(for: range.lowerBound))
        while i < node.count, node.key(i) < range.upperBound {
            let bound = i + 1 < node.count ? node.key(i + 1) : upper
            result.append(SubtreeReference(number: node.value(i), level: node.level - 1, lower: node.key(i), upper: bound))
            i += 1
        }
        return result
    }

    /// Splits `range` among the children that meet it, each taking its own key range; the
    /// part below the first child (where this side has no keys, but the other may) goes
    /// with it, and with no child at all, the whole range is compared with nothing.
    private func split(_ range: Range<UInt64>, among children: [SubtreeReference]) -> [(SubtreeReference?, Range<UInt64>)] {
        guard !children.isEmpty else { return [(nil, range)] }
        return children.enumerated().map { index, child in
            let lower = index == 0 ? range.lowerBound : max(range.lowerBound, child.lower)
            return (child, lower..<min(range.upperBound, child.upper ?? .max))
        }
    }

    private func differences(
        _ a: SubtreeReference?, _ b: SubtreeReference?, _ range: Range<UInt64>, _ runs: inout RunCollector,
        _ changed: (Range<UInt64>) throws(MetadataError) -> Void
    ) throws(MetadataError) {
        guard !range.isEmpty else { return }
        if let a, let b, a.number == b.number { return }
        guard var a, var b else {
            // One side is empty here: every entry of the other differs.
            guard let present = try (a ?? b).map({ (reference) throws(MetadataError) in try read(reference) }) else { return }
            return try differences(a == nil ? nil : present, a == nil ? present : nil, range, &runs, changed, oneSided: true)
        }
        // A child's level is what its parent promises, so only the side that is expanded
        // is read: the higher interior node (the left when levels tie). Its children are
        // then compared with the other side over their own ranges, pairing subtrees up.
        if a.level == nil { a = try read(a) }
        if b.level == nil { b = try read(b) }
        let leftLevel = a.level ?? a.node!.level
        let rightLevel = b.level ?? b.node!.level
        // The other side, if interior, is read once here rather than by every child's
        // comparison (each would expand it again).
        if leftLevel > 0 && leftLevel >= rightLevel {
            a = try read(a)
            if rightLevel > 0 { b = try read(b) }
            for (child, part) in split(range, among: children(of: a.node!, upper: a.upper, meeting: range)) {
                try differences(child, b, part, &runs, changed)
            }
            return
        }
        if rightLevel > 0 {
            b = try read(b)
            if leftLevel > 0 { a = try read(a) }
            for (child, part) in split(range, among: children(of: b.node!, upper: b.upper, meeting: range)) {
                try differences(a, child, part, &runs, changed)
            }
            return
        }
        try differences(try read(a), try read(b), range, &runs, changed, oneSided: false)
    }

    /// Compares what two subtrees hold in `range` entry by entry, one of them possibly
    /// absent (`oneSided`): interior nodes of a lone side are walked down to their leaves.
    private func differences(
        _ a: SubtreeReference?, _ b: SubtreeReference?, _ range: Range<UInt64>, _ runs: inout RunCollector,
        _ changed: (Range<UInt64>) throws(MetadataError) -> Void, oneSided: Bool
    ) throws(MetadataError) {
        if oneSided, let lone = a ?? b, let node = lone.node, !node.isLeaf {
            for (child, part) in split(range, among: children(of: node, upper: lone.upper, meeting: range)) {
                guard let child else { continue }
                let read = try read(child)
                try differences(a == nil ? nil : read, a == nil ? read : nil, part, &runs, changed, oneSided: true)
            }
            return
        }
        let left = a.map { ($0, $0.node!) }
        let right = b.map { ($0, $0.node!) }
        // Two leaves (or a leaf and nothing): walk their entries in `range` together.
        var i = left.map { $0.1.lowerBound(range.lowerBound) } ?? 0
        var j = right.map { $0.1.lowerBound(range.lowerBound) } ?? 0
        while true {
            let leftKey = left.flatMap { i < $0.1.count && $0.1.key(i) < range.upperBound ? $0.1.key(i) : nil }
            let rightKey = right.flatMap { j < $0.1.count && $0.1.key(j) < range.upperBound ? $0.1.key(j) : nil }
            switch (leftKey, rightKey) {
            case (nil, nil):
                return
            case (let l?, let r?) where l == r:
                let same = try leafValue(left!.1, i, in: left!.0.number) == leafValue(right!.1, j, in: right!.0.number)
                if !same { try runs.add(l, changed) }
                i += 1
                j += 1
            case (let l?, let r) where r == nil || l < r!:
                try runs.add(l, changed)
                i += 1
            case (_, let r?):
                try runs.add(r, changed)
                j += 1
            default:
                return
            }
        }
    }

    // MARK: Mutation

    /// Shadows a node and, when the original stays shared, references its children.
    private func shadowNode(_ number: UInt64) throws(MetadataError) -> MetadataBlock {
        let (block, shared) = try store.shadow(number, type)
        if shared {
            let node = block.node
            for i in 0..<node.count {
                if node.isLeaf {
                    try retainValue(node.value(i))
                } else {
                    try store.incRef(node.value(i), type)
                }
            }
        }
        return block
    }

    private func retainValue(_ value: UInt64) throws(MetadataError) {
        switch values {
        case .dataBlocks(let spaceMap): try spaceMap.incRef(value)
        case .metadataBlocks(let valueType): try store.incRef(value, valueType)
        case .packedRefcountBlocks: try store.incRef(RefcountLayout.unpackIndexValue(value).block, .refcounts)
        }
    }

    private func releaseValue(_ value: UInt64) throws(MetadataError) {
        switch values {
        case .dataBlocks(let spaceMap): try spaceMap.decRef(value)
        case .metadataBlocks(let valueType): try store.decRef(value, valueType)
        case .packedRefcountBlocks: try store.decRef(RefcountLayout.unpackIndexValue(value).block, .refcounts)
        }
    }

    /// Splits the full `child` (entry `index` of `parent`); returns the new right node.
    private func split(_ child: MetadataBlock, parent: NodeView, at index: Int, appending: Bool) throws(MetadataError) -> MetadataBlock {
        let node = child.node
        let right = try store.allocate(type, level: node.level)
        // Appends (sequential writes) leave the left node nearly full instead of half full.
        node.moveTail(from: appending ? node.count - 1 : node.count / 2, to: right.node)
        parent.insert(right.node.key(0), right.number, at: index + 1)
        return right
    }

    /// Sets `key` to `value`, returning the new root and the value it replaced (whose
    /// reference the caller now owns). Cost: O(log n) block reads, at most one shadow
    /// and one split per level.
    public func insert(_ root: UInt64, _ key: UInt64, _ value: UInt64) throws(MetadataError) -> (root: UInt64, replaced: UInt64?) {
        if root == 0 {
            let leaf = try store.allocate(type, level: 0)
            leaf.node.insert(key, value, at: 0)
            return (leaf.number, nil)
        }
        _ = try readRoot(root)
        var top = try shadowNode(root)
        if top.node.isFull {
            let newRoot = try store.allocate(type, level: top.node.level + 1)
            newRoot.node.insert(top.node.key(0), top.number, at: 0)
            _ = try split(top, parent: newRoot.node, at: 0, appending: key > top.node.key(top.node.count - 1))
            top = newRoot
        }
        var current = top
        while true {
            let node = current.node
            if node.isLeaf {
                let i = node.lowerBound(key)
                if i < node.count && node.key(i) == key {
                    let old = node.value(i)
                    node.setValue(i, value)
                    return (top.number, old)
                }
                node.insert(key, value, at: i)
                return (top.number, nil)
            }
            var i = node.childIndex(for: key)
            if i < 0 {
                i = 0
                node.setKey(0, key)
            }
            var child = try shadowNode(node.value(i))
            try checkLevel(child.node, child.number, under: node.level)
            node.setValue(i, child.number)
            if child.node.isFull {
                let right = try split(child, parent: node, at: i, appending: key > child.node.key(child.node.count - 1))
                if key >= node.key(i + 1) { child = right }
            }
            current = child
        }
    }

    /// Removes `key`, returning the new root and the removed value (whose reference the
    /// caller now owns), or nil when absent (then nothing is shadowed).
    public func remove(_ root: UInt64, _ key: UInt64) throws(MetadataError) -> (root: UInt64, removed: UInt64?) {
        guard try lookup(root, key) != nil else { return (root, nil) }
        var (newRoot, removed) = try removeBelow(root, key, level: nil)
        // Collapse roots with a single child: the child's reference moves up.
        while newRoot != 0 {
            let node = try store.read(newRoot, type).node
            guard !node.isLeaf, node.count == 1 else { break }
            let child = node.value(0)
            try store.incRef(child, type)
            try release(newRoot)
            newRoot = child
        }
        return (newRoot, removed)
    }

    /// `level`: the level the node must have (nil for the root).
    private func removeBelow(_ number: UInt64, _ key: UInt64, level: UInt16?) throws(MetadataError) -> (UInt64, UInt64?) {
        let block = try shadowNode(number)
        let node = block.node
        if let level { try checkLevel(node, number, under: level + 1) }
        var removed: UInt64?
        if node.isLeaf {
            let i = node.lowerBound(key)
            guard i < node.count, node.key(i) == key else {
                throw .corruptBlock(number, type, "key \(key) was found by a lookup but is not in its leaf")
            }
            removed = try leafValue(node, i, in: block.number)
            node.remove(at: i)
        } else {
            let i = node.childIndex(for: key)
            guard i >= 0 else { throw .corruptBlock(number, type, "key \(key) was found by a lookup but lies below this node") }
            let (child, value) = try removeBelow(node.value(i), key, level: node.level - 1)
            removed = value
            if child == 0 { node.remove(at: i) } else { node.setValue(i, child) }
        }
        if node.count == 0 {
            try store.decRef(block.number, type)
            return (0, removed)
        }
        return (block.number, removed)
    }

    /// Removes every entry in `range`, calling `removed` with each key and value (whose
    /// reference the caller then owns). Returns the new root. Cost: O(k log n).
    public func removeAll(
        _ root: UInt64, in range: Range<UInt64>, _ removed: (UInt64, UInt64) throws(MetadataError) -> Void
    ) throws(MetadataError) -> UInt64 {
        var keys: [UInt64] = []
        try forEach(root, in: range) { key, _ in keys.append(key); return true }
        var current = root
        for key in keys {
            let (next, value) = try remove(current, key)
            current = next
            if let value { try removed(key, value) }
        }
        return current
    }

    /// Drops one reference to the tree at `root`; nodes whose count reaches zero are
    /// freed and release their children and leaf values. Cost: O(nodes freed).
    public func release(_ root: UInt64) throws(MetadataError) {
        try release(root, level: nil)
    }

    private func release(_ number: UInt64, level: UInt16?) throws(MetadataError) {
        guard number != 0 else { return }
        if store.refcount(number) > 1 {
            try store.decRef(number, type)
            return
        }
        let node = try store.read(number, type).node
        if let level { try checkLevel(node, number, under: level + 1) }
        for i in 0..<node.count {
            if node.isLeaf {
                try releaseValue(leafValue(node, i, in: number))
            } else {
                try release(node.value(i), level: node.level - 1)
            }
        }
        try store.decRef(number, type)
    }

    /// Adds one reference to the whole tree (a snapshot or clone). Cost: O(1).
    public func retain(_ root: UInt64) throws(MetadataError) {
        if root != 0 { try store.incRef(root, type) }
    }

    /// Open-time scan: counts references to the tree's nodes without reading leaves.
    /// `visit` is called with each (checked) leaf value when `readLeaves` is set.
    public func scanReferences(_ root: UInt64, readLeaves: Bool, visit: (UInt64) throws(MetadataError) -> Void = { _ throws(MetadataError) in }) throws(MetadataError) {
        guard root != 0 else { return }
        guard try store.scanReference(root, type: type) == 1 else { return }
        let node = try readRoot(root)
        if node.isLeaf {
            if readLeaves {
                for i in 0..<node.count { try visit(self.leafValue(node, i, in: root)) }
            }
            return
        }
        try scanChildren(node, upper: nil, readLeaves: readLeaves, visit: visit)
    }

    private func scanChildren(
        _ node: NodeView, upper: UInt64?, readLeaves: Bool, visit: (UInt64) throws(MetadataError) -> Void
    ) throws(MetadataError) {
        for i in 0..<node.count {
            let number = node.value(i)
            guard try store.scanReference(number, type: type) == 1 else { continue }
            if node.level == 1 && !readLeaves { continue }
            let child = try readChild(of: node, at: i, upper: upper)
            if child.node.isLeaf {
                for j in 0..<child.node.count { try visit(self.leafValue(child.node, j, in: number)) }
            } else {
                try scanChildren(child.node, upper: child.upper, readLeaves: readLeaves, visit: visit)
            }
        }
    }
}
