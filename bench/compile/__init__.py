"""Ahead-of-time compiles of the Triton step kernels, for GPUs this machine does not have.

Split by job, imports flowing one way (``variants`` <- ``capture`` <- ``sass`` <- ``compiler``
<- ``report``):

- ``variants``: every kernel specialisation the launchers can pick, and the named subsets.
- ``capture``: a variant's launch recorded from its launcher (``JITFunction.run`` patched) and
  turned into triton's ``ASTSource`` and options, as the JIT would specialise it.
- ``sass``: what the compiled code says: ``ptxas -v`` log, PTX, SASS by class, and the
  executed warp-instructions per cell from the SASS control flow.
- ``compiler``: one compile measured (``Result`` and its checks) and the pool of spawned
  compile processes.
- ``report``: the command line (``python -m bench.compile.report``), tables, CSV and JSON.
"""



