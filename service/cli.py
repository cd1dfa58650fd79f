"""`vitserve` command line: export, serve, route.

Flags default to the `VITSERVE_*` environment (see service.settings.Settings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.settings import Settings


def _buckets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"buckets must be comma-separated integers, got {text!r}") from exc


def _add_export(sub: argparse._SubParsersAction, settings: Settings) -> None:
    p = sub.add_parser("export", help="export a model into the model repository (one entry per bucket)")
    p.add_argument("--model", required=True, help="registered model name (see `vitserve models`)")
    p.add_argument("--checkpoint", type=Path, help="Hugging Face folder, .safetensors or .bin weights")
    p.add_argument("--buckets", type=_buckets, default=(), help="comma-separated square input sizes")
    p.add_argument("--format", dest="artifact_format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument("--repository", type=Path, default=settings.repository, help="env VITSERVE_REPOSITORY")
    p.add_argument("--name", help="backbone name in the repository (entries are NAME_BUCKET); default: --model")
    p.add_argument("--max-batch-size", type=int, help="config.pbtxt max_batch_size (default: by bucket)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--unfused", action="store_true", help="opset-18 graph with plain MatMul/Softmax attention")


def _run_export(args: argparse.Namespace) -> int:
    from export import ExportError, ExportRequest, export_model

    request = ExportRequest(
        model=args.model,
        repository=args.repository,
        buckets=args.buckets,
        checkpoint=args.checkpoint,
        artifact_format=args.artifact_format,
        precision=args.precision,
        name=args.name,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        fused=not args.unfused,
    )
    try:
        entries = export_model(request)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for entry in entries:
        print(f"wrote {entry.path}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered model names")
    p.add_argument("pattern", nargs="?", default="*")


def _run_models(args: argparse.Namespace) -> int:
    from models import list_models

    print("\n".join(list_models(args.pattern)))
    return 0


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    settings = settings or Settings()
    parser = argparse.ArgumentParser(prog="vitserve", description="Resolution-aware Vision Transformer serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub, settings)
    _add_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"export": _run_export, "models": _run_models}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
