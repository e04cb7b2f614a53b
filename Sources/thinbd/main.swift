import ThinCLI

ThinbdCommand.main()
