import ArgumentParser
import ThinControl
import ThinPool

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Verify every metadata block and reference count.",
        discussion: """
            While the pool is served the server checks its live state (I/O waits while the \
            metadata is walked); --repair needs the pool offline.
            Exit status: 0 clean, 1 damage found, 2 could not check.
            """)

    @OptionGroup var target: PoolArgument

    @Flag(help: "Fix leaked blocks and stale counts (other damage is only reported). Offline only.")
    var repair = false

    @OptionGroup var live: LiveOptions

    func run() throws {
        let report = repair ? try repairOffline() : try checkAnywhere()
        let damaged = !report.damage.isEmpty
        emit(report, live) {
            for line in report.damage { print("damage: \(line)") }
            if !report.repaired {
                for line in report.stale { print("stale: \(line)") }
                if report.leakedBlocks > 0 { print("leaked: \(report.leakedBlocks) data blocks are counted but unused") }
            }
            if !report.originBacked.isEmpty {
                print("origin-backed: \(report.originBacked.joined(separator: ", ")) (blocks not fetched yet read from the origin; 'thinbd hydrate' copies them)")
            }
            print("checked \(report.volumesChecked) volumes, \(report.metadataBlocksChecked) metadata blocks, \(report.blockMappings) block mappings")
            if report.repaired && !damaged {
                let leaked = report.leakedBlocks
                print("repaired: \(leaked == 0 ? "" : "\(leaked) leaked blocks reclaimed; ")counts rewritten")
            }
            if report.clean || (report.repaired && !damaged) {
                print("clean")
            } else if !repair && !damaged {
                print("run 'thinbd check --repair \(target.pool)' to fix (with the pool offline)")
            }
        }
        if !report.clean && !(report.repaired && !damaged) { throw ExitCode(1) }
    }

    private func checkAnywhere() throws -> CheckResult {
        do throws(ControlError) {
            return try PoolCommandClient(poolPath: target.pool, controlPath: live.control).run(.check).reply.result()
        } catch {
            // A pool too damaged to open is damage found, not a failure to check.
            throw fail(error, live, code: error.code == "corrupt" ? 1 : 2)
        }
    }

    private func repairOffline() throws -> CheckResult {
        if (try? ControlClient.connectToServer(ofPool: target.pool, at: live.control)) != nil {
            throw fail(ControlError(code: "busy", message: "check --repair needs the pool offline; stop the server first (a read-only check works while it is served)"), live, code: 2)
        }
        let pool: Pool
        do {
            // A pool flagged for a check opens for its repair: that is what clears the flag.
            pool = try Pool.open(path: target.pool, readOnly: false, force: true)
        } catch {
            throw fail(ControlError(error), live, code: ControlError(error).code == "corrupt" ? 1 : 2)
        }
        let report = pool.check(repair: true)
        try? pool.close()
        return CheckResult(report)
    }
}
