"""The group's roles: ``drsync status``, ``history``, ``promote``, ``switchover``, ``rejoin`` and
``replace-identity`` (ZooKeeper, through :mod:`drsync.agent.control`).
"""

from __future__ import annotations

import logging
import time

import click

from drsync.cli.common import Invocation, config_only, emit, exits, need_config, say, table
from drsync.errors import DrsyncError, UsageError
from drsync.repository.snapshots import iso
from drsync.units import human_size


@click.command("status", epilog=exits(
             "0 shown (whatever the group's state)",
             "1 ZooKeeper or the repository cannot be read",
             "2 usage or configuration error (an option, the config, a name that does not exist)"))
@config_only
@click.option("--points", is_flag=True, help="List the points in time this agent could be promoted at (its "
              "repository's snapshots: applied, pending, held, stored); needs no ZooKeeper.")
def status_cmd(inv: Invocation, points: bool) -> None:
    """Who is primary, the epoch, and every agent the group has known: up or down, last seen, role, lag.

    With agent.role = "auto" it reads the group in ZooKeeper and asks each agent's status endpoint;
    otherwise it asks the configured peers. It reports what it finds (no primary, agents down, held
    applies, maintenance) and does not fail on it: read the table, or --json for scripts."""
    from drsync.agent.status import agent_rows, collect_status, headline, local_points, refusal_lines

    if inv.config is None:
        raise UsageError("drsync status needs --config FILE (the agent's configuration)")
    if points:
        pts = local_points(inv.config)
        emit(inv, pts, lambda: (say(pts["summary"]), table(
            ["SNAPSHOT", "CAPTURED", "STORED", "KIND", "STATE", "FILES", "SIZE"],
            [[p["id"], iso(p["captured_at"]), iso(p["stored_at"]) if p.get("stored_at") else "-", p["kind"],
              p["state"], str(p["files"]), human_size(p["bytes"])]
             for p in pts["points"]])))
        return
    doc = collect_status(inv.config)
    try:
        pts = local_points(inv.config)
        doc["recovery_points"] = {"count": len(pts["points"]), "pending": pts["pending"],
                                  "oldest_captured_at": pts["points"][0]["captured_at"] if pts["points"] else None,
                                  "newest_captured_at": pts["points"][-1]["captured_at"] if pts["points"] else None,
                                  "summary": pts["summary"].split(". Promote")[0]}
    except DrsyncError:
        doc["recovery_points"] = None  # this host has no readable repository of the agent

    def human() -> None:
        say(headline(doc))
        table(["AGENT", "STATE", "ROLE", "ADDRESS", "LAST SEEN", "LAG", "APPLIED SNAPSHOT"], agent_rows(doc))
        for a in doc["agents"]:
            if a.get("state") == "down":
                say(f"agent {a['name'] or a['address']} is down: {a.get('down_reason')}")
        for line in refusal_lines(doc):
            say(line)
        m = doc.get("maintenance")
        if m:
            say(f"MAINTENANCE: agent {m['agent']} (primary of epoch {m.get('epoch')}) stopped on purpose "
                       f"since {m['since']} ({m.get('reason')}): no automatic promotion until it is back")
        waiting = [a for a in doc["agents"] if a.get("role") == "ex-primary"]
        for a in waiting:
            say(f"agent {a['name']} is an ex-primary waiting to rejoin: demote_command has not succeeded; "
                       f"once its production writers are stopped, run drsync rejoin with its config")
        for a in doc["agents"]:
            h = a.get("apply_hold")
            if h and h.get("held"):
                why = [x for x in (h.get("message"), "applies held by an operator: drsync apply --resume"
                                   if h.get("operator_hold") else None) if x]
                say(f"APPLY HELD on {a['name']}: {'; '.join(why) or 'applies are held'}")
            if h and h.get("flagged"):
                say(f"MASS CHANGE on {a['name']}: {h.get('flagged_message')}")
        if doc.get("switchover"):
            sw = doc["switchover"]
            say(f"switchover to {sw.get('to')}: {sw.get('status')}")
        if doc.get("replication"):
            say(f"replication mode (this config): {doc['replication']['summary']}")
        last = doc["last_snapshot"]
        say(f"last snapshot here: {last['id']} at {last['captured_at']}" if last else "no snapshot here yet")
        if doc.get("recovery_points"):
            say(doc["recovery_points"]["summary"] + " (drsync status --points lists them)")
        d = doc.get("last_drill")
        if d:
            say(f"last drill: #{d.get('number')} by {d.get('agent')} at {iso(d.get('started_at') or 0)}: "
                       f"{'passed' if d.get('passed') else 'FAILED'}, RPO {d.get('rpo_s')} s, RTO {d.get('rto_s')} s")
        else:
            click.echo("no drill yet (drsync drill run on a standby)")

    emit(inv, doc, human)


@click.command("history", epilog=exits(
             "0 shown (also when empty)",
             "1 ZooKeeper cannot be read",
             "2 a config whose role is not auto, or a usage error"))
@config_only
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many changes to show, newest first (0: every one kept).")
def history_cmd(inv: Invocation, limit: int) -> None:
    """Every change of primary in this group: epoch, from, to, when, why and by whom.

    Read from the group's history in ZooKeeper (the newest changes are kept); needs agent.role = "auto"."""
    from drsync.agent.history import collect_history, history_rows

    entries = collect_history(need_config(inv, "history"), limit)
    emit(inv, entries, lambda: table(["EPOCH", "WHEN", "FROM", "TO", "WHY", "BY", "DETAIL"], history_rows(entries))
         if entries else click.echo("no change of primary recorded yet (drsync promote makes the first)"))


@click.command("promote", epilog=exits(
             "0 its agent acts as primary (--dry-run: the promotion would go ahead)",
             "1 its agent is not running or did not take over within --wait",
             "2 a usage or configuration error (e.g. snapshots wait for apply_delay and no choice was given)",
             "4 refused for safety: a live primary without --force, lag or position without "
                 "--accept-data-loss, an empty data root without --promote-empty-root, fence_command failed "
                 "or the group changed while it ran"))
@config_only
@click.option("--force", is_flag=True, help="Promote although a primary's session is alive (it is stepped down) "
              "or its agent is stopped for maintenance.")
@click.option("--accept-data-loss", is_flag=True, help="Promote although this standby lacks data the group has: "
              "its lag exceeds max_lag_on_failover, another live standby has applied a newer snapshot (position "
              "check), or it has never applied a snapshot. Not for an empty data root (--promote-empty-root).")
@click.option("--no-fence", is_flag=True, help="Do not run coordination.fence_command: you stopped the old "
              "primary's production writers yourself.")
@click.option("--promote-empty-root", is_flag=True, help="Promote although this agent's data root is empty: the "
              "group's production becomes an empty tree (other agents' deletion guards hold that shipment).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to wait for the agent to confirm it acts as primary.")
@click.option("--dry-run", is_flag=True, help="Run every check and say what would happen; change nothing (exit "
              "code as the promotion would end: 0, 1, 2 or 4).")
@click.option("--to-snapshot", "to_snapshot", metavar="ID", help="Promote at this earlier snapshot of the "
              "standby's own repository (damage that replicated): it is applied first; newer ones are kept.")
@click.option("--before", metavar="TIME", help="Promote at the newest snapshot this standby stored at or before "
              "TIME (its own clock, not the capture time; ISO 8601, local time without a zone; Unix seconds; or a "
              "span ago such as 2h).")
@click.option("--apply-received", is_flag=True, help="With replication.apply_delay: apply the newest snapshot "
              "received first, then promote.")
@click.option("--delayed-state", is_flag=True, help="With replication.apply_delay: promote the root as it is; the "
              "snapshots received meanwhile stay unapplied in the repository.")
def promote_cmd(inv: Invocation, force: bool, accept_data_loss: bool, no_fence: bool, promote_empty_root: bool,
                wait_s: float, dry_run: bool, to_snapshot: str | None, before: str | None, apply_received: bool,
                delayed_state: bool) -> None:
    """Make this config's agent the primary of its group; succeeds only once its agent acts as primary.

    Exit 4 when refused for safety, 1 when its agent is not running or does not take over within
    --wait. Over an earlier primary, coordination.fence_command runs first and must succeed.
    --to-snapshot/--before promote at an earlier point (drsync status --points lists them)."""
    from drsync.agent.control import PointChoice, promote
    from drsync.agent.pointintime import parse_before

    point = PointChoice(to_snapshot=to_snapshot,
                        before=parse_before(before, time.time()) if before is not None else None,
                        apply_received=apply_received, delayed_state=delayed_state)
    doc = promote(need_config(inv, "promote"), force=force, accept_data_loss=accept_data_loss, wait_s=wait_s,
                  no_fence=no_fence, promote_empty_root=promote_empty_root, dry_run=dry_run, point=point)

    def human() -> None:
        say(doc["message"])
        for c in doc.get("checks", []):
            say(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['name']:<12} {c['detail']}")

    emit(inv, doc, human)
    if dry_run and doc.get("exit_code"):
        raise SystemExit(doc["exit_code"])


@click.command("switchover", epilog=exits(
             "0 switched over (or the request withdrawn)",
             "1 not finished within --timeout, or it failed (the primary stays)",
             "2 --to names the primary or is needed, or a usage error",
             "4 refused: no primary to hand over from, or the target is not a running standby"))
@config_only
@click.option("--to", "to", metavar="AGENT", help="The standby that becomes primary (default: this config's agent, "
              "or the only standby).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait (coordination.switchover_timeout).")
@click.option("--cancel", is_flag=True, help="Withdraw a pending switchover request.")
def switchover_cmd(inv: Invocation, to: str | None, timeout_s: float | None, cancel: bool) -> None:
    """Planned hand-over with zero data loss: final snapshot shipped and applied, then the roles swap.

    The current primary carries it out: it stops capturing, ships a final snapshot, waits until the new
    primary has applied it, then hands over the epoch; nothing is lost. Requires a live primary and the
    target to be a running standby."""
    from drsync.agent.control import switchover

    doc = switchover(need_config(inv, "switchover"), to=to, timeout_s=timeout_s, cancel=cancel)
    if cancel:
        emit(inv, doc, lambda: click.echo("switchover request withdrawn" if doc["cancelled"] else
                                          "no switchover was pending"))
        return
    emit(inv, doc, lambda: say(f"switched over from {doc['from']} to {doc['to']} at epoch {doc['epoch']} "
                                      f"(final snapshot {doc['final_snapshot']}, {doc['took_s']:.1f}s)"))


@click.command("rejoin", epilog=exits(
             "0 it reports itself a standby",
             "1 recorded, but its agent did not report itself a standby within --wait",
             "2 it is not waiting to rejoin, or a usage error",
             "4 refused: the epoch names it the primary"))
@config_only
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to wait for the running agent to report itself a standby.")
def rejoin_cmd(inv: Invocation, wait_s: float) -> None:
    """Let this ex-primary rejoin as a standby: you confirm its production writers are stopped.

    Needed when demote_command is not configured or did not succeed. Its data root is kept as a
    'before-rejoin' snapshot first, then follows the primary."""
    from drsync.agent.control import rejoin

    doc = rejoin(need_config(inv, "rejoin"), wait_s=wait_s)
    emit(inv, doc, lambda: say(doc["message"]))


@click.command("replace-identity", epilog=exits(
             "0 replaced (or nothing to replace)",
             "1 ZooKeeper cannot be written",
             "2 its agent runs, the state directory belongs to another agent, or a usage error",
             "4 refused: the name is registered live"))
@config_only
def replace_identity_cmd(inv: Invocation) -> None:
    """Make this agent the owner of its agent.name in the group, in place of the identity recorded there.

    An agent's identity is the agent id in its state directory, made at its first start; the group
    refuses another id under a name it knows (a copied config with a fresh state directory is not the
    agent). After a reinstall, or when the state directory was lost, run this once on the new host with
    the agent stopped and the old one gone for good: the group then records this state directory's id
    (and, when the epoch names this agent, lets it take its primary claim back); the old identity is
    refused from then on. Refused while the name is registered live; logged at WARNING and recorded in
    drsync history."""
    from drsync.agent.control import replace_identity

    logging.getLogger("drsync.identity").setLevel(logging.WARNING)  # on stderr, with who and what
    doc = replace_identity(need_config(inv, "replace-identity"))
    emit(inv, doc, lambda: say(doc["message"]))
