/// How a pool grows its data region by itself (`serve --autogrow STEP --autogrow-max SIZE`).
public struct AutoGrowPolicy: Sendable, Equatable {
    /// Bytes added at a time.
    public var step: UInt64
    /// The data capacity it never grows past.
    public var maximum: UInt64
    /// Called (under the pool lock: keep it short) with the new capacity after each growth.
    public var grew: (@Sendable (UInt64) -> Void)?

    public init(step: UInt64, maximum: UInt64, grew: (@Sendable (UInt64) -> Void)? = nil) {
        self.step = step
        self.maximum = maximum
        self.grew = grew
    }

    public static func == (lhs: AutoGrowPolicy, rhs: AutoGrowPolicy) -> Bool {
        lhs.step == rhs.step && lhs.maximum == rhs.maximum
    }
}

extension Pool {
    /// When set, a write that would fail for lack of data space first grows the pool (by
    /// as many steps as it needs, up to `maximum`), and `growByStep` grows it ahead of
    /// time. Growing extends the file sparsely; the new size is committed with the next
    /// transaction.
    public var autoGrow: AutoGrowPolicy? {
        get { lock.withSharedAccess { $0.autoGrow } }
        set { lock.withLock { $0.autoGrow = newValue } }
    }

    /// Grows by one step of the policy, unless at its maximum (or the metadata region
    /// would be too small). Returns the new capacity, or nil when it did not grow.
    /// Commits. Cost: one ftruncate and one commit.
    @discardableResult
    public func growByStep() throws(PoolError) -> UInt64? {
        try withWritableLock { state throws(PoolError) -> UInt64? in
            guard let grown = try growForPolicy(&state, atLeast: 1) else { return nil }
            try finishManagement(&state)
            return grown
        }
    }

    /// Grows by whole steps until `blocks` more are free, within the policy; nil when it
    /// cannot.
    func growForPolicy(_ state: inout PoolState, atLeast blocks: UInt64) throws(PoolError) -> UInt64? {
        guard let policy = state.autoGrow, policy.step >= blockSize else { return nil }
        let current = state.spaceMap.dataBlocks * blockSize
        // Saturating: a policy of absurd sizes stops at its maximum, it does not trap.
        let (needed, o1) = blocks.multipliedReportingOverflow(by: blockSize)
        let steps = o1 ? UInt64.max : needed / policy.step + (needed % policy.step == 0 ? 0 : 1)
        let (growth, o2) = max(steps, 1).multipliedReportingOverflow(by: policy.step)
        let (sum, o3) = current.addingReportingOverflow(growth)
        let target = o2 || o3 ? policy.maximum : min(sum, policy.maximum)
        guard target / blockSize > state.spaceMap.dataBlocks else { return nil }
        do throws(PoolError) {
            try grow(&state, to: target)
        } catch {
            // The metadata region caps the size: the policy stops here.
            return nil
        }
        policy.grew?(target)
        return target
    }
}
