import ArgumentParser
import ThinPool

struct VolumeListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List volumes, snapshots and clones.")

    @OptionGroup var target: PoolArgument

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let volumes = try withPool(target.pool, readOnly: true) { $0.listVolumes() }
        if json {
            print(JSON.array(volumes.map(volumeJSON)).rendered())
            return
        }
        var rows = [["NAME", "KIND", "SIZE", "MAPPED", "PARENT"]]
        for v in volumes {
            rows.append([v.name, v.kind.rawValue, formatBytes(v.size), formatBytes(v.mappedBytes), v.parent ?? "-"])
        }
        printTable(rows)
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
