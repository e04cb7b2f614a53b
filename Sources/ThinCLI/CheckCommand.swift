import ArgumentParser
import ThinPool

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Verify every metadata block and reference count.",
        discussion: "Exit status: 0 clean, 1 damage found, 2 could not check.")

    @OptionGroup var target: PoolArgument

    @Flag(help: "Fix leaked blocks and stale counts (other damage is only reported).")
    var repair = false

    func run() throws {
        let pool: Pool
        do {
            pool = try Pool.open(path: target.pool, readOnly: !repair)
        } catch {
            switch error {
            case .corrupt, .truncated:
                throw fail(error, code: 1)
            default:
                throw fail(error, code: 2)
            }
        }
        let report = pool.check(repair: repair)
        try? pool.close()
        for line in report.damage { print("damage: \(line)") }
        for line in report.fixable where !report.repaired { print("stale: \(line)") }
        if report.leakedBlocks > 0 && !report.repaired { print("leaked: \(report.leakedBlocks) data blocks are counted but unused") }
        print("checked \(report.volumesChecked) volumes, \(report.metadataBlocksChecked) metadata blocks, \(report.dataReferences) block mappings")
        if report.repaired && report.damage.isEmpty {
            print("repaired: \(report.leakedBlocks == 0 ? "" : "\(report.leakedBlocks) leaked blocks reclaimed; ")counts rewritten")
            print("clean")
            return
        }
        if report.isClean {
            print("clean")
            return
        }
        if !repair && report.damage.isEmpty { print("run 'thinbd check --repair \(target.pool)' to fix") }
        throw ExitCode(1)
    }
}
