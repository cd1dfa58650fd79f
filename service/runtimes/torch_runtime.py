"""PyTorch runtime: the repository entry executed by PyTorch in the gateway process.

Where the model comes from, first match wins, all in the entry's version directory:
  1. `model.pt2`  a torch.export program (written beside `model.pt` by `--format torchscript`);
     preferred because TorchScript is deprecated and the program moves cleanly between devices.
  2. `model.pt`   TorchScript, which Triton's libtorch backend also reads.
  3. `model.safetensors`  a checkpoint (e.g. from `models.save_checkpoint`), built with the entry's
     `model_config` from config.pbtxt, so an ONNX-only entry can run on PyTorch by adding its weights.

On CUDA every batch runs under autocast (fp16 by default, bf16 on request) with SDPA limited to the
fused flash / memory-efficient / cuDNN kernels (math only as the last resort for masks they reject).
`compile="on"` wraps the module in torch.compile; `compile="cuda-graphs"` also captures CUDA graphs
("reduce-overhead"), and pads every batch to a power of two so each bucket has a handful of fixed
shapes, all captured at load rather than on the first request. On CPU the runtime is float32 and uses
`threads` intra-op threads, like ONNX Runtime (torch's thread count is process-wide).
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from export.repository import ModelEntry

PT2_FILENAME = "model.pt2"
TORCHSCRIPT_FILENAME = "model.pt"
CHECKPOINT_FILENAME = "model.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FUSED_SDPA = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Compile = Literal["off", "on", "cuda-graphs"]


@dataclass(frozen=True)
class TorchOptions:
    """How to run: `device` auto picks CUDA when available; `precision` auto is fp16 on CUDA, fp32 on CPU."""

    device: Device = "auto"
    precision: Precision = "auto"
    compile: Compile = "off"

    def resolve(self) -> tuple[torch.device, str]:
        """The device and precision to use; ValueError for combinations this machine cannot run."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("torch device 'cuda' requested but CUDA is not available; use 'auto' or 'cpu'")
        device = torch.device("cuda" if self.device != "cpu" and torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            if self.precision not in ("auto", "fp32"):
                raise ValueError(
                    f"torch precision {self.precision} needs CUDA (autocast on CPU is slower than fp32); "
                    "use 'fp32' or 'auto' on CPU"
                )
            if self.compile == "cuda-graphs":
                raise ValueError("torch compile mode 'cuda-graphs' needs CUDA; use 'on' or 'off' on CPU")
            return device, "fp32"
        return device, "fp16" if self.precision == "auto" else self.precision


def _load_pt2(path: Path, device: torch.device) -> nn.Module:
    program = torch.export.load(str(path))
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()


def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location=device)


def _load_checkpoint(path: Path, entry: ModelEntry, device: torch.device) -> nn.Module:
    from models import load_checkpoint

    return load_checkpoint(path, entry.config).to(device)


def load_module(entry: ModelEntry, device: torch.device) -> tuple[nn.Module, str]:
    """The entry's model on `device` and the file it came from (pt2, then TorchScript, then checkpoint).

    All three are in inference mode already: export traces eval-mode models and load_checkpoint
    returns one (an exported program's module even refuses .eval())."""
    folder = entry.artifact.parent
    loaders = (
        (folder / PT2_FILENAME, _load_pt2),
        (folder / TORCHSCRIPT_FILENAME, _load_torchscript),
        (folder / CHECKPOINT_FILENAME, lambda path, dev: _load_checkpoint(path, entry, dev)),
    )
    for path, loader in loaders:
        if path.exists():
            return loader(path, device), path.name
    raise FileNotFoundError(
        f"entry {entry.name} has no PyTorch model in {folder} (looked for {PT2_FILENAME}, "
        f"{TORCHSCRIPT_FILENAME} and {CHECKPOINT_FILENAME}); export it with "
        "`vitserve export --format torchscript` or save its weights there with models.save_checkpoint"
    )


def padded_batch(n: int, limit: int) -> int:
    """The captured batch size that holds `n` rows: the next power of two, capped at `limit`."""
    return min(limit, 1 << max(0, n - 1).bit_length())


class TorchRuntime:
    """One module per repository entry, executed under torch.inference_mode."""

    def __init__(self, entry: ModelEntry, threads: int, options: TorchOptions | None = None):
        self.entry = entry
        self.options = options or TorchOptions()
        self.device, self.precision = self.options.resolve()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        module, self.source = load_module(entry, self.device)
        self._module = self._compiled(module)
        self._pad = self.options.compile == "cuda-graphs"
        self._max_batch = max(1, entry.max_batch_size)
        self._warm_up()

    def _compiled(self, module: nn.Module) -> nn.Module:
        if self.options.compile == "off":
            return module
        if self.options.compile == "cuda-graphs":
            # Static shapes: one graph per padded batch size, captured in _warm_up.
            return torch.compile(module, mode="reduce-overhead", dynamic=False)
        return torch.compile(module)

    def _warm_up(self) -> None:
        """Run every shape the runtime will see (all padded sizes with CUDA graphs), so capture and
        autotuning happen at load instead of inside a request."""
        sizes = (
            {padded_batch(n, self._max_batch) for n in range(1, self._max_batch + 1)} if self._pad else {1}
        )
        for size in sorted(sizes):
            self.run(np.zeros((size, *self.entry.input_shape), dtype=np.float32))

    def _context(self) -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.device.type == "cuda":
            stack.enter_context(sdpa_kernel(FUSED_SDPA, set_priority=True))
            if self.precision != "fp32":
                stack.enter_context(torch.autocast("cuda", dtype=DTYPES[self.precision]))
        return stack

    def _inputs(self, batch: np.ndarray) -> torch.Tensor:
        """The batch on the device (no copy on CPU), zero-padded to a captured size with CUDA graphs."""
        rows = torch.from_numpy(batch)
        n = len(batch)
        size = padded_batch(n, self._max_batch) if self._pad and n <= self._max_batch else n
        if size == n:
            return rows.to(self.device)
        padded = torch.zeros((size, *batch.shape[1:]), dtype=torch.float32, device=self.device)
        padded[:n].copy_(rows)
        return padded

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        n = len(batch)
        with self._context():
            logits, embedding = self._module(self._inputs(batch))
            return {
                "logits": logits[:n].float().cpu().numpy(),
                "embedding": embedding[:n].float().cpu().numpy(),
            }

    def describe(self) -> str:
        compiled = "" if self.options.compile == "off" else f", compile={self.options.compile}"
        return f"torch {torch.__version__} ({self.device.type}, {self.precision}, {self.source}{compiled})"
