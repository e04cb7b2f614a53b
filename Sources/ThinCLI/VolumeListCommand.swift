import ArgumentParser
import ThinControl
import ThinPool

struct VolumeListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List volumes, snapshots and clones (with connections when served).")

    @OptionGroup var target: PoolArgument
    @OptionGroup var live: LiveOptions

    func run() throws {
        let (list, served) = try runPoolCommandReportingServer(.list, pool: target.pool, options: live, as: [VolumeSummary].self)
        emit(list, live) {
            // The ORIGIN column appears while some volume still reads from an origin.
            let origins = list.contains { $0.origin != nil }
            var header = ["NAME", "KIND", "SIZE", "MAPPED", "PARENT"]
            if origins { header.append("ORIGIN") }
            if served { header.append("CLIENTS") }
            var rows = [header]
            for v in list {
                var row = [v.name, v.kind + (v.ephemeral ? " (ephemeral)" : ""), formatBytes(v.size), formatBytes(v.mappedBytes), v.parent ?? "-"]
                if origins { row.append(v.origin?.address ?? "-") }
                if served { row.append(String(v.connections)) }
                rows.append(row)
            }
            printTable(rows)
        }
    }
}

func printTable(_ rows: [[String]]) {
    guard let columns = rows.first?.count else { return }
    var widths = [Int](repeating: 0, count: columns)
    for row in rows {
        for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) }
    }
    for row in rows {
        var line = ""
        for (i, cell) in row.enumerated() {
            line += i == columns - 1 ? cell : cell + String(repeating: " ", count: widths[i] - cell.count + 2)
        }
        print(line)
    }
}
