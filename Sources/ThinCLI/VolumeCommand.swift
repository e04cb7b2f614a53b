import ArgumentParser

struct VolumeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume",
        abstract: "Create, list, delete, rename and resize volumes.",
        subcommands: [
            VolumeCreateCommand.self, VolumeListCommand.self, VolumeDeleteCommand.self, VolumeRenameCommand.self,
            VolumeResizeCommand.self,
        ])
}
