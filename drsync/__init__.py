"""drsync: disaster-recovery replication with snapshots, portable backups and a synced standby."""

from drsync import allocators

allocators.tune()  # before anything imports pyarrow

__version__ = "0.1.0"
