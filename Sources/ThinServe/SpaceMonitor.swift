import Dispatch
import Logging
import ThinPool

/// Watches the pool's data space while it is served: above the low-water mark it grows
/// the pool by a step (with `--autogrow`) or warns once (and sets the
/// `thinbd_pool_low_water` gauge) until usage falls below the mark again. Writes that
/// outrun it are still covered: with an autogrow policy a full pool grows on the spot.
final class SpaceMonitor: @unchecked Sendable {
    private let timer: DispatchSourceTimer
    private var warned = false

    init(pool: Pool, lowWaterPercent: Int, autoGrow: Bool, metrics: ServeMetrics?, logger: Logger, milliseconds: Int = 1000) {
        timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "thinbd.space"))
        timer.schedule(deadline: .now(), repeating: .milliseconds(milliseconds))
        timer.setEventHandler { [weak self, weak pool] in
            guard let self, let pool else { return }
            self.check(pool, lowWaterPercent: lowWaterPercent, autoGrow: autoGrow, metrics: metrics, logger: logger)
        }
        timer.resume()
    }

    private func check(_ pool: Pool, lowWaterPercent: Int, autoGrow: Bool, metrics: ServeMetrics?, logger: Logger) {
        defer { metrics?.samplePool() }
        let space = pool.space()
        guard space.dataTotalBytes > 0 else { return }
        guard space.percentUsed >= Double(lowWaterPercent) else {
            if warned {
                logger.info("pool \(pool.path) is below its low-water mark again (\(Int(space.percentUsed))% used)")
                warned = false
            }
            metrics?.lowWater.record(0)
            return
        }
        if autoGrow {
            do throws(PoolError) {
                if try pool.growByStep() != nil {
                    if pool.space().percentUsed < Double(lowWaterPercent) { return }
                }
            } catch .closed {
                return
            } catch {
                logger.error("autogrow failed: \(error)")
            }
        }
        metrics?.lowWater.record(1)
        if !warned {
            warned = true
            let now = pool.space()
            logger.warning(
                "pool \(pool.path) is \(Int(now.percentUsed))% full (low-water mark \(lowWaterPercent)%): \(formatBytes(now.dataFreeBytes)) free of \(formatBytes(now.dataTotalBytes))\(autoGrow ? "; autogrow is at its maximum" : "; grow it with 'thinbd grow' or serve with --autogrow")")
        }
    }

    func stop() { timer.cancel() }

    deinit { timer.cancel() }
}
