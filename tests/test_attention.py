"""Every attention variant against a naive reference written here, token by token, in float64.

The references build windows, grids and neighbourhoods from coordinates and compute
softmax(Q K^T / sqrt(d) + bias) V explicitly; they share only the learned weights (qkv, proj,
relative position table) with the modules, never their partition, mask or rotation helpers.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.layers.attention import build_attention
from models.layers.pos_embed import RotaryEmbedding2D

DIM = 16
HEADS = 2
BATCH = 2
ROPE_THETA = 100.0
SHIFT_MASK = -100.0
ATOL = 1e-8


def make_attention(kind: str, **kwargs: object) -> nn.Module:
    """A float64 module with a relative position table large enough to change the result noticeably."""
    torch.manual_seed(0)
    attn = build_attention(kind, DIM, HEADS, **kwargs).double()
    bias = getattr(attn, "relative_position_bias", None)
    if bias is not None:
        with torch.no_grad():
            bias.relative_position_bias_table.normal_()
    return attn


def tokens(grid: tuple[int, int], prefix: int = 0) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(BATCH, prefix + grid[0] * grid[1], DIM, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ references


def project(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, N, head_dim): the fused projection's output is [q | k | v], each [head0 | head1 ...]."""
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    head_dim = DIM // attn.num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t[..., h * head_dim : (h + 1) * head_dim] for h in range(attn.num_heads)], dim=1)

    return heads(qkv[..., :DIM]), heads(qkv[..., DIM : 2 * DIM]), heads(qkv[..., 2 * DIM :])


def merge(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) -> output projection of the concatenated heads (B, N, C)."""
    merged = torch.cat([out[:, h] for h in range(out.shape[1])], dim=-1)
    return merged @ attn.proj.weight.T + attn.proj.bias


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | float = 0.0
) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def rotate_2d(t: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """2D RoPE as RotaryEmbedding2D defines it, pair by pair.

    With head dim d and q = d/4 frequencies theta^(-j/q): channel pair (j, j + d/2) turns by row * freq_j
    and pair (q + j, q + j + d/2) by column * freq_j. Prefix tokens are left alone.
    """
    out = t.clone()
    head_dim = t.shape[-1]
    quarter, half = head_dim // 4, head_dim // 2
    for n in range(grid[0] * grid[1]):
        row, col = divmod(n, grid[1])
        for j in range(quarter):
            freq = ROPE_THETA ** (-j / quarter)
            for a, position in ((j, row), (quarter + j, col)):
                b = a + half
                cos, sin = math.cos(position * freq), math.sin(position * freq)
                x_a, x_b = t[..., prefix + n, a], t[..., prefix + n, b]
                out[..., prefix + n, a] = x_a * cos - x_b * sin
                out[..., prefix + n, b] = x_b * cos + x_a * sin
    return out


def reference_global(attn: nn.Module, x: torch.Tensor, grid: tuple[int, int], prefix: int, rope: bool):
    q, k, v = project(attn, x)
    if rope:
        q, k = rotate_2d(q, grid, prefix), rotate_2d(k, grid, prefix)
    return merge(attn, softmax_attention(q, k, v))


def relative_bias(attn: nn.Module, size: int) -> torch.Tensor:
    """(heads, P*P, P*P): table row (dy + P - 1) * (2P - 1) + (dx + P - 1), offsets query minus key."""
    table = attn.relative_position_bias.relative_position_bias_table
    area = size * size
    bias = torch.empty(table.shape[1], area, area, dtype=table.dtype)
    for a in range(area):
        ya, xa = divmod(a, size)
        for b in range(area):
            yb, xb = divmod(b, size)
            bias[:, a, b] = table[(ya - yb + size - 1) * (2 * size - 1) + (xa - xb + size - 1)]
    return bias


def region(position: int, length: int, size: int, shift: int) -> int:
    """Swin's region id along one axis of the rolled, padded map."""
    if position < length - size:
        return 0
    return 1 if position < length - shift else 2


def group_positions(height: int, width: int, size: int, mode: str) -> list[list[tuple[int, int]]]:
    """Token coordinates of each partition, members in row-major (i, j) order.

    `window`: the contiguous block (wy*P + i, wx*P + j). `grid`: the lattice (gy + i*H/P, gx + j*W/P).
    """
    groups = []
    if mode == "window":
        for wy in range(height // size):
            for wx in range(width // size):
                groups.append([(wy * size + i, wx * size + j) for i in range(size) for j in range(size)])
    else:
        step_y, step_x = height // size, width // size
        for gy in range(step_y):
            for gx in range(step_x):
                groups.append([(gy + i * step_y, gx + j * step_x) for i in range(size) for j in range(size)])
    return groups


def reference_partitioned(
    attn: nn.Module, x: torch.Tensor, grid: tuple[int, int], size: int, shift: int, mode: str
) -> torch.Tensor:
    """Zero-pad to a multiple of P, roll by -shift (only when the grid exceeds one window), attend inside
    each partition with relative bias and the -100 seam mask, roll back and crop. Grid partitions
    never attend to padding (it sits among real tokens); windows do, as the reference Swin does."""
    batch, _, channels = x.shape
    height, width = grid
    padded_h, padded_w = math.ceil(height / size) * size, math.ceil(width / size) * size
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = x.reshape(batch, height, width, channels)
    shift = shift if min(height, width) > size else 0
    rolled = torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2))
    bias = relative_bias(attn, size)
    out = torch.empty_like(rolled)
    for positions in group_positions(padded_h, padded_w, size, mode):
        ys = [row for row, _ in positions]
        xs = [col for _, col in positions]
        mask = torch.zeros(len(positions), len(positions), dtype=x.dtype)
        if shift:
            ids = [(region(r, padded_h, size, shift), region(c, padded_w, size, shift)) for r, c in positions]
            for a in range(len(ids)):
                for b in range(len(ids)):
                    if ids[a] != ids[b]:
                        mask[a, b] = SHIFT_MASK
        if mode == "grid":
            for b, (row, col) in enumerate(positions):
                if row >= height or col >= width:
                    mask[:, b] = -math.inf
        q, k, v = project(attn, rolled[:, ys, xs])
        out[:, ys, xs] = merge(attn, softmax_attention(q, k, v, bias + mask))
    out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :height, :width].reshape(batch, height * width, channels)


def axis_neighbours(i: int, length: int, kernel: int, dilation: int) -> list[int]:
    """NATTEN: inside i's residue class mod d, the k members starting at clamp(idx - k//2, 0, count - k)."""
    members = list(range(i % dilation, length, dilation))
    if len(members) <= kernel:
        return members
    start = min(max(i // dilation - kernel // 2, 0), len(members) - kernel)
    return members[start : start + kernel]


def reference_neighborhood(
    attn: nn.Module, x: torch.Tensor, grid: tuple[int, int], kernel: int, dilation: int
) -> torch.Tensor:
    q, k, v = project(attn, x)
    height, width = grid
    out = torch.empty_like(q)
    for n in range(height * width):
        row, col = divmod(n, width)
        keys = [
            ky * width + kx
            for ky in axis_neighbours(row, height, kernel, dilation)
            for kx in axis_neighbours(col, width, kernel, dilation)
        ]
        out[:, :, n : n + 1] = softmax_attention(q[:, :, n : n + 1], k[:, :, keys], v[:, :, keys])
    return merge(attn, out)


def reference_linear(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """out_i = sum_j s_ij v_j / (sum_j s_ij + eps) with s_ij = phi(q_i) . phi(k_j), phi = elu + 1."""
    q, k, v = project(attn, x)
    phi_q = torch.where(q > 0, q + 1, q.exp())
    phi_k = torch.where(k > 0, k + 1, k.exp())
    scores = phi_q @ phi_k.transpose(-2, -1)
    return merge(attn, (scores @ v) / (scores.sum(dim=-1, keepdim=True) + attn.eps))


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)])
@pytest.mark.parametrize("prefix", [0, 1])
def test_global_attention_matches_reference(grid: tuple[int, int], prefix: int) -> None:
    attn = make_attention("global", num_prefix_tokens=prefix)
    x = tokens(grid, prefix)
    torch.testing.assert_close(
        attn(x, grid), reference_global(attn, x, grid, prefix, rope=False), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)])
@pytest.mark.parametrize("prefix", [0, 1])
def test_global_attention_with_2d_rope_matches_reference(grid: tuple[int, int], prefix: int) -> None:
    rope = RotaryEmbedding2D(DIM // HEADS, ROPE_THETA)
    attn = make_attention("global", num_prefix_tokens=prefix, rope=rope)
    x = tokens(grid, prefix)
    expected = reference_global(attn, x, grid, prefix, rope=True)
    # The rotation tables are computed in float32, so the angles carry float32 rounding.
    torch.testing.assert_close(attn(x, grid), expected, atol=1e-7, rtol=0)
    assert not torch.allclose(expected, reference_global(attn, x, grid, prefix, rope=False), atol=1e-3)


def test_rope_scores_depend_only_on_relative_offset() -> None:
    """The defining RoPE property, independent of the channel layout: the same q and k vectors placed
    at any two positions score the same when their (row, column) offset is the same."""
    rope = RotaryEmbedding2D(8, ROPE_THETA)
    grid = (5, 6)
    torch.manual_seed(2)
    q = torch.randn(8, dtype=torch.float64).expand(grid[0] * grid[1], 8)
    k = torch.randn(8, dtype=torch.float64).expand(grid[0] * grid[1], 8)
    cos, sin = rope.cos_sin(grid, torch.device("cpu"))
    scores = rope.rotate(q, cos, sin) @ rope.rotate(k, cos, sin).T
    by_offset: dict[tuple[int, int], list[float]] = {}
    for a in range(grid[0] * grid[1]):
        for b in range(grid[0] * grid[1]):
            (ya, xa), (yb, xb) = divmod(a, grid[1]), divmod(b, grid[1])
            by_offset.setdefault((ya - yb, xa - xb), []).append(scores[a, b].item())
    spreads = [max(values) - min(values) for values in by_offset.values()]
    assert max(spreads) < 1e-5
    assert len({round(values[0], 4) for values in by_offset.values()}) > len(by_offset) // 2


@pytest.mark.parametrize(
    ("grid", "size", "shift"),
    [
        ((8, 12), 4, 0),  # divisible, non-square
        ((6, 10), 4, 0),  # padded to 8 x 12
        ((8, 12), 4, 2),  # shifted, divisible
        ((7, 10), 4, 2),  # shifted and padded
        ((10, 5), 4, 1),  # a shift other than P/2
        ((9, 9), 3, 1),
        ((3, 4), 4, 2),  # grid inside one window: no shift, padded with zero tokens
        ((4, 9), 4, 2),  # one side equals the window: no shift
    ],
)
def test_window_attention_matches_reference(grid: tuple[int, int], size: int, shift: int) -> None:
    attn = make_attention("window", partition_size=size, shift_size=shift)
    x = tokens(grid)
    expected = reference_partitioned(attn, x, grid, size, shift, "window")
    torch.testing.assert_close(attn(x, grid), expected, atol=ATOL, rtol=0)


def test_shift_changes_the_result_when_the_grid_exceeds_the_window() -> None:
    grid = (8, 8)
    x = tokens(grid)
    plain = make_attention("window", partition_size=4, shift_size=0)
    shifted = make_attention("window", partition_size=4, shift_size=2)
    assert not torch.allclose(plain(x, grid), shifted(x, grid), atol=1e-3)


@pytest.mark.parametrize(("grid", "size"), [((8, 12), 4), ((7, 10), 4), ((3, 2), 4)])
def test_block_attention_is_unshifted_windows(grid: tuple[int, int], size: int) -> None:
    attn = make_attention("block", partition_size=size, shift_size=size // 2)
    x = tokens(grid)
    expected = reference_partitioned(attn, x, grid, size, 0, "window")
    torch.testing.assert_close(attn(x, grid), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("grid", "size"), [((6, 9), 3), ((8, 4), 2), ((7, 5), 3), ((2, 3), 4), ((10, 11), 4)]
)
def test_grid_attention_matches_reference(grid: tuple[int, int], size: int) -> None:
    attn = make_attention("grid", partition_size=size)
    x = tokens(grid)
    expected = reference_partitioned(attn, x, grid, size, 0, "grid")
    torch.testing.assert_close(attn(x, grid), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("grid", "kernel", "dilation"),
    [
        ((5, 7), 3, 1),
        ((7, 4), 5, 1),
        ((6, 9), 3, 2),  # dilated
        ((5, 9), 3, 2),  # one residue class of rows shorter than the kernel
        ((8, 7), 3, 3),
    ],
)
def test_neighborhood_attention_matches_reference(grid: tuple[int, int], kernel: int, dilation: int) -> None:
    kind = "neighborhood" if dilation == 1 else "dilated"
    attn = make_attention(kind, kernel_size=kernel, dilation=dilation)
    x = tokens(grid)
    expected = reference_neighborhood(attn, x, grid, kernel, dilation)
    torch.testing.assert_close(attn(x, grid), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)])
def test_linear_attention_matches_reference(grid: tuple[int, int]) -> None:
    attn = make_attention("linear")
    x = tokens(grid)
    torch.testing.assert_close(attn(x, grid), reference_linear(attn, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("kind", "kwargs", "expected_calls"),
    [
        ("global", {}, 1),
        ("global", {"num_prefix_tokens": 1, "rope": RotaryEmbedding2D(DIM // HEADS)}, 1),
        ("window", {"partition_size": 2, "shift_size": 1}, 1),
        ("block", {"partition_size": 2}, 1),
        ("grid", {"partition_size": 2}, 1),
        ("neighborhood", {"kernel_size": 3}, 1),
        ("dilated", {"kernel_size": 3, "dilation": 2}, 1),
        ("linear", {}, 0),
    ],
)
def test_softmax_variants_run_fused_attention(
    monkeypatch: pytest.MonkeyPatch, kind: str, kwargs: dict, expected_calls: int
) -> None:
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args: object, **kw: object) -> torch.Tensor:
        calls.append(kind)
        return real(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    attn = make_attention(kind, **kwargs)
    grid = (4, 6)
    attn(tokens(grid, kwargs.get("num_prefix_tokens", 0)), grid)
    assert len(calls) == expected_calls


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("cosine", {}, "unknown attention kind 'cosine'"),
        ("window", {"num_prefix_tokens": 1}, "no class token"),
        ("window", {"partition_size": 4, "shift_size": 4}, "shift 4 must be in [0, 4)"),
        ("neighborhood", {"kernel_size": 4}, "odd and positive, got 4"),
        ("dilated", {"dilation": 0}, "dilation must be >= 1"),
    ],
)
def test_invalid_attention_settings_are_rejected(kind: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_attention(kind, DIM, HEADS, **kwargs)
