import ArgumentParser
import ThinControl

/// The `thinbd` command line. Each subcommand lives in its own file; the logic lives in
/// the ThinPool library.
public struct ThinbdCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "thinbd",
        abstract: "Thin provisioning in one file: volumes, snapshots and clones in a pool.",
        discussion: """
            SIZE arguments take bytes or K, M, G, T (powers of 1024): 10G, 512M, 65536. \
            Snapshots are named VOLUME@SNAPSHOT. While 'thinbd serve' has a pool, the other \
            commands work on it through the server's control socket (POOL.control); --json \
            prints any command's result as JSON.
            """,
        version: ControlEndpoint.version,
        subcommands: [
            CreateCommand.self, InfoCommand.self, CheckCommand.self, GrowCommand.self, VolumeCommand.self,
            SnapshotCommand.self, CloneCommand.self, RollbackCommand.self, TreeCommand.self, DiffCommand.self, SendCommand.self, ReceiveCommand.self, HydrateCommand.self, ImportCommand.self,
            ExportCommand.self, ServeCommand.self, LimitCommand.self,
            DemoCommand.self,
        ]
    )

    public init() {}
}
