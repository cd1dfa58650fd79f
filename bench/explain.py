"""What an explanation costs: POST /v1/explain's ONNX Runtime work against serving the same image.

For each default backbone at a bucket, the entry is exported once and timed in two ways, batch 1,
in one run: the serving session (`OnnxRuntime.run`, what /v1/classify executes) and the
explanation (`EntryExplainer.explain`: the instrumented graph returning every layer's attention
probabilities, plus the rollout in numpy). The ratio is the price of a heat map.

Writes explain.json/.csv/.png.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.backends import export_entry, random_batch
from bench.machine import machine_info
from bench.plots import explain_bars
from bench.results import write_results
from bench.timing import STATISTIC, TimingPlan, add_run_arguments, noise, time_cells
from service.explainer import EntryExplainer
from service.runtimes.ort import OnnxRuntime

CELLS = (("vit_tiny_patch16_224", 224), ("vit_tiny_patch16_224", 384), ("swin_tiny_patch4_window7_224", 448))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, rounds=4, seconds=4.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    machine = machine_info("bench.explain")
    plan = TimingPlan(rounds=args.rounds, seconds=args.seconds)
    with tempfile.TemporaryDirectory(prefix="vitserve-bench-") as tmp:
        cells, entries = {}, {}
        for model, bucket in CELLS:
            entry = export_entry(model, Path(tmp) / f"{model}-{bucket}", bucket)
            pixels = random_batch(1, bucket)
            serving = OnnxRuntime(entry, args.threads)
            explainer = EntryExplainer(entry, args.threads)
            content = (bucket, bucket)
            cells[(model, bucket, "serve")] = lambda s=serving, p=pixels: s.run(p)
            cells[(model, bucket, "explain")] = lambda e=explainer, p=pixels[0], c=content: e.explain(p, c)
            entries[(model, bucket)] = entry
        timings = time_cells(cells, plan)
    rows = []
    for (model, bucket), entry in entries.items():
        serve, explain = timings[(model, bucket, "serve")], timings[(model, bucket, "explain")]
        rows.append(
            {
                "model": model,
                "bucket": bucket,
                "layers": len(entry.config.attention_kinds),
                "serve_ms_p50": round(serve.median * 1e3, 3),
                "explain_ms_p50": round(explain.median * 1e3, 3),
                "explain_vs_serve": round(explain.median / serve.median, 3),
                **{f"serve_{k}": v for k, v in serve.summary(1).items() if k != "ms_p50"},
                **{f"explain_{k}": v for k, v in explain.summary(1).items() if k != "ms_p50"},
            }
        )
    ratios = {f"{r['model']}@{r['bucket']}": r["explain_vs_serve"] for r in rows}
    summary = {
        "statistic": STATISTIC,
        "explain_vs_serve": ratios,
        **noise([t.summary(1) for t in timings.values()]),
    }
    settings = {"threads": args.threads, "rounds": args.rounds, "seconds": args.seconds, "batch": 1}
    paths = write_results("explain", machine, settings, rows, summary, args.output_dir)
    explain_bars(rows, args.output_dir / "explain.png")
    for row in rows:
        print(
            f"{row['model']} @ {row['bucket']}: serve {row['serve_ms_p50']} ms, explain {row['explain_ms_p50']} ms "
            f"({row['explain_vs_serve']}x)"
        )
    print("wrote", *paths, args.output_dir / "explain.png")


if __name__ == "__main__":
    main()
