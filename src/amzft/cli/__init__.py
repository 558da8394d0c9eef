"""The command line: the entry point, the LightningCLI subclass and the commands that are not Lightning loops."""
