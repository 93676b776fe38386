"""Tile plans of the fused linear head: how ``linear_token_logprobs`` cuts the (N, V) logits into tiles.

A :class:`Plan` is a tile of ``rows × vocab`` logits and the dtype its matmuls run in.  :func:`make_plan`
sizes it (rows first, then as many vocabulary columns as a byte budget allows, aligned so that the kept
tiles of ``ops/linear_engine.py`` cover as much of the vocabulary as they may); :func:`cpu_plan` and
:func:`gpu_plan` are the budgets of the ``cpu``/``torch`` and the ``triton`` backends.
``BOND_KERNELS_LINEAR_TILE="rows,vocab"`` overrides the shape (tuning and tests).
"""

from dataclasses import dataclass

import torch

from .. import _env

# CPU tile budget: 64 MiB of fp32 logits (16M elements) keeps the tile, its softmax temporaries and the
# upcast weight slice inside a few hundred MB even with the torch tile kernels.
CPU_TILE_BYTES = 64 << 20
# CPU row block: 4096 rows × H = 4096 fp32 is a 64 MiB grad_hidden accumulator.
CPU_MAX_ROWS = 4096

# A 64 MiB logits tile: at N = 8192 rows in bf16 that is 4096 vocabulary columns, a matmul of
# 8192 × 4096 × 4096 — large enough for cuBLAS to run at its full rate.
GPU_TILE_BYTES = 64 << 20
# Up to 8192 rows share one pass over the vocabulary so that grad_W tiles are written once; more rows
# become row blocks whose grad_W contributions are added (one rounding per extra block).
GPU_MAX_ROWS = 8192
# Vocabulary tiles in multiples of 256 columns keep every matmul dimension a multiple of the MMA tiles.
GPU_VOCAB_MULTIPLE = 256


@dataclass(frozen=True)
class Plan:
    """Tile shape and the dtype the tile matmuls run in."""

    rows: int
    vocab: int
    compute_dtype: torch.dtype


def make_plan(n, v, h, dtype, *, compute_dtype, tile_bytes, max_rows, vocab_multiple=1, upcast_weight=False):
    """Rows first (up to ``max_rows``), then as many vocabulary columns as ``tile_bytes`` allows."""
    rows_env, vocab_env = _env.linear_tile()
    elem = torch.empty(0, dtype=compute_dtype).element_size()
    rows = rows_env or max(1, min(n, max_rows))
    rows = min(rows, max(n, 1))
    if vocab_env:
        vocab = vocab_env
    else:
        vocab = tile_bytes // (rows * elem)
        if upcast_weight:
            # The weight slice is upcast per tile too: keep it within the same budget.
            vocab = min(vocab, tile_bytes // (max(h, 1) * elem))
        if vocab < v:
            vocab = max(vocab_multiple, vocab // vocab_multiple * vocab_multiple)
            vocab = _align_to_kept(n, v, h, rows, vocab, vocab_multiple)
    vocab = max(1, min(vocab, v))
    return Plan(rows, vocab, compute_dtype)


def _align_to_kept(n, v, h, rows, vocab, multiple):
    """Shrink the tile (never grow it) so that a tile boundary falls at the first column ``make_kept``
    (``ops/linear_engine.py``) may keep: the kept tiles then cover up to H/(N+H) of the vocabulary, not only
    the whole tiles past it.  At N = 2048, H = 1024, V = 32000 with 8192-column tiles one tile (7424 columns)
    was kept; with 7112-column tiles 10664 are (the most is 10666).  Only for one row block, the case that
    keeps anything."""
    if n > rows or n == 0:
        return vocab
    c_min = (n * v + n + h - 1) // (n + h)
    recomputed = (c_min + vocab - 1) // vocab  # tiles before the boundary
    aligned = (c_min + recomputed - 1) // recomputed
    aligned = (aligned + multiple - 1) // multiple * multiple
    return aligned if aligned <= vocab else vocab


def cpu_plan(n, v, h, dtype) -> Plan:
    """The ``cpu`` (and ``torch``) plan: fp32 matmuls (fp64 for fp64) within ``CPU_TILE_BYTES``."""
    # fp32 matmuls on CPU: bf16 GEMMs without AMX are slower than fp32 ones, and fp32 keeps the CPU path
    # as accurate as the reference.
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return make_plan(
        n,
        v,
        h,
        dtype,
        compute_dtype=compute,
        tile_bytes=CPU_TILE_BYTES,
        max_rows=CPU_MAX_ROWS,
        upcast_weight=compute != dtype,
    )


def gpu_plan(n, v, h, dtype) -> Plan:
    """The ``triton`` plan: tiles in the input dtype (bf16 tensor cores) within ``GPU_TILE_BYTES``."""
    # fp64 never reaches this backend.
    return make_plan(
        n,
        v,
        h,
        dtype,
        compute_dtype=dtype,
        tile_bytes=GPU_TILE_BYTES,
        max_rows=GPU_MAX_ROWS,
        vocab_multiple=GPU_VOCAB_MULTIPLE,
    )
