import Metrics
import struct Prometheus.PrometheusMetricsFactory
import class Prometheus.PrometheusCollectorRegistry
import NBDServer
import ThinPool
import ThinSystem

/// The server's metrics, through swift-metrics (so an embedding program may route them
/// to any backend); `thinbd serve --metrics` bootstraps the Prometheus backend and
/// serves its text format. Per-export objects are made once per export name and
/// handed to each connection's export, so a request costs a few atomic increments and
/// no lookups.
final class ServeMetrics: @unchecked Sendable {
    let pool: Pool
    /// Per-export objects, and the pool counts reported so far (under one lock: a sample
    /// racing another must not see counts go back).
    private struct State {
        var exports: [String: ExportMetrics] = [:]
        var reported = PoolStatistics()
        var reportedOrigin: (fetchedBytes: UInt64, errors: UInt64) = (0, 0)
    }
    private let state = LockedValue(State())
    private let usedBytes = Gauge(label: "thinbd_pool_used_bytes")
    private let freeBytes = Gauge(label: "thinbd_pool_free_bytes")
    private let totalBytes = Gauge(label: "thinbd_pool_size_bytes")
    private let metadataUsedBytes = Gauge(label: "thinbd_pool_metadata_used_bytes")
    private let metadataTotalBytes = Gauge(label: "thinbd_pool_metadata_size_bytes")
    private let commits = Counter(label: "thinbd_pool_commits_total")
    private let copyOnWrite = Counter(label: "thinbd_pool_copy_on_write_blocks_total")
    private let newBlocks = Counter(label: "thinbd_pool_allocated_blocks_total")
    private let volumes = Gauge(label: "thinbd_pool_volumes")
    let lowWater = Gauge(label: "thinbd_pool_low_water")
    private let autogrows = Counter(label: "thinbd_pool_autogrow_total")
    /// 1 once damage put the pool in fail mode (reads only, no commits).
    private let damaged = Gauge(label: "thinbd_pool_damaged")
    /// 1 in fail mode for any reason (damage, or a commit that failed).
    private let failed = Gauge(label: "thinbd_pool_failed")
    /// Origin-backed volumes: bytes fetched, failed requests, and whether the last
    /// request reached the origin (1) or not (0).
    private let originFetched = Counter(label: "thinbd_origin_bytes_fetched_total")
    private let originErrors = Counter(label: "thinbd_origin_errors_total")
    private let originUp = Gauge(label: "thinbd_origin_up")

    init(pool: Pool) {
        self.pool = pool
        lowWater.record(0)
    }

    /// The objects of export `name` (made on first use).
    func export(_ name: String) -> ExportMetrics {
        state.withLockedValue { state in
            if let existing = state.exports[name] { return existing }
            let made = ExportMetrics(name)
            state.exports[name] = made
            return made
        }
    }

    /// Drops an export's metrics (an ephemeral export that is gone), so that per-build
    /// names do not pile up in the registry.
    func forget(_ name: String) {
        let gone = state.withLockedValue { $0.exports.removeValue(forKey: name) }
        gone?.destroy()
    }

    /// Samples the pool's gauges and counters (O(1)); called before each scrape and by
    /// the space monitor.
    func samplePool() {
        for export in state.withLockedValue({ Array($0.exports.values) }) { export.sampleLimit() }
        let space = pool.space()
        usedBytes.record(space.dataUsedBytes)
        freeBytes.record(space.dataFreeBytes)
        totalBytes.record(space.dataTotalBytes)
        metadataUsedBytes.record(space.metadataUsedBytes)
        metadataTotalBytes.record(space.metadataTotalBytes)
        volumes.record(space.volumes)
        let failure = pool.failure
        damaged.record(failure?.kind == .damage ? 1 : 0)
        failed.record(failure == nil ? 0 : 1)
        state.withLockedValue { state in
            // Read under the lock: a sample racing another must not see counts go back.
            let now = pool.statistics
            commits.increment(by: Int64(now.commits - state.reported.commits))
            copyOnWrite.increment(by: Int64(now.copyOnWriteBlocks - state.reported.copyOnWriteBlocks))
            newBlocks.increment(by: Int64(now.newBlocks - state.reported.newBlocks))
            state.reported = now
            let origin = pool.originStatistics
            originFetched.increment(by: Int64(origin.fetchedBytes - state.reportedOrigin.fetchedBytes))
            originErrors.increment(by: Int64(origin.errors - state.reportedOrigin.errors))
            state.reportedOrigin = (origin.fetchedBytes, origin.errors)
            if let up = origin.up { originUp.record(up ? 1 : 0) }
        }
    }

    func grew() { autogrows.increment() }

    /// Makes swift-metrics report to a Prometheus registry (once per process) and
    /// returns the registry to render.
    static func bootstrapPrometheus() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        // Storage latencies: tens of microseconds to seconds.
        factory.defaultDurationHistogramBuckets = [
            .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1),
            .microseconds(2500), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
            .milliseconds(100), .milliseconds(250), .seconds(1), .seconds(5),
        ]
        MetricsSystem.bootstrap(factory)
        return registry
    }
}

/// One export's counters, latency histograms and connection gauge.
final class ExportMetrics: @unchecked Sendable {
    /// The raw value indexes `operations` (no lookup per request).
    enum Operation: Int, CaseIterable {
        case read, write, writeZeroes, trim, flush, blockStatus

        var label: String {
            switch self {
            case .read: "read"
            case .write: "write"
            case .writeZeroes: "write_zeroes"
            case .trim: "trim"
            case .flush: "flush"
            case .blockStatus: "block_status"
            }
        }
    }

    struct PerOperation {
        let requests: Counter
        let errors: Counter
        let bytes: Counter
        let latency: Metrics.Timer
    }

    private let operations: [PerOperation]
    private let connectionGauge: Gauge
    private let limitOperations: Gauge
    private let limitBytes: Gauge
    private let throttled: Counter
    /// Connections, and the rate limit with the delay reported so far; under one lock.
    private struct State {
        var connections = 0
        /// The export's rate limit while it has connections (sampled at each scrape).
        weak var rateLimit: NBDRateLimit?
        var reportedDelay: UInt64 = 0
    }
    private let state = LockedValue(State())

    init(_ export: String) {
        operations = Operation.allCases.map { operation in
            let dimensions = [("export", export), ("op", operation.label)]
            return PerOperation(
                requests: Counter(label: "thinbd_requests_total", dimensions: dimensions),
                errors: Counter(label: "thinbd_request_errors_total", dimensions: dimensions),
                bytes: Counter(label: "thinbd_bytes_total", dimensions: dimensions),
                latency: Metrics.Timer(label: "thinbd_request_duration_seconds", dimensions: dimensions))
        }
        connectionGauge = Gauge(label: "thinbd_connections", dimensions: [("export", export)])
        connectionGauge.record(0)
        limitOperations = Gauge(label: "thinbd_export_limit_iops", dimensions: [("export", export)])
        limitBytes = Gauge(label: "thinbd_export_limit_bytes_per_second", dimensions: [("export", export)])
        throttled = Counter(label: "thinbd_export_throttled_nanoseconds_total", dimensions: [("export", export)])
        limitOperations.record(0)
        limitBytes.record(0)
    }

    /// Connections to this export draw from `limit`.
    func limited(by limit: NBDRateLimit) {
        state.withLockedValue { state in
            if state.rateLimit !== limit {
                state.rateLimit = limit
                state.reportedDelay = limit.delayedNanoseconds
            }
        }
        sampleLimit()
    }

    /// Reports the limit in force (0: none) and the time requests waited for it.
    func sampleLimit() {
        state.withLockedValue { state in
            guard let limit = state.rateLimit else { return }
            let rates = limit.rates
            limitOperations.record(Int64(clamping: rates.operationsPerSecond))
            limitBytes.record(Int64(clamping: rates.bytesPerSecond))
            let delay = limit.delayedNanoseconds
            if delay > state.reportedDelay { throttled.increment(by: Int64(clamping: delay - state.reportedDelay)) }
            state.reportedDelay = delay
        }
    }

    /// Records one finished request that started at `started` (monotonic nanoseconds).
    func record(_ operation: Operation, bytes: Int, started: UInt64, failed: Bool) {
        let metrics = operations[operation.rawValue]
        metrics.requests.increment()
        if failed {
            metrics.errors.increment()
        } else if bytes > 0 {
            metrics.bytes.increment(by: Int64(bytes))
        }
        metrics.latency.recordNanoseconds(Int64(SystemInfo.monotonicNanoseconds() - started))
    }

    func destroy() {
        for metrics in operations {
            metrics.requests.destroy()
            metrics.errors.destroy()
            metrics.bytes.destroy()
            metrics.latency.destroy()
        }
        connectionGauge.destroy()
        limitOperations.destroy()
        limitBytes.destroy()
        throttled.destroy()
    }

    func connected(_ delta: Int) {
        let now = state.withLockedValue { state -> Int in
            state.connections += delta
            return state.connections
        }
        connectionGauge.record(now)
    }
}
