"""Compile xloss's Triton kernels for real GPUs (no GPU needed) and report their resources.

Run: ``python benchmarks/triton_resources.py [--quick | --all] [--arch 80 90]
[--json out.json]``.

Every specialisation of the cross-entropy row kernel and of the in-place backward's row
scaling (``xloss.ops.triton.cross_entropy``) and of the vocab-parallel kernels
(``xloss.ops.triton.vocab_parallel``: the local partial sums and the local gradient) is
built ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (ptxas ships in
the triton wheel), and ``cuobjdump --dump-resource-usage`` (also in the wheel) reads each
cubin's registers per thread, local memory (where spills go) and stack. A specialisation
is one combination of the logits dtype and the kernel's constexpr options and of the
block shape ``kernel_constants`` picks for the row length.

Default: each dtype x {every option off, every option on, each option on alone} x
{largest single block, looped blocks} x {gradient written, loss only}, and each smaller
single block (1 .. 4096) with every option off and on; the other kernels at every dtype
x block (1 .. 4096) x flags. ``--all``: the full product of the row kernel's options at
the two largest block shapes (3 x 2^6 x 2 x 2 per architecture). ``--quick`` (the test
suite's cold compile, a seventh of the default): every kernel at every dtype with
everything off and on at its largest and smallest blocks, each row-kernel option alone in
bf16, and three smaller row blocks; register pressure grows with the options and the
block, so the default list's maxima are in it.
Compiled kernels are cached by Triton (``~/.triton/cache``): a second run takes seconds.
Exits 1 when any kernel spills or uses more registers than one SM can give its block.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The interpreter replaces triton.jit with a Python runner: compile the real kernels.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xloss.ops.triton import cross_entropy as triton_ce  # noqa: E402
from xloss.ops.triton import vocab_parallel as triton_vp  # noqa: E402

OPTIONS = ("has_weight", "smoothing", "z_loss", "softcap", "row_scale", "store_stats")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
REGISTERS_PER_SM = triton_ce.REGISTERS_PER_SM
MAX_REGISTERS_PER_THREAD = 255


def option_sets(full: bool):
    """Dicts of OPTIONS -> bool: all off, all on, each alone (or the full product)."""
    if full:
        for values in itertools.product((False, True), repeat=len(OPTIONS)):
            yield dict(zip(OPTIONS, values, strict=True))
        return
    yield dict.fromkeys(OPTIONS, False)
    yield dict.fromkeys(OPTIONS, True)
    for name in OPTIONS:
        yield {other: other == name for other in OPTIONS}


def specialisations(full: bool = False, quick: bool = False):
    """(name, kernel, signature, constexprs, launch options) of every kernel launched:
    the cross-entropy rows and the vocab-parallel partial sums and local gradient (per
    dtype, block and flags); ``quick`` the subset described in the module docstring."""
    yield from (quick_row_specialisations() if quick else row_specialisations(full))
    blocks = [2**k for k in range(triton_vp.BLOCK.bit_length())]  # 1 .. 4096
    if quick:
        blocks = [blocks[0], blocks[-1]]
    for dtype, local_classes in itertools.product(DTYPES, blocks):
        yield vocab_gradient_specialisation(dtype, local_classes)
        flag_sets = itertools.product((False, True), repeat=2)
        if quick:
            flag_sets = [(False, False), (True, True)]
        for sum_logits, entropy in flag_sets:
            yield vocab_partials_specialisation(dtype, local_classes, sum_logits, entropy)
    for dtype, num_classes, row_factor in itertools.product(DTYPES, blocks, (False, True)):
        if not quick or num_classes > 1 or (dtype == torch.bfloat16 and row_factor):
            yield scale_rows_specialisation(dtype, num_classes, row_factor)


def scale_rows_specialisation(dtype, num_classes: int, row_factor: bool):
    block = min(triton_ce.LOOP_BLOCK, num_classes)
    constants = dict(ROW_FACTOR=row_factor, BLOCK=block)
    element = DTYPES[dtype]
    signature = {"grad_ptr": f"*{element}", "factor_ptr": "*fp32", "num_classes": "i32",
                 "ROW_FACTOR": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
    name = f"scale rows {element} BLOCK={block}" + (" row_factor" if row_factor else "")
    return name, triton_ce.scale_rows_kernel, signature, constants, triton_ce.launch_options(block)


def vocab_gradient_specialisation(dtype, local_classes: int):
    constants = triton_vp.kernel_constants(local_classes)
    element = DTYPES[dtype]
    signature = {
        "logits_ptr": f"*{element}", "logits_stride": "i64", "grad_ptr": f"*{element}",
        "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32", "local_target_ptr": "*i64",
        "num_classes_ptr": "*fp32", "local_classes": "i32", "label_smoothing": "fp32",
        "z_loss": "fp32", "BLOCK": "constexpr",
    }  # fmt: skip
    name = f"vocab-parallel gradient {element} BLOCK={constants['BLOCK']}"
    options = triton_ce.launch_options(constants["BLOCK"])
    return name, triton_vp.local_gradient_kernel, signature, constants, options


def vocab_partials_specialisation(dtype, local_classes: int, sum_logits: bool, entropy: bool):
    constants = dict(SUM_LOGITS=sum_logits, ENTROPY=entropy,
                     **triton_vp.kernel_constants(local_classes))  # fmt: skip
    element = DTYPES[dtype]
    signature = {
        "logits_ptr": f"*{element}", "logits_stride": "i64", "row_max_ptr": "*fp32",
        "local_target_ptr": "*i64", "partials_ptr": "*fp32", "num_rows": "i32",
        "local_classes": "i32",
    }  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    flags = [key.lower() for key in ("SUM_LOGITS", "ENTROPY") if constants[key]]
    name = f"vocab-parallel partials {element} BLOCK={constants['BLOCK']} " + ",".join(flags)
    options = triton_ce.launch_options(constants["BLOCK"])
    return name, triton_vp.local_partials_kernel, signature, constants, options


LARGEST_ROWS = (triton_ce.SINGLE_BLOCK_MAX, 16 * triton_ce.SINGLE_BLOCK_MAX)
EXTREMES = [dict.fromkeys(OPTIONS, False), dict.fromkeys(OPTIONS, True)]


def row_specialisations(full: bool = False):
    """The row kernels ``launch`` can start: the option sets at the largest single block
    and at the looped block, and every smaller single block with all options off and on."""
    smaller = [2**k for k in range(triton_ce.SINGLE_BLOCK_MAX.bit_length() - 1)]  # 1 .. 4096
    yield from row_cases(itertools.chain(
        itertools.product(DTYPES, list(option_sets(full)), LARGEST_ROWS, (True, False)),
        itertools.product(DTYPES, EXTREMES, smaller, (True, False)),
    ))  # fmt: skip


def quick_row_specialisations():
    """The ``--quick`` subset of :func:`row_specialisations`."""
    alone = list(option_sets(False))[2:]
    yield from row_cases(itertools.chain(
        itertools.product(DTYPES, EXTREMES, LARGEST_ROWS, (True, False)),
        itertools.product([torch.bfloat16], alone, LARGEST_ROWS, (True,)),
        itertools.product([torch.bfloat16], EXTREMES[1:], (1, 32, 1024), (True,)),
    ))  # fmt: skip


def row_cases(cases):
    """Row-kernel specialisations of (dtype, options, num_classes, write_grad) cases."""
    for dtype, options, num_classes, write_grad in cases:
        constants, options = triton_ce.kernel_constants(
            num_classes,
            has_weight=options["has_weight"],
            label_smoothing=0.1 if options["smoothing"] else 0.0,
            z_loss=1e-4 if options["z_loss"] else 0.0,
            softcap=30.0 if options["softcap"] else None,
            row_scale=options["row_scale"],
            write_grad=write_grad,
            store_stats=options["store_stats"],
        )
        flags = [key.lower() for key, value in constants.items() if value is True]
        name = f"{DTYPES[dtype]} BLOCK={constants['BLOCK']} " + ",".join(flags)
        yield name, triton_ce.cross_entropy_rows_kernel, row_signature(dtype, constants), \
            constants, options


def row_signature(dtype, constants) -> dict:
    element = DTYPES[dtype]
    signature = {
        "logits_ptr": f"*{element}", "logits_stride": "i64",
        "grad_ptr": f"*{element}", "grad_stride": "i64",
        "target_ptr": "*i64", "scale_ptr": "*fp32", "weight_ptr": "*fp32",
        "weight_sum_ptr": "*fp32", "loss_ptr": "*fp32", "values_ptr": "*fp32",
        "predicted_ptr": "*i64",
        "num_classes": "i32", "class_count": "fp32", "label_smoothing": "fp32",
        "smooth": "fp32", "z_loss": "fp32", "softcap": "fp32",
    }  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    return signature


def compile_kernel(kernel, signature, constants, options, arch):
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(cubin: bytes) -> dict:
    """REG, LOCAL (spills and local arrays), STACK and SHARED from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", handle.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[1]))
    return {key.lower(): int(value) for key, value in found.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="the full product of the options")
    parser.add_argument("--quick", action="store_true", help="the test suite's subset")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows, failures = [], []
    start = time.perf_counter()
    specs = list(specialisations(args.all, args.quick))
    print(f"{len(specs)} specialisations x sm_{', sm_'.join(map(str, args.arch))}")
    print(f"{'arch':5} {'warps':>5} {'regs':>5} {'local':>6} {'stack':>6}  kernel")
    for arch, (name, *spec, options) in itertools.product(args.arch, specs):
        usage = resource_usage(compile_kernel(*spec, options, arch).asm["cubin"])
        num_warps = options["num_warps"]
        row = dict(arch=arch, kernel=name, num_warps=num_warps, **usage)
        rows.append(row)
        threads = 32 * num_warps
        if (
            usage["local"] or usage["stack"] or usage["reg"] > MAX_REGISTERS_PER_THREAD
            or usage["reg"] * threads > REGISTERS_PER_SM
        ):  # fmt: skip
            failures.append(row)
        print(f"sm_{arch:<2} {num_warps:5} {usage['reg']:5} {usage['local']:6} "
              f"{usage['stack']:6}  {name}")  # fmt: skip
    seconds = time.perf_counter() - start
    for arch in args.arch:
        mine = [r for r in rows if r["arch"] == arch]
        regs = [r["reg"] for r in mine]
        spilling = sum(r["local"] > 0 for r in mine)
        print(f"sm_{arch}: registers per thread {min(regs)}-{max(regs)}, {spilling} spilling")
    print(f"{len(rows)} kernels compiled in {seconds:.0f} s; {len(failures)} over budget")
    if args.json:
        names = [name for name, *_ in specs]
        report = dict(specialisations=names, arch=args.arch, rows=rows, failures=failures)
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
