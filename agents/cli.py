"""``tokenmill-agent``: enroll | run | once | requeue | status | selftest.

Imports are lazy: ``status`` never loads NVML or the Prometheus parser, ``run`` loads only what it uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agents import __version__
from agents import config as config_mod

log = logging.getLogger("agents")


def _global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", default=default, metavar="PATH",
                        help=f"TOML configuration (default {config_mod.DEFAULT_CONFIG_PATH}; absent is fine)")
    parser.add_argument("--simulate", type=int, default=default, metavar="N", help="simulate N GPUs (and engines)")
    parser.add_argument("--log-level", default=argparse.SUPPRESS if suppress else "INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (stderr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill-agent", description="Tokenmill GPU node agent")
    parser.add_argument("--version", action="version", version=f"tokenmill-agent {__version__}")
    _global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    enroll = sub.add_parser("enroll", help="exchange a one-time enrollment token for this node's credential")
    enroll.add_argument("--portal", help="portal URL (default: portal_url from the config)")
    enroll.add_argument("--token", required=True, help="one-time enrollment token")
    _global_flags(enroll, suppress=True)
    run = sub.add_parser("run", help="run the daemon (SIGTERM/SIGINT stop it after spooling the current batch)")
    _global_flags(run, suppress=True)
    once = sub.add_parser("once", help="collect one short interval; nothing is sent or spooled")
    once.add_argument("--print", dest="print_json", action="store_true", help="print the batch as JSON")
    _global_flags(once, suppress=True)
    requeue = sub.add_parser("requeue", help="send quarantined batches again (under their own seq)")
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every quarantined batch")
    which.add_argument("seqs", nargs="*", type=int, default=[], metavar="SEQ", help="these batches")
    _global_flags(requeue, suppress=True)
    status = sub.add_parser("status", help="credential, spool, quarantine and sender state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _global_flags(status, suppress=True)
    selftest = sub.add_parser("selftest", help="NVML acceptance check of every GPU (exit 0 ok, "
                                               "1 failed, 2 no NVML); no credential, no portal")
    selftest.add_argument("--json", action="store_true", help="one JSON object on stdout")
    selftest.add_argument("--xid-wait-s", type=_xid_wait, default=2.0, metavar="S",
                          help="how long to wait for critical XID events (default 2.0)")
    _global_flags(selftest, suppress=True)
    return parser


def _xid_wait(text: str) -> float:
    from agents.selftest import MAX_XID_WAIT_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= MAX_XID_WAIT_S:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_XID_WAIT_S:g} seconds")
    return value


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, simulate=args.simulate)


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, value.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def cmd_enroll(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    import urllib.error
    import urllib.request

    from agents.daemon import Agent

    portal = (args.portal or cfg.portal_url).rstrip("/")
    agent = Agent(cfg)
    agent.start_nvml()
    host = agent.host()
    agent.close()
    body = json.dumps({"token": args.token, "host": host}).encode()
    req = urllib.request.Request(portal + "/api/v1/agent/enroll", data=body, method="POST",  # noqa: S310
                                 headers={"Content-Type": "application/json", "User-Agent": "tokenmill-agent"})
    try:
        with urllib.request.urlopen(req, timeout=cfg.send_timeout_s) as resp:  # noqa: S310
            reply = json.loads(resp.read(1024 * 1024))
    except urllib.error.HTTPError as exc:
        detail = exc.read(1000).decode("utf-8", "replace") if exc.fp else ""
        print(f"enrollment refused: HTTP {exc.code} {detail}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"enrollment failed: {exc}", file=sys.stderr)
        return 1
    credential = reply.get("credential") if isinstance(reply, dict) else None
    if not isinstance(credential, str) or not credential:
        print("enrollment failed: the portal's reply has no credential", file=sys.stderr)
        return 1
    _write_secret(cfg.credential_path, credential)
    if isinstance(reply.get("config"), dict) and config_mod.portal_config_ok(reply["config"]):
        config_mod.persist_applied(cfg.state_dir, reply["config"])
    (cfg.state_dir / "node.json").write_text(json.dumps({"node_id": reply.get("node_id"), "portal_url": portal,
                                                         "enrolled_at": time.time()}))
    print(f"enrolled as node {reply.get('node_id')}; credential stored in {cfg.credential_path} (0600)")
    return 0


def cmd_run(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from agents.daemon import run

    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return run(cfg, stop)


def _spool_state(cfg: config_mod.Config) -> tuple[dict[str, Any], int]:
    from agents.spool import Spool

    if not cfg.spool_path.exists():
        return {}, 1
    spool = Spool(cfg.spool_path, readonly=True)
    try:
        return spool.load_state(), spool.next_seq()
    finally:
        spool.close()


def cmd_once(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from agents.daemon import Agent

    try:
        state, seq = _spool_state(cfg)
    except Exception as exc:  # unreadable state: deltas start from a baseline
        log.warning("cannot read state from %s: %s", cfg.spool_path, exc)
        state, seq = {}, 1
    agent = Agent(cfg, state=state)
    try:
        batch = agent.once(seq)
    finally:
        agent.close()
    if args.print_json:
        json.dump(batch, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        print(f"{len(batch['gpus'])} GPU(s), {len(batch['engines'])} engine record(s), {len(batch['events'])} event(s)")
        for g in batch["gpus"]:
            print(f"  GPU {g['index']} {g['name']} {g['uuid']}: util {g['util_mean']}%, power {g['power_mean_w']} W, "
                  f"memory {g['memory_used_mib']}/{g['memory_total_mib']} MiB")
        for e in batch["engines"]:
            print(f"  {e['engine']} {e['endpoint']} {e['model']}: up={e['up']} version={e['version']}")
    return 0


def cmd_requeue(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from agents.spool import Spool

    if not cfg.spool_path.exists():
        print("no spool: nothing is quarantined")
        return 0
    spool = Spool(cfg.spool_path, cfg.spool_max_bytes)
    try:
        moved = spool.requeue(None if args.all else args.seqs)
    finally:
        spool.close()
    missing = sorted(set(args.seqs) - set(moved))
    print(f"{len(moved)} batch(es) queued again: {', '.join(map(str, moved)) or 'none'}")
    if missing:
        print(f"not in quarantine: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    return 0


def status_dict(cfg: config_mod.Config) -> dict[str, Any]:
    from agents.spool import Spool

    out: dict[str, Any] = {
        "state_dir": str(cfg.state_dir),
        "portal_url": cfg.portal_url,
        "credential_present": cfg.credential_path.is_file(),
        "config_version": cfg.config_version,
        "interval_s": cfg.interval_s,
        "targets": len(cfg.targets),
        "simulated": cfg.simulate is not None,
    }
    if cfg.spool_path.exists():
        spool = Spool(cfg.spool_path, readonly=True)
        try:
            out.update(spool.stats())
        finally:
            spool.close()
    else:
        out.update(spool_depth=0, spool_bytes=0, spool_oldest_age_s=None, quarantined=0, quarantined_tokens=0,
                   credential_rejected_since=None, unbillable_endpoints=[], dropped_total=0, dropped_unreported=0,
                   next_seq=1, last_send=None, last_send_age_s=None, last_error=None, last_error_at=None)
    return out


def cmd_status(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    st = status_dict(cfg)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0

    def fmt_ts(ts: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "never"

    print(f"state dir:        {st['state_dir']}")
    print(f"portal:           {st['portal_url']} (config v{st['config_version']}, {st['targets']} target(s))")
    credential = "present" if st["credential_present"] else "MISSING (run enroll)"
    if st["credential_rejected_since"]:
        credential += f", REJECTED by the portal since {fmt_ts(st['credential_rejected_since'])} (batches kept)"
    print(f"credential:       {credential}")
    age = f", oldest {st['spool_oldest_age_s']} s old" if st["spool_oldest_age_s"] is not None else ""
    print(f"spool:            {st['spool_depth']} batch(es), {st['spool_bytes']} bytes{age}")
    print(f"quarantined:      {st['quarantined']} batch(es), {st['quarantined_tokens']} tokens"
          + (" (tokenmill-agent requeue --all sends them again)" if st["quarantined"] else ""))
    for url in st["unbillable_endpoints"]:
        print(f"UNBILLABLE:       {url} answers but exposes no token counters the agent knows")
    print(f"dropped (full):   {st['dropped_total']} ({st['dropped_unreported']} not yet reported)")
    print(f"next seq:         {st['next_seq']}")
    print(f"last send:        {fmt_ts(st['last_send'])}")
    print(f"last error:       {st['last_error'] or 'none'}" + (f" at {fmt_ts(st['last_error_at'])}"
                                                               if st["last_error"] else ""))
    return 0


def cmd_selftest(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from agents.selftest import format_text, run_selftest

    report, code = run_selftest(cfg, xid_wait_s=args.xid_wait_s)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(format_text(report)))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = _load(args)
    except config_mod.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    handlers = {"enroll": cmd_enroll, "run": cmd_run, "once": cmd_once, "requeue": cmd_requeue,
                "status": cmd_status, "selftest": cmd_selftest}
    return handlers[args.command](args, cfg)


if __name__ == "__main__":
    sys.exit(main())
