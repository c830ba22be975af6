"""A variant's launch, captured from its launcher and specialised as triton's JIT would.

The launcher is called on CPU tensors of a nominal grid with ``JITFunction.run`` patched to
record the launch instead of running it; triton's own binder then turns the recorded arguments
into the ``ASTSource`` and options (launch configuration from ``kernels/configs.py``: tiles,
warps, register ceiling, hidden chunk, persistent grid).
"""
from __future__ import annotations

import importlib
import os
from typing import Tuple

from bench.compile.variants import ALPHA_CHANNEL, BANK_FILTERS, GRID, PRECISION_NAMES, Variant


def load_kernels():
    """Import ``nca_fast.kernels`` compiled-mode; returns its modules (configs, step_fwd,
    step_bwd, step_bwd_filters).

    ``@triton.jit`` decides at import whether a kernel is a compilable JITFunction or an
    interpreted one (TRITON_INTERPRET), so this runs only in processes that exist to compile
    (the spawned workers of ``bench.compile.compiler.Compiler``), before anything imported
    triton interpreted.
    """
    # The decorator reads TRITON_INTERPRET when a module is executed, triton's own included:
    # unset it for good in this process, which exists only to compile.
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language.standard as tl_standard

    if not isinstance(tl_standard.cdiv, triton.runtime.JITFunction):
        raise RuntimeError("load_kernels: triton was imported with TRITON_INTERPRET=1 in this "
                           "process; compile in a fresh process (bench.compile.compiler)")
    return tuple(importlib.import_module(f"nca_fast.kernels.{m}")
                 for m in ("configs", "step_fwd", "step_bwd", "step_bwd_filters"))


class _Recorder:
    """Patches ``JITFunction.run``: launches are recorded, not run."""

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self.cls, self.orig, self.launches = JITFunction, JITFunction.run, []

        def run(fn, *args, grid, warmup=False, **kwargs):
            self.launches.append((fn, grid, args, kwargs))

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.orig


def record_launch(v: Variant, modules, grid: Tuple[int, int, int] = GRID, step: int = 7,
                  seed: int = 2**40 + 12345):
    """(kernel, grid, args, kwargs) of ``v``: its launcher called on CPU tensors of a
    B x H x W grid (the nominal one by default; the forward as a mid-rollout step, the weight
    kernel with a next step or not)."""
    import torch
    from nca_fast.config import FILTER_BANKS

    from nca_fast.kernels.spec import StepSpec

    configs, step_fwd, step_bwd, step_bwd_filters = modules
    B, H, W = grid
    C, HID, F_ = v.channels, v.hidden or 32, v.filters
    prec = PRECISION_NAMES[v.precision]
    if v.bank == 4:                                     # taps per channel
        filt = torch.full((F_, 9, C), 0.5)
    else:
        filt = (torch.tensor(FILTER_BANKS[BANK_FILTERS[v.bank]]) if v.bank else
                torch.full((F_, 3, 3), 0.5)).reshape(F_, 9)
    r, g = torch.zeros(B, H, W, C), torch.zeros(B, H, W, C)
    w1k, b1, w2t, b2 = (torch.zeros(F_, C, HID), torch.zeros(HID), torch.zeros(HID, C),
                        torch.zeros(C))
    cw = torch.zeros(B, H, W, dtype=torch.int16)
    kw = dict(padding=v.padding, precision=prec, bank=v.bank)
    orig, target = configs.needs_int64, configs.TARGET_CAPABILITY
    configs.needs_int64 = lambda *a: v.int64       # the switch alone, at the nominal size
    configs.TARGET_CAPABILITY = divmod(v.arch, 10)  # the variant's arch's choices
    try:
        with _Recorder() as rec:
            if v.kernel == "fwd":
                q = step_fwd.hq_plane(B, H, W, "cpu") if v.has_q else None
                step_fwd.nca_step_fwd(r, q, w1k, b1, w2t, b2, filt, seed=seed, step=step,
                                      fire_threshold=1 << 23,
                                      alive_threshold=0.1 if v.alive else None,
                                      alpha_channel=ALPHA_CHANNEL, padding=v.padding,
                                      precision=prec, named_bank=v.bank, cw_out=cw)
            elif v.kernel == "bwd_gp":
                step_bwd.bwd_gp(r, cw, g, w1k, b1, w2t, filt, **kw)
            elif v.kernel == "bwd_weights":
                parts = step_bwd.new_parts(B, H, W, C, HID, F_, "cpu", prec)
                nxt = (torch.zeros(B, H + 2, W + 2, F_, C), cw, g) if v.next else None
                step_bwd.bwd_weights(r, cw, g, parts, w1k, b1, w2t, filt, next_step=nxt, **kw)
            elif v.kernel == "bwd_input":
                step_bwd.bwd_input(torch.zeros(B, H + 2, W + 2, F_, C), cw, g, filt, (B, H, W, C),
                                   padding=v.padding, bank=v.bank)
            else:
                parts = step_bwd_filters.new_filter_parts(B, H, W, C, F_, "cpu")
                step_bwd_filters.bwd_filters(r, cw, torch.zeros(B, H + 2, W + 2, F_, C), parts,
                                             spec=StepSpec(padding=v.padding))
    finally:
        configs.needs_int64, configs.TARGET_CAPABILITY = orig, target
    if len(rec.launches) != 1:
        raise RuntimeError(f"{v.label()}: the launcher made {len(rec.launches)} launches")
    return rec.launches[0]


def specialise(launch, arch: int):
    """(ASTSource, options dict, bound arguments) of a recorded launch, as triton's JIT builds
    them (its binder and ``_pack_args``)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, grid, args, kwargs = launch
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs, debug=False,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, dict(bound)


def grid_size(grid, bound) -> Tuple[int, int, int]:
    g = grid(bound) if callable(grid) else grid
    g = tuple(int(x) for x in g) + (1, 1)
    return g[0], g[1], g[2]
