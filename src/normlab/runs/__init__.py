"""The run as data: what a run is (`spec`), what it gave (`result`), the tasks that run it
(`tasks`), the folder it is stored in (`store`), the checks of that folder (`verify`) and the
leases that let several writers share it (`lease`).

It imports utils/ and, for the names a setting may take, nn/ and data/; nothing above it.
"""
