import ArgumentParser
import ThinControl
import ThinPool

/// `PATTERN=IOPS[,BYTES[/s]]`, as `serve --limit` and `limit` take it.
extension ExportLimitRule {
    static func parse(_ text: String) -> ExportLimitRule? {
        guard let equals = text.lastIndex(of: "="), equals != text.startIndex else { return nil }
        let pattern = String(text[..<equals])
        let values = text[text.index(after: equals)...].split(separator: ",", omittingEmptySubsequences: false)
        guard (1...2).contains(values.count), let iops = UInt64(values[0]) else { return nil }
        var bytes: UInt64 = 0
        if values.count == 2 {
            var rate = String(values[1])
            if rate.hasSuffix("/s") { rate.removeLast(2) }
            guard let parsed = ByteSize.parse(rate) else { return nil }
            bytes = parsed
        }
        return ExportLimitRule(pattern: pattern, operationsPerSecond: iops, bytesPerSecond: bytes)
    }
}

struct LimitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "limit",
        abstract: "Show or change the per-export rate limits of a served pool.",
        discussion: """
            PATTERN=IOPS[,BYTES/s] limits every export matching PATTERN (* and ?) to IOPS requests \
            and BYTES per second (K, M, G suffixes), shared by all its connections, open ones \
            included; 0 lifts that limit, PATTERN=0 removes the rule. The last matching rule wins. \
            Without a rule, prints the rules in force. Needs the server (thinbd serve).
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: ArgumentHelp("PATTERN=IOPS[,BYTES/s], for example 'build-*=1000,100M'.", valueName: "RULE"))
    var rule: String?

    @OptionGroup var live: LiveOptions

    func validate() throws {
        if let rule, ExportLimitRule.parse(rule) == nil {
            throw ValidationError("\(rule): expected PATTERN=IOPS[,BYTES/s], for example 'build-*=1000,100M'")
        }
    }

    func run() throws {
        let command: ControlCommand = rule.flatMap(ExportLimitRule.parse).map { .setLimit($0) } ?? .limits
        let rules = try runPoolCommand(command, pool: target.pool, options: live, as: [ExportLimitRule].self)
        emit(rules, live) {
            if rules.isEmpty { print("no limits") }
            for rule in rules {
                let iops = rule.operationsPerSecond
                let bytes = rule.bytesPerSecond
                let parts = [iops > 0 ? "\(iops) IOPS" : nil, bytes > 0 ? "\(formatBytes(bytes))/s" : nil].compactMap { $0 }
                print("\(rule.pattern): \(parts.joined(separator: ", "))")
            }
        }
    }
}
