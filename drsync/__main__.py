from drsync.cli import run

run()
