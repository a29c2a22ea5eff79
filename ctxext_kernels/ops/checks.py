"""The one validation layer of the public ops (`apply_rope`, `rope_attention`, `rope_cos_sin`), shared by every backend.

Every check runs before anything is launched or written, and raises `TypeError` (wrong kind of object or dtype) or
`ValueError` (wrong shape, device, stride, aliasing or value) with a message that names the argument. Two kinds:

- free checks (types, shapes, dtypes, devices, strides, memory aliasing): host metadata only, always on;
- value checks (position range, `cu_seqlens` / `cu_seqlens_k` contents): they read tensor data, so they cost one
  host sync per call in all (`check_values` gathers every statistic into one tensor and reads it once). The public
  default runs them (`check_positions=True`); callers that vouch for their inputs in a hot loop, such as the
  transformers integration, switch them off, and `torch.compile` skips them.

The kernels trust what passes here: a `cu_seqlens` that overruns the tokens is an out-of-bounds access on the GPU.
"""

from __future__ import annotations

import math
import numbers

import torch

from .spec import MAX_POSITION, RopeSpec

LAYOUTS = ("bhsd", "bshd", "thd")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
_SHAPES = {"bhsd": "[batch, heads, seq, head_dim]", "bshd": "[batch, seq, heads, head_dim]",
           "thd": "[total_tokens, heads, head_dim]"}


# ------------------------------------------------------------------------------------------ plain arguments
def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_spec(spec) -> None:
    if not isinstance(spec, RopeSpec):
        raise TypeError(f"spec must be a RopeSpec (RopeSpec.from_hf_config or RopeSpec.from_params), got "
                        f"{type(spec).__name__}")


def check_flags(**flags) -> None:
    """Each keyword must be a bool (a tensor or a string here would be truthy by accident)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a number or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")


def check_out_dtype(dtype) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16, bfloat16 or None, got {dtype}")


# --------------------------------------------------------------------------------------------- q, k, v
def token_dims(x: torch.Tensor, layout: str) -> tuple[int, ...]:
    """(batch, seq) of a tensor in `layout`; (total_tokens,) for "thd"."""
    return {"bhsd": (x.shape[0], x.shape[2]), "bshd": tuple(x.shape[:2]), "thd": (x.shape[0],)}[layout]


def head_count(x: torch.Tensor, layout: str) -> int:
    return x.shape[1] if layout in ("bhsd", "thd") else x.shape[2]


def check_qk(q: torch.Tensor | None, k: torch.Tensor, layout: str, spec: RopeSpec,
             keys_may_extend: bool = False) -> None:
    """Named checks of q (None: k alone) and k. keys_may_extend: k may hold more tokens than q (already rotated keys
    of a KV cache): same batch and at least as many keys per sequence ("thd": any count, cu_seqlens_k says whose)."""
    check_layout(layout)
    want = 3 if layout == "thd" else 4
    named = (("k", k),) if q is None else (("q", q), ("k", k))
    for name, x in named:
        check_tensor(name, x)
        if x.dim() != want:
            raise ValueError(f"{name} must be {want}-D for layout {layout!r} ({_SHAPES[layout]}), got shape "
                             f"{tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: the head dimension must be contiguous (stride 1), got stride {x.stride(-1)}; "
                             "call .contiguous() first")
    q = k if q is None else q
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    q_tokens, k_tokens = token_dims(q, layout), token_dims(k, layout)
    if keys_may_extend:
        if layout != "thd" and (q_tokens[0] != k_tokens[0] or k_tokens[1] < q_tokens[1]):
            raise ValueError(f"k must have q's batch and at least its sequence length, got q {q_tokens} and k "
                             f"{k_tokens} (batch, seq)")
    elif q_tokens != k_tokens:
        raise ValueError(f"q and k must have the same batch/sequence dims, got {q_tokens} and {k_tokens}")
    head_dim = q.shape[-1]
    if head_dim != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {head_dim} and {k.shape[-1]}")
    if spec.rotary_dim > head_dim or spec.rotary_dim % 2 or spec.rotary_dim < 2:
        raise ValueError(f"spec.rotary_dim={spec.rotary_dim} must be even, >= 2 and <= head_dim={head_dim}")
    if tuple(spec.inv_freq.shape) != (spec.rotary_dim // 2,):
        raise ValueError(f"spec.inv_freq must have shape [rotary_dim // 2] = [{spec.rotary_dim // 2}], got "
                         f"{list(spec.inv_freq.shape)}")


def check_v(v, k: torch.Tensor) -> None:
    check_tensor("v", v)
    if v.shape != k.shape:
        raise ValueError(f"v must match k in shape, got {tuple(v.shape)} vs {tuple(k.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype, got {v.dtype} and {k.dtype}")
    if v.device != k.device:
        raise ValueError(f"v must be on k's device, got {v.device} and {k.device}")
    if v.stride(-1) != 1:
        raise ValueError(f"v: the head dimension must be contiguous (stride 1), got stride {v.stride(-1)}")


# ------------------------------------------------------------------------------------------------ aliasing
def check_inplace(q: torch.Tensor, k: torch.Tensor) -> None:
    """Refuse an in-place rotation that would write one memory location twice, or that autograd would refuse only
    after the kernel ran: overlapping q and k, q or k overlapping itself (expanded, stride 0), a leaf (or a view of
    a leaf) that requires grad. The memory checks read addresses, which tensors being traced by torch.compile do not
    have: there they are skipped."""
    for name, x in (("q", q), ("k", k)):
        if torch.is_grad_enabled() and x.requires_grad and (x.is_leaf or x._base is not None and x._base.is_leaf):
            raise ValueError(f"inplace=True: {name} is a leaf tensor that requires grad (or a view of one), which "
                             "autograd cannot rotate in place; pass inplace=False, or rotate a copy (x * 1)")
    if torch.compiler.is_compiling():
        return
    for name, x in (("q", q), ("k", k)):
        if _overlaps_itself(x):
            raise ValueError(f"inplace=True: {name} has elements sharing one memory location (an expanded or "
                             f"overlapping view, strides {x.stride()}); pass inplace=False or {name}.contiguous()")
    if _overlap(q, k):
        raise ValueError("inplace=True: q and k share memory, so some elements would be rotated twice; pass "
                         "inplace=False or non-overlapping tensors")


def _byte_span(x: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes that x can touch (torch strides are never negative)."""
    last = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()


def _injective(sizes, strides) -> bool:
    """Sufficient condition for distinct indices to reach distinct offsets: sorted by stride, each dim's stride
    exceeds the furthest offset the smaller dims reach."""
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(sizes, strides) if sz > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def _row_starts(x: torch.Tensor) -> torch.Tensor:
    """Byte address of each head-dim row of x (last dim contiguous): `[numel / head_dim]` int64 on the CPU."""
    starts = torch.tensor(x.data_ptr(), dtype=torch.int64)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        starts = starts[..., None] + torch.arange(size, dtype=torch.int64) * (stride * x.element_size())
    return starts.flatten()


def _overlaps_itself(x: torch.Tensor) -> bool:
    if x.numel() == 0 or _injective(x.shape, x.stride()):
        return False
    # Rare strides: compare the rows' byte ranges exactly (host metadata only, O(rows log rows)).
    starts = _row_starts(x).sort().values
    return bool((starts.diff() < x.shape[-1] * x.element_size()).any())


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (same dtype, last dim contiguous) share a memory location."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a_lo, a_hi), (b_lo, b_hi) = _byte_span(a), _byte_span(b)
    if a_hi <= b_lo or b_hi <= a_lo:
        return False
    boxes = _boxes_overlap(a, b) if a.stride() == b.stride() else None
    if boxes is not None:
        return boxes
    starts_a = _row_starts(a).sort().values
    starts_b = _row_starts(b)
    after = torch.searchsorted(starts_a, starts_b).clamp(max=starts_a.numel() - 1)
    before = (after - 1).clamp(min=0)
    a_row, b_row = a.shape[-1] * a.element_size(), b.shape[-1] * b.element_size()
    return bool(((starts_a[after] < starts_b + b_row) & (starts_b < starts_a[after] + a_row)).any()
                or ((starts_a[before] < starts_b + b_row) & (starts_b < starts_a[before] + a_row)).any())


def _boxes_overlap(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """Exact answer for the common case, views of one buffer with the same strides (a fused qkv projection): b's
    first element has index `delta` in a's lattice; when that lattice is injective on the box holding both, they
    overlap iff their index boxes intersect. None when this does not apply."""
    if a.data_ptr() > b.data_ptr():
        a, b = b, a
    distance, rem = divmod(b.data_ptr() - a.data_ptr(), a.element_size())
    if rem:
        return None
    delta = [0] * a.dim()
    for dim in sorted(range(a.dim()), key=lambda d: -a.stride(d)):
        if a.stride(dim):
            delta[dim], distance = divmod(distance, a.stride(dim))
    hull = [max(sa, d + sb) for sa, sb, d in zip(a.shape, b.shape, delta)]
    if distance or not _injective(hull, a.stride()):
        return None
    return all(d < sa for d, sa in zip(delta, a.shape))


# ------------------------------------------------------------------------------------- positions, cu_seqlens
def check_cu_seqlens(name: str, cu, device: torch.device) -> None:
    """Free checks of a boundaries tensor; its values are checked by `check_values`."""
    check_tensor(name, cu)
    if cu.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() == 0:
        raise ValueError(f"{name} must be 1-D [num_seqs + 1] with at least one entry, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")


def check_leftpad(k_leftpad, q: torch.Tensor, layout: str) -> None:
    """Free checks of the keys' per-row left padding `[B]`; its values are checked by `check_values`."""
    check_tensor("k_leftpad", k_leftpad)
    if layout == "thd":
        raise ValueError("k_leftpad pads the rows of a batch: use it with layout 'bhsd' or 'bshd' (packed sequences "
                         "have cu_seqlens_k instead)")
    if k_leftpad.dtype not in INDEX_DTYPES:
        raise TypeError(f"k_leftpad must be int32 or int64, got {k_leftpad.dtype}")
    if k_leftpad.shape != (q.shape[0],):
        raise ValueError(f"k_leftpad must be [batch] = [{q.shape[0]}], got shape {tuple(k_leftpad.shape)}")
    if k_leftpad.device != q.device:
        raise ValueError(f"k_leftpad is on {k_leftpad.device} but q is on {q.device}")


def positions_2d(position_ids, x: torch.Tensor, layout: str, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """position_ids as `[B, S]` matching x's tokens (`[1, T]` for "thd"), a view where possible (ids shared by the
    batch are expanded, stride 0). None: 0..S-1, per sequence of `cu_seqlens` for "thd" (checked statically by
    `check_cu_seqlens` first; its values by `check_values`)."""
    tokens = token_dims(x, layout)
    expected = (1,) + tokens if layout == "thd" else tokens
    if position_ids is None:
        if layout != "thd":
            return torch.arange(tokens[1], device=x.device).expand(expected)
        if cu_seqlens is None:
            raise ValueError("layout 'thd' needs position_ids or cu_seqlens")
        return _positions_from_cu_seqlens(cu_seqlens, tokens[0])[None]
    check_tensor("position_ids", position_ids)
    if position_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"position_ids must be an integer tensor (int32 or int64), got {position_ids.dtype}")
    if position_ids.device != x.device:
        raise ValueError(f"position_ids is on {position_ids.device} but q is on {x.device}")
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    if pos.dim() != 2 or pos.shape[1] != expected[-1] or pos.shape[0] not in (1, expected[0]):
        raise ValueError(f"position_ids must be [batch, seq], [seq] or [total_tokens] matching q's tokens {tokens}, "
                         f"got shape {tuple(position_ids.shape)}")
    return pos.expand(expected)


def _positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """0, 1, ... restarting at each packed sequence start: `[T]` from cu_seqlens `[num_seqs + 1]`, on the device,
    without a sync (garbage for invalid boundaries, which `check_values` refuses before any kernel runs)."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    segment = (torch.searchsorted(cu, tokens, right=True) - 1).clamp(0, cu.numel() - 1)
    return tokens - cu[segment]


def check_values(positions: torch.Tensor, *, check: bool, want_max: bool, cu_seqlens: torch.Tensor | None = None,
                 n_tokens: int = 0, cu_seqlens_k: torch.Tensor | None = None, n_keys: int = 0,
                 k_leftpad: torch.Tensor | None = None, keys_per_row: int = 0) -> int | None:
    """The checks that read data, in one host sync: positions in [0, 2^24); cu_seqlens from 0 to n_tokens,
    non-decreasing; cu_seqlens_k from 0 to n_keys, non-decreasing, at least as many keys as queries per sequence;
    k_leftpad in [0, keys_per_row].

    Args:
        positions: int `[B, S]`.
        check: run the checks (False: only what want_max needs).
        want_max: the caller needs the largest position (dynamic rope types).
        cu_seqlens, cu_seqlens_k: `[num_seqs + 1]`, already through `check_cu_seqlens`, or None.
    Returns:
        largest position + 1 (0 without positions) when checked or wanted, else None.
    """
    if not (check or want_max):
        return None
    if torch.compiler.is_compiling():  # no data-dependent control flow in a graph: frequencies only
        return int(positions.max()) + 1 if want_max and positions.numel() else (0 if want_max else None)
    stats: dict[str, torch.Tensor] = {}
    if positions.numel():
        stats["min position"], stats["max position"] = torch.aminmax(positions)
    if check:
        for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
            if cu is not None:
                stats[f"{name} first"], stats[f"{name} last"] = cu[0], cu[-1]
                if cu.numel() > 1:
                    stats[f"{name} step"] = (cu[1:] - cu[:-1]).min()
        if cu_seqlens is not None and cu_seqlens_k is not None and cu_seqlens.numel() > 1:
            stats["keys minus queries"] = (cu_seqlens_k.diff() - cu_seqlens.diff()).min()
        if k_leftpad is not None and k_leftpad.numel():
            stats["min k_leftpad"], stats["max k_leftpad"] = torch.aminmax(k_leftpad)
    if not stats:
        return 0
    values = dict(zip(stats, torch.stack([s.to(torch.int64) for s in stats.values()]).tolist()))
    if check:
        _raise_on_bad_values(values, n_tokens, n_keys, keys_per_row)
    return values.get("max position", -1) + 1


def _raise_on_bad_values(values: dict[str, int], n_tokens: int, n_keys: int, keys_per_row: int) -> None:
    for name, total, what in (("cu_seqlens", n_tokens, "q's"), ("cu_seqlens_k", n_keys, "k's")):
        if f"{name} first" not in values:
            continue
        if values[f"{name} first"] != 0:
            raise ValueError(f"{name} must start at 0, got {values[f'{name} first']}")
        if values.get(f"{name} step", 0) < 0:
            raise ValueError(f"{name} must be non-decreasing (sequence lengths >= 0), found a step of "
                             f"{values[f'{name} step']}")
        if values[f"{name} last"] != total:
            raise ValueError(f"{name} must end at {what} number of tokens {total}, got {values[f'{name} last']}")
    if values.get("keys minus queries", 0) < 0:
        raise ValueError("cu_seqlens_k: every sequence needs at least as many keys as queries (cu_seqlens), found "
                         f"one with {-values['keys minus queries']} fewer")
    if not 0 <= values.get("min k_leftpad", 0) <= values.get("max k_leftpad", 0) <= keys_per_row:
        raise ValueError(f"k_leftpad must lie in [0, {keys_per_row}] (the key slots of a row), found values in "
                         f"[{values['min k_leftpad']}, {values['max k_leftpad']}]")
    if values.get("min position", 0) < 0:
        raise ValueError(f"position_ids must be non-negative, found {values['min position']}")
    if values.get("max position", 0) > MAX_POSITION:
        raise ValueError(f"position_ids must be below 2^24 = {MAX_POSITION + 1} (exact fp32 integers), found "
                         f"{values['max position']}")
