"""drsync: disaster-recovery replication with snapshots, portable backups and a synced standby."""

__version__ = "0.1.0"
