"""Turning a plan of runs into stored results: the checks before the first run (`preflight`),
packing compatible runs (`packing`) and the measured throughput table behind its defaults
(`throughput`), the executors behind one interface (`base`; `local`, `slurm`, `ray`, and their
command-line flags in `args`), the loop that runs until every run is settled (`settle`), the
progress channel (`progress`) and where each run of a study stands (`state`).

It imports runs/, train/ and below; never studies/, report/, the runner or the CLI.
"""
