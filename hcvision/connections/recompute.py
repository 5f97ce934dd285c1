"""Opt-in recompute of the stream mixing (``build_connection(..., recompute=True)``).

Why. Without recompute every sublayer keeps, for backward, the streams ``H`` entering it (``n c`` per token, saved by
the width mix) on top of what the Pre-Norm residual network keeps. The HC paper (arXiv 2409.19606, App. B) counts this
as ``2 n s b d L`` extra activation memory and notes that the hidden streams can be discarded and recomputed, leaving
``n s b d``. mHC (arXiv 2512.24880, Sec. 4.3.2, Table 3 and Eq. 20) does exactly that: the mixing kernels' activations
are dropped after forward and recomputed in backward *without* the branch F; only the block input ``x_{l0}`` (``n C``)
is stored once every ``L_r`` layers, plus each branch output ``F(.)`` (``C``) every layer.

What is kept here, per sublayer ``l`` (width ``h_l = A_in^T H_l``, depth ``H_{l+1} = A_r^T H_l + B^T y_l``):

* the branch output ``y_l`` (``C`` per token; the residual network keeps its own stream ``x_l`` instead, so this costs
  nothing extra);
* ``H_l`` only at a segment start (every ``recompute_every`` sublayers; the first one is ``expand_streams(x)``, a view
  of the embedding, which the residual network keeps anyway);
* nothing else stream- or coefficient-sized: the branch input ``h_l``, which the branch's Pre-Norm would save, is
  replaced by a recompute marker through ``saved_tensors_hooks`` (composed with any hooks already active), and the
  dynamic coefficients (DHC Eqs. 10-13, mHC Eqs. 7-9) are recomputed from ``H_l``.

In backward, the first sublayer of a segment to need its streams replays the depth steps from the segment's stored
input (``H_{j+1} = A_r^T H_j + B^T y_j``, no branch), caching the segment's streams; each is freed when its sublayer's
backward is done. That cache is the transient ``n C L_r`` term of mHC Eq. 20, which is why ``L_r`` is an option: small
``L_r`` stores more segment inputs, large ``L_r`` has a bigger transient peak in backward.

Forward results are bitwise those of ``recompute=False`` (same code path); backward recomputes with the same ops and the
parameters' current values, so (as with any checkpointing) do not change parameters between forward and backward.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["recompute_forward", "StreamRecipe"]

_RECIPE_ATTR = "_hcv_stream_recipe"


class StreamRecipe:
    """How to rebuild the streams ``H_l`` in backward: from a stored anchor, or by one depth step from ``H_{l-1}``."""

    __slots__ = ("anchor_ctx", "prev", "step", "steps", "cache")

    def __init__(self, anchor_ctx=None, prev: "StreamRecipe | None" = None, step: "_Sublayer | None" = None) -> None:
        self.anchor_ctx = anchor_ctx  # ctx of the width Function that saved H (segment start)
        self.prev = prev  # recipe of H_{l-1}
        self.step = step  # the sublayer l-1 whose depth step produced H_l
        self.steps = 0 if prev is None else prev.steps + 1
        self.cache: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        if self.cache is not None:
            return self.cache
        if self.anchor_ctx is not None:
            (H,) = self.anchor_ctx.saved_tensors
        else:
            H_prev = self.prev.materialize()
            H = self.step.replay_depth(H_prev)
        self.cache = H
        return H

    def release(self) -> None:
        self.cache = None


class _Sublayer:
    """Per-call state shared by the width Function, the branch's pack hook and the depth Function of one sublayer."""

    def __init__(self, conn, recipe: StreamRecipe | None, autocast: tuple) -> None:
        self.conn = conn
        self.recipe = recipe  # of H_l (set by the width Function when H_l becomes an anchor)
        self.autocast = autocast
        self.depth_ctx = None  # set by the depth Function (its saved y_l)
        self.forward_ctx = None  # width -> depth hand-over during forward only (then dropped)

    def _autocast(self):
        device, enabled, dtype = self.autocast
        return torch.autocast(device_type=device, enabled=enabled, dtype=dtype)

    def width(self, H: torch.Tensor):
        with self._autocast():
            return self.conn.width(H)

    @torch.no_grad()
    def replay_depth(self, H: torch.Tensor) -> torch.Tensor:
        """``H_{l+1}`` from ``H_l`` and the saved ``y_l`` (no branch)."""
        (y,) = self.depth_ctx.saved_tensors
        _, wctx = self.width(H)
        with self._autocast():
            return self.conn.depth(y, wctx)

    @torch.no_grad()
    def branch_input(self) -> torch.Tensor:
        h_in, _ = self.width(self.recipe.materialize())
        return h_in.contiguous()


def _grads(outputs, inputs, grad_outputs):
    """``torch.autograd.grad`` over the inputs that require grad; ``None`` for the others."""
    live = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    if not live:
        return [None] * len(inputs)
    got = torch.autograd.grad(outputs, [inputs[i] for i in live], grad_outputs, allow_unused=True)
    out: list[torch.Tensor | None] = [None] * len(inputs)
    for i, g in zip(live, got):
        out[i] = g
    return out


class _Width(torch.autograd.Function):
    """``h_l = A_in^T H_l`` (Eqs. 3-4); keeps ``H_l`` only when ``H_l`` starts a segment."""

    @staticmethod
    def forward(ctx, H: torch.Tensor, state: _Sublayer, anchor: bool, *params: torch.Tensor):
        h_in, wctx = state.width(H)
        state.forward_ctx = wctx  # the carried streams A_r^T H and B, for the depth step right after the branch
        if anchor:
            ctx.save_for_backward(H)
            state.recipe = StreamRecipe(anchor_ctx=ctx)
        ctx.state = state
        ctx.n_params = len(params)
        return h_in.contiguous() if h_in._base is not None or not h_in.is_contiguous() else h_in

    @staticmethod
    def backward(ctx, g_in: torch.Tensor):
        state: _Sublayer = ctx.state
        H = state.recipe.materialize().detach().requires_grad_(ctx.needs_input_grad[0])
        params = list(state.conn._recompute_params())
        with torch.enable_grad():
            h_in, _ = state.width(H)
            grads = _grads(h_in, [H, *params], g_in)
        state.recipe.release()  # the width step is the last user of H_l in backward
        return (grads[0], None, None, *grads[1:])


class _Depth(torch.autograd.Function):
    """``H_{l+1} = A_r^T H_l + B^T y_l`` (Eq. 5); keeps only ``y_l``. ``H_l`` is an input only for the gradient."""

    @staticmethod
    def forward(ctx, H: torch.Tensor, y: torch.Tensor, state: _Sublayer, *params: torch.Tensor):
        wctx, state.forward_ctx = state.forward_ctx, None
        with state._autocast():
            out = state.conn.depth(y, wctx)
        ctx.save_for_backward(y)
        ctx.state = state
        state.depth_ctx = ctx
        return out

    @staticmethod
    def backward(ctx, G: torch.Tensor):
        state: _Sublayer = ctx.state
        (y,) = ctx.saved_tensors
        H = state.recipe.materialize().detach().requires_grad_(ctx.needs_input_grad[0])
        y = y.detach().requires_grad_(ctx.needs_input_grad[1])
        params = list(state.conn._recompute_params())
        with torch.enable_grad():
            _, wctx = state.width(H)
            with state._autocast():
                out = state.conn.depth(y, wctx)
            grads = _grads(out, [H, y, *params], G)
        return (grads[0], grads[1], None, *grads[2:])


def _outer_hooks():
    """The saved-tensor hooks active outside (e.g. a memory counter or CPU offload), to compose with ours."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        return top(False)
    except TypeError:
        return top()


class _Marker:
    """Stands in for the branch input in the branch's saved tensors; rebuilt from the streams on unpack."""

    __slots__ = ("state",)

    def __init__(self, state: _Sublayer) -> None:
        self.state = state


def recompute_forward(conn, H: torch.Tensor, branch: Callable[..., torch.Tensor], args, kwargs) -> torch.Tensor:
    """``conn(H, branch)`` keeping as little stream-sized state as possible (see the module docstring)."""
    recipe = getattr(H, _RECIPE_ATTR, None)
    if recipe is not None and recipe[1] != H._version:  # modified in place since: cannot replay it
        recipe = None
    recipe = None if recipe is None else recipe[0]
    anchor = recipe is None or recipe.steps >= conn.recompute_every  # segment of L_r sublayers per stored input
    device = H.device.type
    autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    state = _Sublayer(conn, None if anchor else recipe, autocast)
    params = tuple(conn._recompute_params())
    h_in = _Width.apply(H, state, anchor, *params)

    key = (h_in.data_ptr(), tuple(h_in.shape), tuple(h_in.stride()), h_in.dtype)
    outer = _outer_hooks()
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(t: torch.Tensor):
        if (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) == key:
            return _Marker(state)
        return (outer_pack(t) if outer_pack is not None else t,)

    def unpack(packed):
        if isinstance(packed, _Marker):
            return packed.state.branch_input()
        return outer_unpack(packed[0]) if outer_unpack is not None else packed[0]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = branch(h_in, *args, **kwargs)
    out = _Depth.apply(H, y, state, *params)
    setattr(out, _RECIPE_ATTR, (StreamRecipe(prev=state.recipe, step=state), out._version))
    return out
