import ArgumentParser
import ThinControl
import ThinPool
import ThinSystem

struct DiffCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff",
        abstract: "List the extents whose contents may differ between two volumes or snapshots.",
        discussion: """
            Prints one 'OFFSET LENGTH' line (bytes) per extent, in order: whole data blocks mapped \
            in one image and not the other, or mapped to different data. The two mapping trees are \
            walked together and every subtree they share is skipped unread, so the cost follows the \
            change, not the size. Images that share no history are compared too: then every extent \
            either one maps is listed (a note on standard error says so).
            """)

    @OptionGroup var target: PoolArgument

    @Argument(help: "The older image: VOLUME or VOLUME@SNAPSHOT.")
    var from: String

    @Argument(help: "The newer image: VOLUME or VOLUME@SNAPSHOT.")
    var to: String

    @OptionGroup var live: LiveOptions

    func run() throws {
        let result = try runPoolCommand(.diff(from: from, to: to), pool: target.pool, options: live, as: DiffResult.self)
        emit(result, live) {
            if !result.related {
                SystemInfo.writeStandardError("thinbd: \(from) and \(to) share no history: every extent either one maps is listed\n")
            }
            print(Self.lines(result), terminator: "")
        }
    }

    static func lines(_ result: DiffResult) -> String {
        result.extents.map { "\($0.offset) \($0.length)\n" }.joined()
    }
}
