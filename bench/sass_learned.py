"""shared/tools/sass_count.py on the default model with learned filters.

The tool measures the default model's step through ``nca_fast.functional.rollout``; this runs it
with that function wrapped so that the filters it is given need a gradient (a learned bank: the
taps read as data and the filters' gradient kernel launched), as ``learn_filters="shared"``
does, or, with ``--depthwise``, as per-channel taps ``[F, C, 3, 3]`` (``"depthwise"``)::

    python -m bench.sass_learned ../shared/tools/sass_count.py [--depthwise] [tool options]

The tool's last line is printed as it prints it (bench/NOTES.md, section 8, has the figures).
"""
from __future__ import annotations

import functools
import os
import runpy
import sys


def learned(rollout, depthwise: bool):
    """``rollout`` with its filters replaced by a leaf that needs a gradient."""
    @functools.wraps(rollout)
    def wrapped(x, w1, b1, w2, b2, filters, **kwargs):
        taps = filters.detach().reshape(filters.shape[0], 3, 3)
        if depthwise:
            taps = taps[:, None].repeat(1, x.shape[1], 1, 1)
        return rollout(x, w1, b1, w2, b2, taps.clone().requires_grad_(True), **kwargs)
    return wrapped


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit("usage: python -m bench.sass_learned PATH/sass_count.py [--depthwise] "
                         "[tool options]")
    tool = argv.pop(0)
    depthwise = "--depthwise" in argv
    argv = [a for a in argv if a != "--depthwise"]
    # the tool compiles: triton must not be imported in interpreter mode (it reads the variable
    # on import), and nca_fast imports it
    os.environ.pop("TRITON_INTERPRET", None)
    from nca_fast import functional

    functional.rollout = learned(functional.rollout, depthwise)
    sys.argv = [tool, "--via", "rollout", *argv]
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    main()
