"""`vitserve` command line: export, serve, route.

Flags default to the `VITSERVE_*` environment (see service.settings.Settings).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from service.settings import Settings


def _buckets(text: str) -> tuple:
    from export.shapes import parse_shape

    try:
        return tuple(parse_shape(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"buckets must be comma-separated sides or HEIGHTxWIDTH shapes (224,192x256), got {text!r}"
        ) from exc


def _sides(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"ladder sides must be comma-separated integers, got {text!r}"
        ) from exc


def _override(text: str) -> tuple[str, object]:
    import yaml

    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"--set takes FIELD=VALUE, got {text!r}")
    return field.strip(), yaml.safe_load(value)


def _add_export(sub: argparse._SubParsersAction, settings: Settings) -> None:
    p = sub.add_parser("export", help="export a model into the model repository (one entry per bucket)")
    p.add_argument("--model", required=True, help="registered model name (see `vitserve models`)")
    p.add_argument("--checkpoint", type=Path, help="Hugging Face folder, .safetensors or .bin weights")
    p.add_argument(
        "--buckets",
        type=_buckets,
        default=(),
        help="comma-separated input shapes: a side for a square (224) or HEIGHTxWIDTH (192x256)",
    )
    p.add_argument(
        "--ladder",
        type=_sides,
        default=(),
        help="comma-separated sides; each adds one shape per aspect class (1:3 .. 3:1) of about side^2 pixels",
    )
    p.add_argument("--format", dest="artifact_format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument(
        "--instance-kind",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where Triton runs the entry, whatever the precision (auto: a GPU if the server has one)",
    )
    p.add_argument("--repository", type=Path, default=settings.repository, help="env VITSERVE_REPOSITORY")
    p.add_argument(
        "--name", help="backbone name in the repository (entries are NAME_BUCKET); default: --model"
    )
    p.add_argument("--max-batch-size", type=int, help="config.pbtxt max_batch_size (default: by bucket)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument(
        "--unfused", action="store_true", help="opset-18 graph with plain MatMul/Softmax attention"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_override,
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field of --model (YAML value, e.g. depth=6 or depths=[2,2,6,2]); repeatable",
    )


def export_request(args: argparse.Namespace):
    """The ExportRequest of parsed `vitserve export` arguments (also how tests read the Dockerfile's exports)."""
    from export import ExportRequest

    return ExportRequest(
        model=args.model,
        repository=args.repository,
        buckets=args.buckets,
        ladders=args.ladder,
        checkpoint=args.checkpoint,
        artifact_format=args.artifact_format,
        precision=args.precision,
        instance_kind=args.instance_kind,
        name=args.name,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        fused=not args.unfused,
        overrides=dict(args.overrides),
    )


def _run_export(args: argparse.Namespace) -> int:
    from export import ExportError, export_model

    try:
        entries = export_model(export_request(args))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for entry in entries:
        print(f"wrote {entry.path}")
    # The exporter leaves millions of objects (FX graphs, sympy expressions) for the interpreter's
    # collections at exit: 2.5 s of the quick start's critical path. Frozen, exit skips them.
    gc.freeze()
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered model names")
    p.add_argument("pattern", nargs="?", default="*")


def _run_models(args: argparse.Namespace) -> int:
    from models import list_models

    print("\n".join(list_models(args.pattern)))
    return 0


def _add_settings_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """One flag per Settings field, documented with its environment variable and default."""
    for name in names:
        field = Settings.model_fields[name]
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"{field.description} [env VITSERVE_{name.upper()}, default {field.get_default(call_default_factory=True)}]",
        )


def _settings_from(args: argparse.Namespace, names) -> Settings:
    return Settings(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


SERVE_FLAGS = tuple(Settings.model_fields)
ROUTE_FLAGS = ("repository", "routing", "routing_policy", "target_latency_ms", "calibration")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model repository over HTTP",
        description="Serve the model repository. Every flag can also be set with its VITSERVE_* variable.",
    )
    _add_settings_flags(p, SERVE_FLAGS)


def _run_serve(args: argparse.Namespace) -> int:
    from service.server import serve

    serve(_settings_from(args, SERVE_FLAGS))
    return 0


def _add_route(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "route",
        help="print the routing decision for an image size, like GET /v1/route on idle queues "
        "(costs from --calibration, else estimated from FLOPs)",
    )
    p.add_argument("width", type=int)
    p.add_argument("height", type=int)
    p.add_argument("--budget-ms", type=float, help="latency budget (default --target-latency-ms)")
    p.add_argument("--detail", choices=("auto", "full"), default="auto")
    _add_settings_flags(p, ROUTE_FLAGS)


def _run_route(args: argparse.Namespace) -> int:
    import json

    from export import ExportError, read_repository
    from service.calibration import read_calibration
    from service.state import StartupError, build_router

    settings = _settings_from(args, ROUTE_FLAGS)
    try:
        costs = read_calibration(settings.calibration) if settings.calibration is not None else None
        router = build_router(read_repository(settings.repository), settings, costs)
        route = router.route(
            args.height, args.width, budget_ms=args.budget_ms, full_detail=args.detail == "full"
        )
    except (ExportError, StartupError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(route.to_dict(), indent=2))
    return 0


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    settings = settings or Settings()
    parser = argparse.ArgumentParser(
        prog="vitserve", description="Resolution-aware Vision Transformer serving"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub, settings)
    _add_serve(sub)
    _add_route(sub)
    _add_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"export": _run_export, "serve": _run_serve, "route": _run_route, "models": _run_models}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
