"""`slmforge …`: one command per flow. Settings come from the same pydantic models the flows take."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from slmforge.config import ConfigError, describe_options, load_config

EXIT_BAD_INPUT = 2


def _options_help(model=None) -> str:
    lines = ["settings (--set KEY=VALUE, or the same keys nested in --config YAML):"]
    for key, default, desc in (describe_options(model) if model is not None else describe_options()):
        lines.append(f"  {key} (default {default})")
        if desc:
            lines += textwrap.wrap(desc, width=88, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slmforge", description="Choose, compare, quantize and QLoRA-fine-tune small LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    ft = sub.add_parser(
        "finetune",
        help="run the finetune flow (prepare → 4-bit base → QLoRA → merge → evaluate → publish)",
        description="Run the finetune flow. With no options: bundled SmolLM2-135M, bundled Korean Q&A, "
                    "local store under ./.slmforge/store, no network.",
        epilog=_options_help() + "\n\nexample:\n  slmforge finetune --set train.max_steps=20 --set data.source=qa.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ft.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the settings below")
    ft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting (repeatable), e.g. --set train.epochs=2")
    ft.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    from slmforge.compare_config import CompareConfig

    cmp = sub.add_parser(
        "compare",
        help="compare models × precisions (bf16/8-bit/4-bit) on quality, memory and speed",
        description="Run the compare flow. With no options: bundled SmolLM2-135M and Gemma-3-270M (skipped with "
                    "its error if its package is not installed) and the latest fine-tuned model in the store, "
                    "each in bf16, 8-bit and 4-bit NF4, on the bundled Korean Q&A test split; no network.",
        epilog=_options_help(CompareConfig) + "\n\nexample:\n  slmforge compare --set 'models=[smollm2-135m-instruct, "
               "./my-model]' --set 'modes=[bf16, 4bit]' --set eval.items=32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmp.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the settings below")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one setting (repeatable), e.g. --set modes=[bf16,4bit]")
    cmp.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    gc = sub.add_parser(
        "gc", help="remove from the store what the retention settings do not keep (--dry-run to see first)",
        description="Keep the outputs of the last retention.keep_last_runs finetune runs and of a run still going, "
                    "the published entries (retention.keep_published) with what they were made from, and anything "
                    "younger than retention.min_age_hours; remove the rest from storage.url, with the Prefect cache "
                    "records that point at it. Each finetune run does this at its end (retention.after_run).",
        epilog="example:\n  slmforge gc --dry-run --set retention.keep_last_runs=2 --set storage.url=s3://bucket/slmforge",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gc.add_argument("--config", metavar="FILE.yaml", help="YAML file with the finetune settings (storage, retention)")
    gc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting (repeatable), e.g. --set retention.keep_last_runs=3")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed and remove nothing")
    gc.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    rec = sub.add_parser("recommend", help="suggest models for a memory budget and use case (the tutorial's §9)")
    rec.add_argument("--memory-gb", type=float, required=True, help="GPU (or CPU) memory available, in GB")
    rec.add_argument("--use-case", default="general",
                     help="general, chat, coding, math, reasoning, multilingual, edge, function-calling")
    rec.add_argument("--finetune", action="store_true", help="also require that QLoRA training fits")
    rec.add_argument("--korean", action="store_true", help="only models whose card lists Korean")
    rec.add_argument("--context", type=int, default=2048, help="context length for the KV-cache estimate")
    _add_stack_commands(sub)
    return p


def _add_stack_commands(sub) -> None:
    state_help = "where the stack keeps its database, bucket, logs and pids (default <project>/.slmforge/stack, or SLMFORGE_STACK_DIR)"
    up = sub.add_parser(
        "up", help="start the local service stack: Prefect server + UI, SeaweedFS S3, work pool, deployments, worker",
        description="Start on 127.0.0.1 a Prefect server (SQLite, UI on --port), SeaweedFS S3 with a bucket, create the "
                    "`gpu` and `control` work pools, the `gpu` concurrency limit, the blocks, the deployments finetune/nightly, "
                    "compare/on-demand and compare-model/fan-out and the failure notification, and start the workers. Running it again starts only "
                    "what is not running and re-applies the configuration.")
    up.add_argument("--state-dir", default=None, help=state_help)
    up.add_argument("--port", type=int, default=4200, help="Prefect API and UI port (default 4200)")
    up.add_argument("--s3-port", type=int, default=8333,
                    help="SeaweedFS S3 port (default 8333); it also uses the next eight and S3_PORT+10008")
    up.add_argument("--bucket", default="slmforge", help="the bucket for artifacts and task results")
    up.add_argument("--cron", default="0 2 * * *", help="schedule of finetune/nightly (default 02:00)")
    up.add_argument("--timezone", default="UTC", help="time zone of the schedule, e.g. Asia/Seoul (default UTC)")
    up.add_argument("--nightly-config", metavar="FILE.yaml",
                    help="finetune settings the nightly runs with (YAML, as `slmforge finetune --config`)")
    up.add_argument("--nightly-set", dest="nightly_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="one finetune setting of the nightly runs (repeatable), e.g. --nightly-set train.epochs=3; "
                         "these become the deployment's default parameters (scheduled runs, the UI's Run button)")
    up.add_argument("--workers", type=int, default=None,
                    help="workers on the gpu pool, one flow run each at a time (default: as the running stack has "
                         "them, else 1); a comparison runs its "
                         "models on all of them at once (here they share this machine's CPU or GPU)")
    up.add_argument("--webhook-url", default=os.environ.get("SLMFORGE_WEBHOOK_URL"),
                    help="post failed or crashed nightly runs here (default SLMFORGE_WEBHOOK_URL; none: no notifications)")
    down = sub.add_parser("down", help="stop exactly what `slmforge up` started; the data is kept",
                          description="Stop the worker, the Prefect server and SeaweedFS started by `slmforge up` "
                                      "(by pid, with whatever they started). The database, bucket and logs are kept.")
    down.add_argument("--state-dir", default=None, help=state_help)


def _stack_settings(args):
    from deployments.stack import DEFAULT_STATE_DIR, StackSettings

    state_dir = args.state_dir or os.environ.get("SLMFORGE_STACK_DIR") or DEFAULT_STATE_DIR
    if args.command == "down":
        return StackSettings(state_dir=state_dir)
    return StackSettings(state_dir=state_dir, port=args.port, s3_port=args.s3_port, bucket=args.bucket,
                         cron=args.cron, timezone=args.timezone, webhook_url=args.webhook_url or None,
                         nightly_config=args.nightly_config, nightly_overrides=tuple(args.nightly_overrides),
                         workers=args.workers)


def cmd_up(args) -> int:
    from deployments.stack import StackError, how_to_use, up

    from deployments.deploy import nightly_settings

    if getattr(args, "workers", None) is not None and args.workers < 1:
        return _fail(f"--workers {args.workers}: must be 1 or more")
    settings = _stack_settings(args)
    try:  # a bad nightly setting fails before anything starts
        nightly_settings(settings.nightly_config, settings.nightly_overrides)
    except ConfigError as e:
        return _fail(str(e))
    try:
        state = up(settings)
    except StackError as e:
        print(f"error: {e}\n(`slmforge down` stops whatever did start)", file=sys.stderr)
        return 1
    print(how_to_use(settings, state))
    return 0


def cmd_down(args) -> int:
    from deployments.stack import StackError, down

    try:
        down(_stack_settings(args))
    except StackError as e:
        return _fail(str(e))
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _load_or_print(load, args):
    """(config, None) to go on, or (None, exit status): the config is invalid, or --print-config printed it."""
    import yaml

    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        return None, _fail(str(e))
    if args.print_config:
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True))
        return None, 0
    return cfg, None


def cmd_finetune(args) -> int:
    from slmforge.data import DataError
    from slmforge.modeling import ModelSourceError
    from slmforge.storage import ArtifactStore, StoreError

    cfg, status = _load_or_print(load_config, args)
    if cfg is None:
        return status
    # Fail in seconds, before Prefect starts or any weights load.
    from tasks.dataset import gate_metric, validate_data
    from tasks.validate import check_inputs

    try:
        store = ArtifactStore.from_config(cfg.storage)
        store.check_writable()
        splits, _ = validate_data(cfg.data, store)  # bad data fails in seconds, before the model config is read
        gate_metric(splits, cfg.eval.primary_metric, cfg.data.source)  # a metric the data cannot yield
        check_inputs(cfg, store_checked=True)
    except (ConfigError, DataError, ModelSourceError, StoreError) as e:
        return _fail(str(e))

    from flows.finetune import finetune
    from slmforge.report import markdown_table
    from tasks.retry import DeviceUnusable

    try:
        out = finetune(cfg)
    except (ConfigError, DataError, ModelSourceError, StoreError, DeviceUnusable) as e:
        return _fail(str(e))
    print("\nWhere everything went:")
    for name in ("dataset", "base", "quantized", "adapter", "merged", "report"):
        print(f"  {name:10s} {out[name]}")
    print(f"\nBefore/after on the held-out split ({out['report']}/report.md):\n")
    print(markdown_table(out["table"]))
    pub = out["publish"]
    print("\n" + (f"Published: {pub['location']}" if pub["published"] else pub["reason"]))
    print(out["nightly"])
    return 0


def cmd_gc(args) -> int:
    from slmforge.retention import collect
    from slmforge.storage import ArtifactStore, StoreError

    cfg, status = _load_or_print(load_config, args)
    if cfg is None:
        return status
    r = cfg.retention
    try:
        collect(ArtifactStore.from_config(cfg.storage), r.keep_last_runs, r.keep_published, r.min_age_hours,
                dry_run=args.dry_run)
    except StoreError as e:
        return _fail(str(e))
    return 0


def cmd_compare(args) -> int:
    from slmforge.compare_config import load_compare_config
    from slmforge.data import DataError
    from slmforge.storage import ArtifactStore, StoreError

    cfg, status = _load_or_print(load_compare_config, args)
    if cfg is None:
        return status
    # Fail in seconds, before Prefect starts or any weights load; a bad model source is a row, not a failure.
    from tasks.dataset import validate_data

    try:
        store = ArtifactStore.from_config(cfg.storage)
        store.check_writable()
        validate_data(cfg.data.model_copy(update={"test_limit": None}), store)
    except (ConfigError, DataError, StoreError) as e:
        return _fail(str(e))

    from flows.compare import compare
    from slmforge.report import markdown_table
    from tasks.retry import DeviceUnusable

    try:
        out = compare(cfg)
    except (ConfigError, DataError, StoreError, DeviceUnusable) as e:
        return _fail(str(e))
    print(f"\nComparison ({out['wall_s'] / 60:.1f} min): {out['report']}\n")
    print(markdown_table(out["table"]))
    print(f"\nCSV, JSON and chart: {out['uri']}/results.csv, results.json, quality_vs_memory.png")
    return 0 if any(r["status"] in ("ok", "partial") for r in out["rows"]) else 1


def cmd_recommend(args) -> int:
    from slmforge.selection import format_recommendations, recommend

    left_out: list[str] = []
    try:
        cands = recommend(args.memory_gb, args.use_case, finetune=args.finetune, korean=args.korean,
                          context=args.context, left_out=left_out)
    except ValueError as e:
        return _fail(str(e))
    print(format_recommendations(cands, memory_gb=args.memory_gb, use_case=args.use_case, left_out=left_out))
    return 0 if cands else 1


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect's ephemeral API server gets 20 s to start; its first start on a fresh machine (creating
    # and migrating ~/.prefect's database) took longer on a busy 2-core CPU and failed the run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = _parser().parse_args(argv)
    return {"finetune": cmd_finetune, "compare": cmd_compare, "recommend": cmd_recommend, "gc": cmd_gc,
            "up": cmd_up, "down": cmd_down}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
