"""What the compiler makes of the fused RoPE attention kernels, without a GPU: SASS instruction mix of each loop,
registers, spills, shared memory and resident blocks per SM, with the rotation on and off.

Each kernel is compiled ahead of time exactly as a launch on that GPU would compile it (tests/triton_aot.py: the
launchers' real arguments, specialisation and `ops/triton_configs.py` tile configuration), disassembled with the
`cuobjdump` bundled with Triton, and split at its backward branches into prologue, loops and epilogue. The rotation
lives in the forward's prologue (once per Q tile) and in the dQ epilogue, so the K loops of RoPE on and off should be
the same loop; the question this answers is whether they are.

Counted per attention loop body (the innermost loops holding MMAs; instructions per thread per iteration):
tensor-core MMAs (HMMA/HGMMA/UTCMMA), MUFU (exp2, sin, cos), FP32 FMA-pipe work (FFMA/FMUL/FADD), LDSM (ldmatrix),
LDGSTS (cp.async), generic loads (LDG/LDS/LD), local memory (LDL/STL: spills), total. Resident blocks per SM from
registers (allocated per warp in units of 256), shared memory (+1 KB reserved per block) and the family's thread and
block limits.

    python benchmarks/static_analysis.py                      # sm_90, bf16, head_dim 128 (the checked target)
    python benchmarks/static_analysis.py --arch 80 --dtype fp16 --head-dim 64 --output /tmp/static

Writes static_analysis.json and static_analysis.md to --output (default benchmarks/results/static/). Must run
without TRITON_INTERPRET.

    python benchmarks/static_analysis.py --matrix             # resources.md/.json: every kernel of the AOT matrix

`--matrix`: for every case of the compile matrix (tests/triton_aot.py, which CI checks) on sm_80, sm_86, sm_90 and
sm_100: each kernel's launch configuration, registers, spill bytes, stack, shared memory and resident blocks per SM.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the AOT compiler of the kernels (tests/triton_aot.py)
sys.path.insert(0, str(ROOT))

import triton_aot  # noqa: E402

# SM limits per compute-capability family: (registers, shared bytes, threads, blocks) per SM
SM_LIMITS = {"sm80": (65536, 167936, 2048, 32), "sm86": (65536, 102400, 1536, 16),
             "sm90": (65536, 233472, 2048, 32), "sm100": (65536, 233472, 2048, 32)}
CATEGORIES = {
    "mma": ("HMMA", "HGMMA", "UTCHMMA", "UTCQMMA", "UTCMMA", "UTCIMMA"),
    "mufu": ("MUFU",),
    "fma_pipe": ("FFMA", "FMUL", "FADD"),
    "ldsm": ("LDSM",),
    "ldgsts": ("LDGSTS",),
    "generic_ld": ("LDG", "LDS", "LD"),
    "local": ("LDL", "STL"),
}
_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]*)?\s*([^;]*);")


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every SASS instruction."""
    return [(int(m.group(1), 16), m.group(2), m.group(4)) for m in map(_LINE.match, sass.splitlines()) if m]


def loops(code: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last address) of each loop: a branch back to an earlier address closes one."""
    found = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            found.append((int(target.group(1), 16), address))
    return found


def mma_loops(code: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """The attention loops: the innermost loops holding tensor-core MMAs (not, e.g., the argument-reduction loops of
    libdevice's precise sin/cos, nor a GQA loop around a Q loop), in address order."""
    def has_mma(span):
        return any(span[0] <= a <= span[1] and op in CATEGORIES["mma"] for a, op, _ in code)

    spans = [span for span in loops(code) if has_mma(span)]
    return sorted(span for span in spans
                  if not any(o != span and span[0] <= o[0] and o[1] <= span[1] for o in spans))


def mix(code: list[tuple[int, str, str]]) -> dict[str, int]:
    counts = collections.Counter(opcode for _, opcode, _ in code)
    row = {name: sum(counts[op] for op in ops) for name, ops in CATEGORIES.items()}
    row["total"] = len(code)
    return row


def blocks_per_sm(registers: int, shared: int, num_warps: int, family: str) -> int:
    max_registers, max_shared, max_threads, max_blocks = SM_LIMITS[family]
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = max_registers // (per_warp * num_warps)
    by_shared = max_shared // (shared + 1024) if shared else max_blocks
    return min(by_registers, by_shared, max_threads // (32 * num_warps), max_blocks)


def arch_family(arch: int) -> str:
    """The configuration family (ops/triton_configs.py) of sm_<arch>."""
    from ctxext_kernels.ops import triton_configs

    return triton_configs.family(divmod(arch, 10))


def analyze(report: dict, family: str) -> dict:
    """Static numbers of one compiled kernel (a triton_aot.compile_launch report) on a GPU of `family`."""
    code = instructions(report["sass"])
    spans = mma_loops(code)
    first = spans[0][0] if spans else code[-1][0] + 1
    last = spans[-1][1] if spans else code[-1][0]
    return dict(
        kernel=report["name"], registers=report["registers"], spill_bytes=report["spill_bytes"],
        stack=report["stack"], local_ops=report["local_ops"], shared=report["shared"], num_warps=report["num_warps"],
        blocks_per_sm=blocks_per_sm(report["registers"], report["shared"], report["num_warps"], family),
        prologue=mix([i for i in code if i[0] < first]),
        loops=[mix([i for i in code if lo <= i[0] <= hi]) for lo, hi in spans],
        epilogue=mix([i for i in code if i[0] > last]),
    )


def run(arch: int, dtype: str, head_dim: int, causal: bool = True) -> list[dict]:
    """Forward, dQ and dK/dV with RoPE on and off, each analysed."""
    case = triton_aot.AttentionCase(dtype, head_dim, causal=causal)
    family = arch_family(arch)
    rows = []
    for rotate in (True, False):
        launches = triton_aot.record(lambda: triton_aot.attention_launch(case, rotate=rotate), arch)
        for launched in launches:
            row = analyze(triton_aot.compile_launch(*launched, arch), family)
            config = {key: launched[2][key] for key in ("BLOCK_M", "BLOCK_N", "num_stages")}
            config["stack_budget"] = triton_aot.stack_budget(row["kernel"], case, arch)
            rows.append(dict(arch=arch, dtype=dtype, head_dim=head_dim, causal=causal, rope=rotate, **config, **row))
    return rows


def summary(rows: list[dict]) -> dict:
    """The checked numbers: each kernel's first (unmasked, main) loop body with RoPE on over RoPE off."""
    by_key = {(r["kernel"], r["rope"]): r for r in rows}
    out = {}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        on, off = by_key[(kernel, True)], by_key[(kernel, False)]
        out[kernel] = dict(
            main_loop_ratio=on["loops"][0]["total"] / off["loops"][0]["total"],
            rope_extra_outside_loops=(on["prologue"]["total"] + on["epilogue"]["total"]
                                      - off["prologue"]["total"] - off["epilogue"]["total"]),
            spill_free=all(not r["spill_bytes"] and not r["local_ops"] and not r["stack"] for r in (on, off)),
            # a configuration a GPU measurement chose although it spills: its frame within its stack_budget
            within_stack_budget=all(0 < r["stack_budget"] and r["stack"] <= r["stack_budget"] for r in (on, off)),
            blocks_per_sm=on["blocks_per_sm"])
    return out


def markdown(rows: list[dict], checked: dict) -> str:
    head = rows[0]
    lines = [f"# Static analysis: sm_{head['arch']}, {head['dtype']}, head_dim {head['head_dim']}, "
             f"{'causal' if head['causal'] else 'full'}", "",
             "Instructions per thread (SASS). Loops: per iteration; the first loop is the unmasked main loop, the "
             "second the masked diagonal / ragged-end blocks.", "",
             "| kernel | RoPE | BM x BN, warps, stages | regs | spill B | smem B | blocks/SM | prologue | loop 1: "
             "total / MMA / MUFU / FMA-pipe / LDSM / LDGSTS / LD | loop 2 total | epilogue |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        main = r["loops"][0] if r["loops"] else collections.defaultdict(int)
        second = r["loops"][1]["total"] if len(r["loops"]) > 1 else "-"
        lines.append(f"| {r['kernel']} | {'on' if r['rope'] else 'off'} | {r['BLOCK_M']} x {r['BLOCK_N']}, "
                     f"{r['num_warps']}, {r['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['shared']} | "
                     f"{r['blocks_per_sm']} | {r['prologue']['total']} | {main['total']} / {main['mma']} / "
                     f"{main['mufu']} / {main['fma_pipe']} / {main['ldsm']} / {main['ldgsts']} / "
                     f"{main['generic_ld']} | {second} | {r['epilogue']['total']} |")
    lines += ["", "| kernel | main loop RoPE on / off | RoPE's extra instructions outside the loops | spill-free | "
              "stack within its measured budget | blocks/SM |", "|---|---|---|---|---|---|"]
    for kernel, c in checked.items():
        lines.append(f"| {kernel} | {c['main_loop_ratio']:.3f} | {c['rope_extra_outside_loops']} | "
                     f"{c['spill_free']} | {c['within_stack_budget']} | {c['blocks_per_sm']} |")
    return "\n".join(lines) + "\n"


def matrix(archs=triton_aot.ARCHS) -> list[dict]:
    """Resources of every kernel of every AOT case (tests/triton_aot.py) per arch."""
    rows = []
    for arch in archs:
        family = arch_family(arch)
        for case in triton_aot.CASES:
            for report in triton_aot.compile_case(case, arch):
                launched = report["launch"]
                rows.append(dict(arch=arch, case=case, kernel=report["name"],
                                 tiles=" x ".join(str(launched[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T", "BLOCK_H")
                                                  if k in launched),
                                 num_warps=report["num_warps"], num_stages=launched.get("num_stages"),
                                 registers=report["registers"], spill_bytes=report["spill_bytes"],
                                 stack=report["stack"], shared=report["shared"],
                                 blocks_per_sm=blocks_per_sm(report["registers"], report["shared"],
                                                             report["num_warps"], family)))
    return rows


def matrix_markdown(rows: list[dict]) -> str:
    lines = ["# Resources of every Triton kernel on the compile matrix (tests/triton_aot.py)", "",
             "`python benchmarks/static_analysis.py --matrix`. Compiled ahead of time with the launchers' real "
             "arguments and `ops/triton_configs.py` configurations. Spill bytes from `ptxas -v` (None: served from "
             "Triton's cache, no ptxas log; the stack column and CI's SASS check still cover spills).", "",
             "| sm | case | kernel | tiles (attention: BM x BN; RoPE: tokens x heads) | warps | stages | regs | "
             "spill B | stack B | smem B | blocks/SM |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['case']} | {r['kernel']} | {r['tiles'] or '-'} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['stack']} | {r['shared']} | "
                     f"{r['blocks_per_sm']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=sorted(triton_aot.DTYPES))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "static")
    parser.add_argument("--matrix", action="store_true", help="resources of every kernel of the AOT compile matrix")
    args = parser.parse_args(argv)
    if args.matrix:
        rows = matrix()
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "resources.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.output / "resources.md").write_text(matrix_markdown(rows))
        return {}
    rows = run(args.arch, args.dtype, args.head_dim)
    checked = summary(rows)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "static_analysis.json").write_text(json.dumps(dict(rows=rows, summary=checked), indent=1) + "\n")
    (args.output / "static_analysis.md").write_text(markdown(rows, checked))
    print(markdown(rows, checked))
    return checked


if __name__ == "__main__":
    main()
