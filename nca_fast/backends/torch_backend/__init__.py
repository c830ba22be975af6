"""The torch backend: the NCA step in PyTorch ops, rewritten for a CPU's caches, on any device.

The reference (``nca_fast.reference``) states each step as the common PyTorch port does: a
depthwise convolution, two 1x1 convolutions over every cell, a full-grid mask multiply, max-pools.
This package computes the same numbers with far less work:

* Layout. The state is kept between steps as a padded channels-last grid ``B x (H+2) x (W+2) x C``
  (a cell's C channels contiguous, a one-cell halo that is zero, wraps, or copies the edge cells
  for replicate and reflect padding), so a 3x3 neighbour is a fixed row offset and the dense
  layers are plain ``cells x C`` matmuls. The backward folds the halo's gradient back onto the
  cells it copies.
* Only the cells that matter are computed: those whose mask fires within one cell of a live
  (pre-alive) cell. Any other cell's update is zeroed by the alive mask and reaches no survivor's
  post-alive max-pool. At fire_rate 0.5 that is at most half the grid. The cells are gathered by
  index and the MLP runs on them alone, in row chunks small enough that the ``cells x hidden``
  activations stay in L2; relu is an in-place clamp on the chunk.
* Perception without a convolution. Each 3x3 filter is split into row patterns (a horizontal
  pass shared between filters, e.g. Sobel-x's [-1, 0, 1] and Sobel-y's [1, 2, 1]) and a vertical
  pass, each one or two full-grid adds with contiguous inner runs. A filter that is a pure shift
  (the identity) costs nothing: its band is gathered straight from the state. The filter's scale
  (Sobel's 1/8) is folded into the first layer's weights, permuted band-major, so the first
  layer is one K = F*C matmul on the gathered bands.
* Learned filters (``config.learn_filters``: ``params.filters`` F x 3 x 3 or F x C x 3 x 3) have
  no plan: the 9 neighbours of the computed cells are gathered and perceived chunk by chunk (a
  small matmul for shared filters, broadcast multiply-adds over the channels for depthwise
  ones), in the same band-major order; the backward gathers them again from the step's saved
  input for the filters' gradient, summed chunk by chunk in a fixed order.
* Masks. All update masks of a rollout come from one vectorised Philox pass over a (step, cell)
  grid (``update_masks``), bit-identical to ``nca_fast.rng.update_mask`` (docs/MODEL.md,
  "Update masks").
* Threads. The batch is split into up to ``torch.get_num_threads()`` parts, each run start to
  end by a worker thread whose torch ops are single-threaded: images are independent, so a
  forward or backward pass joins once instead of meeting an OpenMP barrier at every op.
* Backward. The whole rollout is one autograd node with a handwritten backward: the gathered
  bands and hidden activations of the computed cells are saved (far less than autograd keeps for
  the port), weight gradients are accumulated chunk by chunk in a fixed order (deterministic),
  and perception's adjoint replays the same passes transposed. With ``segment=k`` only each
  segment's first state is kept and the segment is recomputed by the same code, so gradients
  are bitwise those of the run without checkpoints.

No ``torch.compile``: bench/NOTES_cpu.md holds the measurements behind these choices.

The files: ``masks`` (the update masks), ``perception`` (the filters' plan and ``Plan``, what a
rollout's steps share: perception and its adjoint, alive masks, the halo), ``step`` (one step
and its backward, the MLP in chunks), ``rollout`` (threads, the plan cache, the autograd
Function and the backend interface).
"""
from .masks import update_masks
from .perception import perception_plan
from .rollout import rollout

__all__ = ["rollout", "update_masks", "perception_plan"]
