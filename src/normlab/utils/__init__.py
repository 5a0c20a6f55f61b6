"""The base every layer stands on: settings checks (`config`), registries, plugin discovery,
atomic file writes, optional dependencies, silencing one known warning (`silence`) and the
version. It imports nothing else of normlab."""
