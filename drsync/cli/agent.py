"""One agent's side: ``drsync agent`` (run it), ``apply`` (a standby's holds), ``drill run`` and
``config check``.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from drsync.cli import signals
from drsync.cli.common import STATE, Exit, Invocation, config_only, echo_json, emit, exits, need_config, say, table
from drsync.config import Config
from drsync.errors import EXIT_FAILED, EXIT_USAGE, DrsyncError, UsageError
from drsync.logsetup import FORMATS
from drsync.logsetup import configure as configure_logging
from drsync.repository.snapshots import iso


@click.command("agent", epilog=exits(
             "0 stopped (SIGTERM, SIGINT, SIGHUP, SIGQUIT); --once: the cycle reached every standby",
             "1 --once: the cycle failed; a lock another agent holds, or a fatal error while running",
             "2 the config (roles, fencing, topology), a port in use, or a usage error",
             "3 its repository is damaged",
             "4 refused for safety (a name another agent owns in the group, fenced)"))
@config_only
@click.option("--once", is_flag=True, help="Primary only: run one replication cycle and exit (1 if it failed).")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Log lines on stderr as text or as JSON objects (time, level, logger, group, agent, message).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="The least severe records logged (--once: warning unless set lower).")
def agent_cmd(inv: Invocation, once: bool, log_format: str, log_level: str) -> None:
    """Run the agent for this cluster (gRPC server and, as primary, the shipping loop).

    Logs go to stderr, one line per record with an ISO 8601 time and zone, the group and the agent;
    refusals and failed shipments are warnings or errors.

    It refuses to start on a state directory, data root or repository another agent on this host holds, or
    a listen or metrics port in use."""
    from drsync.agent.loop import Agent

    if inv.config is None:
        raise UsageError("drsync agent needs --config FILE")
    c = inv.config
    level = getattr(logging, log_level.upper())
    if once and log_level == "info":
        level = logging.WARNING
    configure_logging(group=c.coordination.group, agent=c.agent.name, fmt=log_format, level=level,
                      tracebacks=inv.debug or level <= logging.DEBUG)
    STATE["json_log"] = log_format == "json"  # from here on, the error that ends the command is a record
    if inv.json and not once:
        raise UsageError("--json reports the one cycle of --once; a running agent writes JSON logs with "
                         "--log-format json")
    if once and c.agent.role != "primary":
        raise UsageError("--once runs one replication cycle; it needs agent.role = \"primary\"")
    try:
        agent = Agent(c, serve_network=not once)  # a one-shot cycle must not collide with a running agent
    except DrsyncError as e:
        if log_format != "json":
            raise
        # JSON logs stay JSON: the one-line error is a log record, and nothing else is printed.
        logging.getLogger("drsync.agent").error("agent %s cannot start: %s", c.agent.name, e)
        raise Exit(e.exit_code, "") from None
    if once:
        try:
            decision = agent.run_cycle()
            agent.maintain()
        finally:
            agent.close()
        emit(inv, {"ok": decision.ok, "snapshot": decision.snapshot, "shipped": decision.shipped,
                   "paused": decision.paused,
                   "results": decision.results, "duration_s": decision.duration_s},
             lambda: say(str(decision)))
        if not decision.ok:
            raise Exit(EXIT_FAILED, "the replication cycle did not reach every standby; see above")
        return
    signals.handle(agent, c.agent.name)
    agent.run()
    if agent.fatal is not None:
        raise agent.fatal


def _open_agent_here(cfg: Config) -> Any:
    """The agent of ``cfg`` opened in this process without network: a request carried out directly while
    no agent runs (drsync.agent.requests.submit)."""
    from drsync.agent.loop import Agent

    return Agent(cfg, serve_network=False)


@click.command("apply", epilog=exits(
             "0 shown, or the request carried out",
             "1 the agent did not answer within --wait, or the apply failed",
             "2 a primary's config, two options, or a usage error",
             "4 refused: --confirm names a snapshot that is not the one held"))
@config_only
@click.option("--confirm", "confirm", metavar="SNAPSHOT",
              help="Apply the snapshot a guard holds (deletions, mass changes), or acknowledge an applied mass "
                   "change (replication.on_mass_change = \"alert\").")
@click.option("--hold", "hold", is_flag=True, help="Store shipments but apply none until --resume.")
@click.option("--resume", "resume", is_flag=True, help="Lift a hold set with --hold.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Seconds to wait for the running agent to carry the request out.")
def apply_cmd(inv: Invocation, confirm: str | None, hold: bool, resume: bool, wait_s: float) -> None:
    """On a standby: show what holds applies back or is flagged; confirm a held snapshot; hold and resume applies.

    Without an option it reads the standby's state directory and prints what holds applies back; each
    option is carried out by the running agent (or here, when none runs), under its commit lock."""
    from drsync.agent.hold import HoldFile
    from drsync.agent.requests import submit
    from drsync.agent.state import StateStore, state_dir_of

    cfg = need_config(inv, "apply")
    chosen = [n for n, v in (("--confirm", confirm is not None), ("--hold", hold), ("--resume", resume)) if v]
    if len(chosen) > 1:
        raise UsageError(f"choose one of {', '.join(chosen)}")
    if cfg.agent.role == "primary":
        raise UsageError(f"agent {cfg.agent.name} is a primary (agent.role); run drsync apply with the "
                         f"standby's config")
    if chosen:
        name, args = (("apply-confirm", {"snapshot": confirm}) if confirm is not None else
                      ("apply-hold", {}) if hold else ("apply-resume", {}))
        reply = submit(cfg, name, args, wait_s=wait_s, open_agent=_open_agent_here)
        doc = {"action": name, **reply.as_dict()}
        if not reply.ok:
            if inv.json:
                echo_json(doc)
            raise Exit(reply.exit_code, reply.message)
        emit(inv, doc, lambda: say(reply.message))
        return
    state_dir = state_dir_of(cfg)
    h = HoldFile(state_dir).load()
    applied = StateStore(state_dir).load().applied_snapshot
    doc = {"agent": cfg.agent.name, "applied_snapshot": applied or None, **h.as_dict()}

    def human() -> None:
        say(f"standby {cfg.agent.name}: applied snapshot {applied or '(none)'}")
        if h.operator_since:
            say(f"applies held since {iso(h.operator_since)} (drsync apply --hold); "
                       f"'drsync apply --resume' lifts it")
        if h.snapshot:
            say(f"held by the {'mass-change' if h.changed and not h.removed else 'deletion'} guard since "
                       f"{iso(h.held_at)}: {h.message}")
        if h.flagged:
            say(f"MASS CHANGE (applied, not acknowledged): {h.flagged_message}")
        if h.active and h.latest:
            say(f"{h.refused} shipment(s) stored and refused while held; newest {h.latest}")
        if not h.active:
            click.echo("nothing is held: shipments are applied as they arrive")

    emit(inv, doc, human)


@click.group("drill")
def drill_grp() -> None:
    """Rehearsals on the standby: verify, trial-restore, time a dry-run promotion."""


@drill_grp.command("run", epilog=exits(
             "0 the drill passed",
             "1 a step failed (named, with why), or the repository or ZooKeeper cannot be read",
             "2 run on the primary, or a usage error"))
@config_only
@click.option("--full", is_flag=True, help="Verify every chunk, whatever drills.sample says.")
@click.option("--to-snapshot", "point", metavar="ID", help="Rehearse a promotion at this earlier snapshot "
              "(drsync status --points): verify it in full and restore it into scratch space.")
@click.option("--before", metavar="TIME", help="Rehearse the promotion drsync promote --before TIME would make: at "
              "the newest snapshot this standby stored at or before TIME (ISO 8601, local time without a zone; Unix "
              "seconds; or a span ago such as 2h).")
def drill_run(inv: Invocation, full: bool, point: str | None, before: str | None) -> None:
    """Run a drill now on this standby; exit 1 when it fails.

    Verifies the applied snapshot's chunks (a sample, or all with --full), restores it into scratch space
    and compares the result with the data root, and times a dry-run promotion; the report is kept in the
    state directory and the group (drsync status shows the last)."""
    from drsync.agent.drill import run_drill
    from drsync.agent.state import state_dir_of
    from drsync.coordination import open_coordinator

    cfg = need_config(inv, "drill run")
    open_coord = None
    is_primary = False
    if cfg.agent.role == "auto":
        def open_coord() -> Any:
            return open_coordinator(cfg)

        coord = open_coord()
        coord.start()
        try:
            primary = coord.read_primary()
        finally:
            coord.close()
        is_primary = primary is not None and primary.agent == cfg.agent.name
    report = run_drill(cfg, state_dir=state_dir_of(cfg), open_coord=open_coord, full=full or None,
                       is_primary=is_primary, point=point, before=before)
    doc = report.as_dict()

    def human() -> None:
        say(f"drill {report.number} on {'the earlier ' if report.point_in_time else ''}snapshot "
                   f"{report.snapshot or '-'}: "
                   f"{'passed' if report.passed else 'FAILED'}")
        for s in report.steps:
            say(f"  {'ok  ' if s.passed else 'FAIL'} {s.name:10} {s.duration_s:8.2f}s  {s.detail}")
        say(f"  RPO {report.rpo_s if report.rpo_s is not None else '-'} s, "
                   f"RTO {report.rto_s if report.rto_s is not None else '-'} s ({report.rto_basis or 'not estimated'})")

    emit(inv, doc, human)
    if not report.passed:
        first = next(s for s in report.steps if not s.passed)
        raise Exit(EXIT_FAILED, f"drill {report.number} failed at {first.name}: {first.detail}")


@click.group("config")
def config_grp() -> None:
    """Configuration: check a config (and what it names) before an agent runs with it."""


@config_grp.command("check", epilog=exits(
             "0 every check ok (warnings allowed)",
             "1 a check of something outside the file failed (data root, repository, ZooKeeper, a peer)",
             "2 the config itself is invalid"))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), envvar="DRSYNC_CONFIG",
              help="TOML configuration file (or DRSYNC_CONFIG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds to wait for ZooKeeper, each peer agent, and an HDFS data root or repository.")
def config_check(config_path: str, as_json: bool, debug: bool, timeout_s: float) -> None:
    """Validate a config, its data root and repository, ZooKeeper and the peer agents; list every problem.

    Checks every key (all unknown ones at once), fencing, topology, the state directory (not shared, owned
    by this agent), the data root and repository, the listen and metrics ports, TLS files, ZooKeeper (its
    chroot), that no other live agent uses this name, the advertise address and each peer agent. WARN
    lines do not fail."""
    from drsync.agent.configcheck import check_config

    checks = check_config(config_path, timeout_s=timeout_s)
    failed = [c for c in checks if not c.ok]
    inv = Invocation(None, None, as_json, debug)
    emit(inv, {"ok": not failed, "checks": [c.as_dict() for c in checks]},
         lambda: table(["CHECK", "RESULT", "DETAIL"],
                        [[c.name, ("WARN" if c.warn else "ok") if c.ok else "FAIL", c.detail] for c in checks]))
    if failed:
        code = EXIT_USAGE if any(c.kind == "config" for c in failed) else EXIT_FAILED
        raise Exit(code, f"{len(failed)} problem(s) in {config_path}; first: {failed[0].name}: {failed[0].detail}")
