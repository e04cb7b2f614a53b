import ArgumentParser
import Testing

@testable import ThinCLI

/// The help text: ArgumentParser wraps each line of a discussion to the terminal's
/// width on its own, so a paragraph hard-wrapped in the source printed as ragged lines
/// (a full line, then a stub of a few words). Paragraphs are written as one line each
/// (`\` continuations in the source); a line break is kept only before a new sentence
/// meant to stand on its own line.
@Suite struct HelpTextTests {
    /// Every command, subcommands included.
    private func allCommands(_ root: ParsableCommand.Type = ThinbdCommand.self) -> [ParsableCommand.Type] {
        [root] + root.configuration.subcommands.flatMap { allCommands($0) }
    }

    @Test func noDiscussionBreaksALineInsideASentence() {
        let commands = allCommands()
        #expect(commands.count > 20)
        for command in commands {
            let lines = command.configuration.discussion.split(separator: "\n", omittingEmptySubsequences: false)
            for (previous, line) in zip(lines, lines.dropFirst()) {
                guard let first = line.first, !previous.isEmpty else { continue }
                let continuesASentence = first.isLowercase || !(previous.last.map { ".:)".contains($0) } ?? true)
                #expect(!continuesASentence, "\(command.configuration.commandName ?? "?"): '\(previous)' / '\(line)'")
            }
        }
    }
}
