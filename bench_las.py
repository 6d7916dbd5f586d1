"""Benchmark LaS attention against plain attention: correctness first, then time and peak memory.

    python bench_las.py                      # CPU: fp32, B=1, H=8, D=32, L = 1024, 4096, 16384
    python bench_las.py --lengths 4096 --json bench.jsonl

For each length and path it times the forward pass and forward+backward, the median of --repeats runs
after --warmup runs, and measures the peak memory above the inputs. Then it prints one table with the
ratios to plain materialized attention and to F.scaled_dot_product_attention (SDPA). The paths:

    plain      softmax(q k^T / sqrt(D)) v written out (materializes the L x L matrix)
    sdpa       torch.nn.functional.scaled_dot_product_attention
    reference  las_attention_reference (materializes and smooths the attention matrix)
    fast       las_attention (smooths value; fused decay and softmax)
    compiled   torch.compile(las_attention)
    fused      las_attention_flex (FlexAttention; forward only on CPU, where it has no backward)
    chunk      las_attention with chunk_size (LaS-chunk, O(L * C))

A path whose estimated memory exceeds --max-memory-gb at some length is skipped there and listed as
such. Peak memory: on CUDA, torch.cuda.max_memory_allocated; on CPU (Linux), the rise of the process's
peak resident set size (VmHWM, reset before each measurement), which includes allocator slack.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import las

PATHS = ("plain", "sdpa", "reference", "fast", "compiled", "fused", "chunk")


@dataclass
class Row:
    """One measured (path, length) pair; times in milliseconds, memory in MiB, None when not run."""

    path: str
    length: int
    forward_ms: Optional[float]
    train_ms: Optional[float]  # forward + backward
    peak_mib: Optional[float]  # forward + backward, or forward where there is no backward
    max_error: Optional[float]  # forward output against las_attention_reference (plain/sdpa: none)
    note: str = ""


# ----------------------------------------------------------------------------------------------------
# The paths


def plain_attention(q, k, v):
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    return torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, L, D)


def make_paths(alphas: torch.Tensor, pool_size: int, chunk_size: int) -> dict[str, Callable]:
    compiled = las._get_compiled_las_attention()  # the same compiled function as backend="compile"
    return {
        "plain": plain_attention,
        "sdpa": F.scaled_dot_product_attention,
        "reference": lambda q, k, v: las.las_attention_reference(q, k, v, alphas, pool_size=pool_size),
        "fast": lambda q, k, v: las.las_attention(q, k, v, alphas, pool_size=pool_size),
        "compiled": lambda q, k, v: compiled(q, k, v, alphas, pool_size=pool_size),
        "fused": lambda q, k, v: las.las_attention_flex(q, k, v, alphas, pool_size=pool_size),
        "chunk": lambda q, k, v: las.las_attention(q, k, v, alphas, pool_size=pool_size, chunk_size=chunk_size),
    }


def estimated_bytes(path: str, batch: int, heads: int, length: int, dim: int, chunk: int, elem: int) -> int:
    """Estimate the peak memory of forward+backward: how many L x L (or L x C) tensors are alive at once."""
    matrix = batch * heads * length * length * elem
    vectors = 16 * batch * heads * length * dim * elem
    live_matrices = {"plain": 4, "reference": 6, "fast": 2, "compiled": 4}  # fast: scores and their gradient
    if path in live_matrices:
        return live_matrices[path] * matrix + vectors
    if path == "chunk":
        return 4 * batch * heads * length * min(chunk, length) * elem + vectors
    return vectors  # sdpa and fused keep no L x L tensor


# ----------------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager measuring the peak memory allocated inside it, in MiB (None if unavailable)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: Optional[float] = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            # Writing 5 resets the peak resident set size (Linux 4.0 and newer).
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.start = _read_status_kib("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start is not None:
            peak = _read_status_kib("VmHWM")
            self.mib = None if peak is None else (peak - self.start) / 1024
        return False


def use_mmap_for_large_allocations() -> None:
    """Make glibc return every large tensor's memory to the system when freed (Linux only).

    glibc raises its mmap threshold after large frees and then serves later tensors from pages it kept,
    which would hide them from the resident-set measurement. A fixed threshold of 64 KiB avoids that.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 64 * 1024)
    except (OSError, AttributeError):
        pass


def median_ms(run: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(name, fn, q, k, v, device, warmup, repeats, can_train) -> tuple:
    """Return (forward ms, forward+backward ms, peak MiB) of one path."""

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def train():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    forward_ms = median_ms(forward, device, warmup, repeats)
    train_ms = median_ms(train, device, warmup, repeats) if can_train else None
    with PeakMemory(device) as peak:
        train() if can_train else forward()
        synchronize(device)
    return forward_ms, train_ms, peak.mib


def max_error(fn, q, k, v, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return (fn(q, k, v).float() - reference.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# Report


def hardware_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def format_number(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(value: Optional[float], base: Optional[float]) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'path':<10} {'L':>6} {'fwd ms':>10} {'fwd+bwd ms':>11} {'peak MiB':>9} "
        f"{'fwd/plain':>9} {'fwd/sdpa':>8} {'train/plain':>11} {'train/sdpa':>10} {'mem/plain':>9} {'max err':>8}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        same_length = {r.path: r for r in rows if r.length == row.length}
        plain, sdpa = same_length.get("plain"), same_length.get("sdpa")
        print(
            f"{row.path:<10} {row.length:>6} {format_number(row.forward_ms):>10} {format_number(row.train_ms):>11} "
            f"{format_number(row.peak_mib, 0):>9} "
            f"{ratio(row.forward_ms, plain and plain.forward_ms):>9} {ratio(row.forward_ms, sdpa and sdpa.forward_ms):>8} "
            f"{ratio(row.train_ms, plain and plain.train_ms):>11} {ratio(row.train_ms, sdpa and sdpa.train_ms):>10} "
            f"{ratio(row.peak_mib, plain and plain.peak_mib):>9} "
            f"{'-' if row.max_error is None else f'{row.max_error:.1e}':>8}  {row.note}"
        )


def print_targets(rows: list[Row]) -> None:
    """Print the ratios the project tracks (CPU targets at L = 4096 and the chunk scaling)."""
    by_key = {(r.path, r.length): r for r in rows}

    def get(path, length, field):
        row = by_key.get((path, length))
        return None if row is None else getattr(row, field)

    lines = []
    plain, fast, reference = get("plain", 4096, "train_ms"), get("fast", 4096, "train_ms"), get("reference", 4096, "train_ms")
    if plain and fast:
        lines.append(f"  L=4096 fwd+bwd: fast / plain = {fast / plain:.2f}")
    if reference and fast:
        lines.append(f"  L=4096 fwd+bwd: reference / fast = {reference / fast:.2f} (fast is this many times faster)")
    plain_mem, fast_mem = get("plain", 4096, "peak_mib"), get("fast", 4096, "peak_mib")
    if plain_mem and fast_mem:
        lines.append(f"  L=4096 peak memory: fast / plain = {fast_mem / plain_mem:.2f}")
    chunk_4k, chunk_16k = get("chunk", 4096, "train_ms"), get("chunk", 16384, "train_ms")
    if chunk_4k and chunk_16k:
        lines.append(f"  chunk fwd+bwd: L=16384 / L=4096 = {chunk_16k / chunk_4k:.2f} (linear scaling gives 4)")
    full_16k = get("fast", 16384, "train_ms")
    if full_16k and chunk_16k:
        lines.append(f"  L=16384 fwd+bwd: fast (full) / chunk = {full_16k / chunk_16k:.2f}")
    fused_fwd, chunk_fwd = get("fused", 16384, "forward_ms"), get("chunk", 16384, "forward_ms")
    if fused_fwd and chunk_fwd:
        lines.append(f"  L=16384 forward: fused (full LaS) / chunk = {fused_fwd / chunk_fwd:.2f}")
    if lines:
        print("\nKey ratios")
        print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="sequence lengths L (default: 1024 4096 16384)")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--heads", type=int, default=8, help="number of heads H")
    parser.add_argument("--head-dim", type=int, default=32, help="head dimension D")
    parser.add_argument("--pool-size", type=int, default=3, help="smoothing window P")
    parser.add_argument("--chunk-size", type=int, default=256, help="chunk length C of the chunk path")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, help="paths to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip a path whose estimated peak exceeds this (default: 60%% of RAM or GPU memory)")
    parser.add_argument("--json", metavar="PATH", help="also write one JSON record per row to PATH")
    args = parser.parse_args(argv)
    positive = {"--lengths": min(args.lengths), "--batch": args.batch, "--heads": args.heads,
                "--head-dim": args.head_dim, "--chunk-size": args.chunk_size, "--repeats": args.repeats}
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.pool_size < 1 or args.pool_size % 2 == 0:
        parser.error(f"--pool-size must be a positive odd integer, got {args.pool_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested, but torch finds no CUDA device; use --device cpu")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: folder {os.path.dirname(os.path.abspath(args.json))} does not exist")
    return args


def memory_budget(device: torch.device, requested_gb: Optional[float]) -> float:
    if requested_gb is not None:
        return requested_gb * 2**30
    if device.type == "cuda":
        return 0.6 * torch.cuda.get_device_properties(device).total_memory
    try:
        return 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
    elif device.type == "cuda":
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    budget = memory_budget(device, args.max_memory_gb)
    if device.type == "cpu":
        use_mmap_for_large_allocations()
    elem = torch.empty((), dtype=dtype).element_size()
    alphas = las.alpha_schedule(args.heads).to(device)
    paths = make_paths(alphas, args.pool_size, args.chunk_size)

    print(f"bench_las.py: {hardware_line(device)}")
    print(
        f"B={args.batch} H={args.heads} D={args.head_dim} P={args.pool_size} C={args.chunk_size} "
        f"dtype={str(dtype).replace('torch.', '')} warmup={args.warmup} repeats={args.repeats} (median)\n"
    )

    rows: list[Row] = []
    for length in args.lengths:
        generator = torch.Generator().manual_seed(length)
        shape = (args.batch, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_() for _ in range(3))

        # correctness first: every LaS path against the reference, where the reference fits
        reference = None
        if estimated_bytes("reference", args.batch, args.heads, length, args.head_dim, args.chunk_size, elem) <= budget:
            with torch.no_grad():
                reference = las.las_attention_reference(q, k, v, alphas, pool_size=args.pool_size)
        chunk_reference = None
        if "chunk" in args.paths:
            with torch.no_grad():
                chunk_reference = las.las_attention_reference(
                    q, k, v, alphas, pool_size=args.pool_size, chunk_size=args.chunk_size
                )

        for name in args.paths:
            need = estimated_bytes(name, args.batch, args.heads, length, args.head_dim, args.chunk_size, elem)
            if need > budget:
                note = f"skipped: needs about {need / 2**30:.0f} GiB, budget {budget / 2**30:.0f} GiB"
                rows.append(Row(name, length, None, None, None, None, note))
                print(f"L={length:<6} {name:<10} {note}", flush=True)
                continue
            fn = paths[name]
            can_train = not (name == "fused" and device.type == "cpu")
            error = None
            if name == "chunk":
                error = max_error(fn, q, k, v, chunk_reference)
            elif name not in ("plain", "sdpa") and reference is not None:
                error = max_error(fn, q, k, v, reference)
            started = time.perf_counter()
            forward_ms, train_ms, peak_mib = measure(name, fn, q, k, v, device, args.warmup, args.repeats, can_train)
            note = "" if can_train else "forward only: no FlexAttention backward on CPU"
            rows.append(Row(name, length, forward_ms, train_ms, peak_mib, error, note))
            print(
                f"L={length:<6} {name:<10} fwd {forward_ms:9.1f} ms  fwd+bwd {format_number(train_ms):>9} ms  "
                f"max err {'-' if error is None else f'{error:.1e}'}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        del q, k, v, reference, chunk_reference
        gc.collect()

    print()
    print_table(rows)
    print_targets(rows)
    if args.json:
        with open(args.json, "w") as out:
            for row in rows:
                record = asdict(row)
                record.update(device=device.type, dtype=str(dtype), batch=args.batch, heads=args.heads,
                              head_dim=args.head_dim, hardware=hardware_line(device))
                out.write(json.dumps(record) + "\n")
        print(f"\nwrote {len(rows)} records to {args.json}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
