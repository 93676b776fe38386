"""Compile budget of every Triton kernel variant at the benchmark shapes, for an H100/H200 (sm_90), without a GPU.

The kernels are compiled *through the launchers*: each launcher runs on ``meta`` tensors of the benchmark
shapes (N = 8192 rows; V ∈ {32000, 128256, 256000}; bf16, fp16, fp32; every option flag), so the block
size, warps, pipeline depth and the specialisation Triton derives from the arguments (16-byte alignment of
pointers, sizes and strides divisible by 16) are exactly those of a real launch.  A stand-in driver reports
an sm_90 target, and each kernel's ``run`` is called with ``warmup=True``: Triton compiles (its own ptxas,
shipped in the wheel) and launches nothing.  ``cuobjdump -res-usage`` then gives registers, spills (local
memory) and shared memory, and ``cuobjdump -sass`` the global-load instructions.

Programs per SM follow the sm_90 limits: 64 warps, 32 blocks, 65536 registers allocated per warp in units of
256, 228 KB of shared memory with 1 KB reserved per block.

    python benchmarks/compile_budget.py                 # print the markdown table
    python benchmarks/compile_budget.py --check         # and exit 1 on a spill, a floor missed, or an
                                                        # unpipelined streaming loop
    python benchmarks/compile_budget.py --out table.md  # also write the table to a file

Floors (``--check``): no register spill in any variant (ptxas' own count of spill stores and loads, from the
``-v`` log Triton prints with ``dump_ptxas_log``; STL/LDL instructions without spills are the registers a
subroutine call saves, the IEEE division's slow path, and are reported, not failed); every streaming kernel (the token
log-prob and Jeffreys sweeps) keeps at least ``STREAM_WARPS_FLOOR`` warps resident per SM and loads the
logits with cp.async (``LDGSTS``: the software pipeline is in place); every other kernel keeps at least
``OTHER_WARPS_FLOOR`` warps per SM.
"""

import argparse
import collections
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":
    os.environ.pop(
        "TRITON_INTERPRET", None
    )  # the real compiler, not the interpreter (set before triton loads)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402

N = 8192
VOCABS = (32000, 128256, 256000)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Resident warps per SM: a streaming sweep with fewer than 16 (a quarter of the 64) has too few loads in
# flight to approach copy bandwidth unless each program is wide; 8 for the small O(N) kernels.
STREAM_WARPS_FLOOR = 16
OTHER_WARPS_FLOOR = 8
# The persistent two-sweep kernel runs about one program per SM by design (its grid is bounded so that the
# rows in flight stay in L2): it is held to the 8-warp floor and to the bytes-in-flight floor instead.
PERSISTENT = ("token fwd+bwd 2-sweep",)
# Bytes a pipelined sweep keeps in flight per SM: programs × (stages − 1) blocks ahead × block bytes (two
# rows for the Jeffreys kernels).  Little's law: 4.8 TB/s (H200) × ~0.7 us of latency / 132 SMs ≈ 25 KB.
INFLIGHT_FLOOR_KB = 32
_ROWS_READ = {"jeffreys fwd": 2, "jeffreys bwd": 2, "distill tile fold": 2, "distill tile grad": 2}
# sm_90 limits (CUDA occupancy calculator, compute capability 9.0).
SM90 = dict(warps=64, blocks=32, regs=65536, reg_unit=256, smem=228 * 1024, smem_reserved=1024)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class _Sm90Driver:
    """Enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: the device, a stream, the target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("meta")


def _res_usage(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
        )
        sass = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True
        )
    line = next(x for x in res.stdout.splitlines() if "REG:" in x)
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    loads = collections.Counter(re.findall(r"\b(LDGSTS\.[\w.]+|LDG\.[\w.]+)", sass.stdout))
    mufu = collections.Counter(re.findall(r"\bMUFU\.(\w+)", sass.stdout))
    # local-memory stores and loads: register spills, or the registers a subroutine call saves (the IEEE
    # division's slow path); ptxas' own spill count (from its -v log) tells the two apart
    usage["SPILL"] = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\b", sass.stdout))
    return usage, loads, mufu


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """Resident programs (thread blocks) per SM on sm_90 for this register, warp and shared-memory use."""
    per_warp = -(-max(regs, 1) * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = (SM90["regs"] // per_warp) // warps
    by_smem = SM90["smem"] // (shared + SM90["smem_reserved"])
    return max(0, min(SM90["blocks"], SM90["warps"] // warps, by_regs, by_smem))


def _inflight_kb(name, programs, kwargs, dtype):
    stages, block = kwargs.get("NUM_STAGES"), kwargs.get("BLOCK")
    if not stages or not block:
        return 0
    elem = 4 if dtype == "fp32" else 2
    resident = 1 if name in PERSISTENT else programs
    return resident * (stages - 1) * block * elem * _ROWS_READ.get(name, 1) // 1024


class Recorder:
    """Wraps every Triton kernel's ``run`` so that a launch compiles (``warmup=True``) and is recorded."""

    def __init__(self):
        self.rows = {}
        self.case = ""
        self._undo = []

    def wrap(self, name, fn, streaming):
        jit = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn  # an Autotuner holds it as .fn
        original = jit.run

        def run(*args, _orig=original, **kwargs):
            kwargs["warmup"] = True
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # triton prints ptxas' -v log (dump_ptxas_log)
                kernel = _orig(*args, **kwargs)
            const = {k: v for k, v in kwargs.items() if k.isupper() and k not in ("BLOCK", "NUM_STAGES")}
            key = (name, id(kernel))  # Triton returns the cached object for an identical specialisation
            if key not in self.rows:
                usage, loads, mufu = _res_usage(kernel.asm["cubin"])
                spilled = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
                if not spilled:
                    raise RuntimeError(f"{name}: no ptxas log captured (was the kernel loaded from a cache?)")
                warps = kernel.metadata.num_warps
                shared = max(kernel.metadata.shared, usage["SHARED"])
                self.rows[key] = dict(
                    kernel=name,
                    case=self.case,
                    dtype=self.case_dtype,
                    flags=",".join(
                        f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(const.items())
                    )
                    or "-",
                    block=kwargs.get("BLOCK", "-"),
                    stages=kwargs.get("NUM_STAGES", "-"),
                    warps=warps,
                    regs=usage["REG"],
                    local=usage["LOCAL"],
                    spill_ops=usage["SPILL"],
                    spill=sum(int(a) + int(b) for a, b in spilled),
                    stack=usage["STACK"],
                    shared=shared,
                    programs=programs_per_sm(usage["REG"], warps, shared),
                    inflight_kb=_inflight_kb(
                        name, programs_per_sm(usage["REG"], warps, shared), kwargs, self.case_dtype
                    ),
                    loads=" ".join(f"{k}×{v}" for k, v in sorted(loads.items())),
                    mufu=" ".join(f"{k}×{v}" for k, v in sorted(mufu.items())) or "-",
                    streaming=streaming,
                )
            return kernel

        jit.run = run
        self._undo.append((jit, original))

    @contextlib.contextmanager
    def at(self, case, dtype):
        self.case, self.case_dtype = case, _DT.get(dtype, str(dtype))
        yield

    def restore(self):
        for jit, original in self._undo:
            jit.run = original


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def compile_all():
    """Run every launcher at the benchmark shapes under the sm_90 stand-in driver; returns the table rows."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_budget needs the real Triton compiler: unset TRITON_INTERPRET")
    _driver.set_active(_Sm90Driver())
    # ptxas' -v log for every variant: compile even what the on-disk cache holds, and print the log
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    # import_module: the package re-exports functions under some of these module names
    _config, lt, rq, tj, tk, lj = (
        importlib.import_module(f"bond_kernels.ops.triton.{m}")
        for m in (
            "_config",
            "linear_token_logprobs",
            "reward_quantiles",
            "token_jeffreys",
            "token_logprobs",
            "linear_token_jeffreys",
        )
    )

    rec = Recorder()
    for name, fn in (
        ("token fwd", tk._FWD),
        ("token bwd", tk._BWD),
        ("token fwd+bwd 1-pass", tk._FWD_BWD),
        ("token fwd+bwd 2-sweep", tk._FWD_BWD_2),
        ("jeffreys fwd", tj._token_jeffreys_fwd_kernel),
        ("jeffreys bwd", tj._token_jeffreys_bwd_kernel),
        ("distill tile fold", lj._jeffreys_tile_fold_kernel),
        ("distill tile grad", lj._jeffreys_tile_grad_kernel),
    ):
        rec.wrap(name, fn, streaming=True)
    rec.wrap("quantiles", rq._reward_quantiles_kernel, streaming=False)
    rec.wrap("linear fix-up", lt._linear_fixup_kernel, streaming=False)

    # The CUDA answer of the device-dependent policies (meta tensors are not on a CUDA device).
    fast_tanh = _config.fast_tanh
    two_sweep_programs = _config.two_sweep_programs
    try:
        for fast in (False, True):  # the exp2 tanh (default), then tanh.approx (BOND_KERNELS_FAST_TANH=1)
            _config.fast_tanh = lambda device, _fast=fast: _fast
            _config.two_sweep_programs = lambda n, row_bytes, device: min(n, 132)
            for dtype in DTYPES:
                for v in VOCABS:
                    x = _meta(N, v, dtype=dtype)
                    y = _meta(N, dtype=torch.int64)
                    f = _meta(N)
                    caps = (30.0,) if fast else (None, 30.0)
                    for cap in caps:
                        with rec.at(f"N={N} V={v}" + (" tanh=fast" if fast else ""), dtype):
                            for ent in (False, True):
                                tk.token_logprobs_fwd(x, y, 1.0, cap, -100, ent)
                                tk.token_logprobs_bwd(
                                    x, y, f, f, f, f if ent else _meta(0), 1.0, cap, -100, False
                                )
                            tk.token_logprobs_fwd_bwd(x, y, f, 1.0, cap, -100, False)
                    if fast:
                        continue
                    with rec.at(f"N={N} V={v}", dtype):
                        # (B, T, V) slice logits[:, :-1]: another stride layout of the same kernels
                        x3 = _meta(8, 1025, v, dtype=dtype)[:, :-1]
                        tk.token_logprobs_fwd(x3, _meta(8 * 1024, dtype=torch.int64), 1.0, None, -100, False)
                        for mask in (_meta(0, dtype=torch.bool), _meta(N, dtype=torch.bool)):
                            _, lp, lq, kl = tj.token_jeffreys_fwd(x, x, 0.5, 1.0, mask)
                            tj.token_jeffreys_bwd(x, x, lp, lq, kl, f, 0.5, 1.0, mask)
                # the gradient in the forward of a row short enough for one pass, and the linear head's fix-up
                with rec.at(f"N={N} V=16384", dtype):
                    for cap in (None, 30.0):
                        tk.token_logprobs_fwd_bwd(_meta(N, 16384, dtype=dtype), y, f, 1.0, cap, -100, False)
                with rec.at(f"linear head N={N} H=4096", dtype):
                    d = _meta(N, 4096, dtype=dtype)
                    for ent, cap in ((False, None), (True, 30.0)):
                        g_ent = f if ent else None
                        lt.fixup_column0_triton(d, f, _meta(N, dtype=torch.bool), f, f, f, g_ent, 1.0, cap)
            # linear_token_jeffreys' forward fold: one 64 MiB fp32-equivalent tile (N = 8192, C = 2048) of the
            # two heads' matmul outputs, with and without softcaps, with and without the cross terms
            for dtype in DTYPES:
                with rec.at(f"distill tile N={N} C=2048", dtype):
                    st = _meta(7, N)
                    xs, xt = _meta(N, 2048, dtype=dtype), _meta(N, 2048, dtype=dtype)
                    f32 = _meta(N)
                    for caps in ((0.0, 0.0), (30.0, 50.0)):
                        for cross in (True, False):
                            lj.jeffreys_tile_fold(st, xs, xt, 1.0, caps[0], caps[1], cross)
                        for gjsd in (False, True):
                            lj.jeffreys_tile_grad(
                                xs, xt, f32, f32, f32, f32, 1.0, caps[0], caps[1], 0.5, gjsd
                            )
            with rec.at("B=1024 n=16 k=64", torch.float32):
                for mode in (0, 1, 2):
                    for mask in (_meta(0, dtype=torch.bool), _meta(1024, 64, dtype=torch.bool)):
                        rq.reward_quantiles(_meta(1024, 16), _meta(1024, 64), mask, mode, 1e-6)
    finally:
        _config.fast_tanh = fast_tanh
        _config.two_sweep_programs = two_sweep_programs
        rec.restore()
        _driver.set_active(None)  # the next use creates the real driver again
    return list(rec.rows.values())


def problems(rows):
    """What ``--check`` fails on, one line each."""
    out = []
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} {r['flags']} BLOCK={r['block']} ({r['case']})"
        if r["spill"] or r["local"]:
            out.append(
                f"{where}: spills ({r['spill']} B of spill stores + loads, {r['local']} B local memory)"
            )
        floor = STREAM_WARPS_FLOOR if r["streaming"] and r["kernel"] not in PERSISTENT else OTHER_WARPS_FLOOR
        if r["programs"] * r["warps"] < floor:
            out.append(
                f"{where}: {r['programs']} programs × {r['warps']} warps per SM, below the floor of {floor}"
            )
        pipelined = r["streaming"] and r["kernel"] != "token fwd+bwd 1-pass"
        if pipelined and "LDGSTS" not in r["loads"]:
            out.append(f"{where}: no cp.async (LDGSTS) load: the streaming loop is not pipelined")
        if pipelined and r["inflight_kb"] < INFLIGHT_FLOOR_KB:
            out.append(
                f"{where}: {r['inflight_kb']} KB in flight per SM, below the floor of {INFLIGHT_FLOOR_KB}"
            )
    return out


def table(rows) -> str:
    head = "| kernel | dtype | flags | BLOCK | stages | warps | regs | spills (B) | STL+LDL | stack (B) | smem (B) | programs/SM | warps/SM | KB in flight/SM | global loads (SASS) | MUFU (SASS) | first case |"
    lines = [head, "|" + "---|" * 17]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["flags"], str(r["block"]))):
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['flags']} | {r['block']} | {r['stages']} | {r['warps']} | "
            f"{r['regs']} | {r['spill']} | {r['spill_ops']} | {r['stack']} | {r['shared']} | {r['programs']} | "
            f"{r['programs'] * r['warps']} | {r['inflight_kb'] or '-'} | {r['loads']} | {r['mufu']} | {r['case']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--check", action="store_true", help="exit 1 on a spill, an occupancy floor or no pipeline"
    )
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    rows = compile_all()
    text = (
        f"triton {triton.__version__}, target sm_90 (compiled without a GPU), {len(rows)} variants; "
        f"floors: {STREAM_WARPS_FLOOR} warps/SM for streaming kernels, {OTHER_WARPS_FLOOR} for the others\n\n"
        + table(rows)
    )
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    bad = problems(rows)
    for line in bad:
        print("BUDGET:", line, file=sys.stderr)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
