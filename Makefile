# drsync: every target sets up what it needs itself, on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: rsync is the peer in benchmarks and restic the peer of snapshots (bench --only restic);
# ZooKeeper (Java 17 is on the machine) coordinates agents and runs in tests as throwaway servers;
# prometheus brings promtool for the alert rules' unit tests, and with prometheus-alertmanager evaluates
# and delivers them for real (tests/test_prometheus_alerts.py); chromium loads the status page in tests;
# faketime runs the CLI with its clock a day off (tests/test_snapshot_order.py); maven builds the real
# HDFS mini cluster (tests/hadoop: Hadoop 3.5 from Maven Central) that every HDFS test runs against; strace
# kills a restore at a chosen system call (tests/test_breaker_s49c.py).
DEB_PACKAGES := rsync restic zookeeper prometheus prometheus-alertmanager chromium faketime maven tesseract-ocr tesseract-ocr-eng strace

.PHONY: help venv bytecode system-deps hadoop test lint demo bench reliability proto clean man docs

help:
	@echo "make demo    - set up and run the snapshot/backup demo on generated data"
	@echo "make test    - install what the tests need and run them"
	@echo "make bench   - drsync against rsync on the same generated data (slow)"
	@echo "make reliability - the fault trials with many more trials (about 45 minutes)"
	@echo "make lint    - ruff"
	@echo "make docs    - regenerate docs/cli.md from every command's --help"
	@echo "make man     - man pages from the same text in docs/man (man docs/man/drsync-status.1)"

# Python packages at the versions of constraints.txt (what the suite last passed with).
# The install builds drsync's C listing (drsync/_listdir.c): it needs a C compiler and Python's headers.
$(STAMP): pyproject.toml constraints.txt drsync/_listdir.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	@command -v gcc >/dev/null && test -f "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" \
		|| { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq gcc python3-dev; }
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@$(PY) -c 'from drsync import native_walk; assert native_walk.available(), "drsync/_listdir.c was not built"'
	@touch $(STAMP)

venv: $(STAMP)

# drsync's bytecode, as an installed wheel has it: under PYTHONDONTWRITEBYTECODE an editable install
# would compile every module it imports in every process: 0.2 s of the start of each command, agent and
# test process (import drsync.cli.entry: 0.62 s median without, 0.43 s with, on 2 busy cores).
bytecode: $(STAMP)
	@$(PY) -m compileall -q -j 0 drsync tests bench scripts

system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
		--no-install-recommends $$missing >/dev/null; fi

# The HDFS mini cluster's jars (Maven Central, once) and launcher, and drsync's DistCp copy listing
# (java/distcp/target/drsync-distcp.jar): scripts/hadoop-cluster build.
hadoop: $(STAMP) system-deps
	$(PY) scripts/hadoop-cluster build

lint: $(STAMP)
	$(VENV)/bin/ruff check drsync tests bench scripts

# Three workers on two cores, whole modules each: every worker starts its own ZooKeeper and HDFS mini
# cluster once; tests keep apart by group name, test directory and free ports. Much of the suite waits
# (agents' cycles, ZooKeeper sessions, DistCp's JVMs), so a third worker fills idle time: on 2 cores
# the suite took 32 min with two workers, 25 with three and 23 with four, and at four the cores were
# busy (process accounting: about 80 % of its CPU time is Python, drsync's processes and the workers);
# with less CPU per process (drsync.allocators: one OpenBLAS thread), 23.4 min with three.
test: $(STAMP) system-deps hadoop lint bytecode
	$(PY) -m pytest -q -rfEs -n 3 --dist loadfile --durations=25 tests

docs: $(STAMP)
	PYTHONPATH=. $(PY) scripts/gen_cli_docs.py

man: $(STAMP)
	PYTHONPATH=. $(PY) scripts/gen_man.py

demo: $(STAMP) bytecode
	bash scripts/demo.sh

bench: $(STAMP) system-deps hadoop bytecode
	$(PY) bench/bench.py

reliability: $(STAMP) system-deps hadoop bytecode
	DRSYNC_RELIABILITY=full DRSYNC_CRASH_TRIALS=40 DRSYNC_FAILOVER_TRIALS=15 $(PY) -m pytest -q \
		tests/test_reliability.py tests/test_crash.py tests/test_lock.py tests/test_failover.py \
		tests/test_apply_crash.py tests/test_long_apply.py tests/test_breaker_cont_bw.py \
		tests/test_breaker_fanout.py tests/test_distcp_breaker.py
	DRSYNC_RELIABILITY=full DRSYNC_CRASH_TRIALS=40 $(PY) -m pytest -q tests/test_agents.py -k kill_9
	# Every combination of the parameter grids make test samples (tests.reliability.combinations).
	DRSYNC_RELIABILITY=full $(PY) -m pytest -q -n 2 tests/test_breaker_memory_paths.py tests/test_breaker_s41_locks.py \
		tests/test_breaker_s32.py tests/test_breaker_spool_merge.py tests/test_guard_merge.py

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) demo-work bench-work .pytest_cache tests/hadoop/target java/distcp/target docs/man
