"""A real HDFS for tests and benchmarks (Hadoop's MiniDFSCluster, driven by tests/hadoop/cluster.py)."""
