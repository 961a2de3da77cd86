"""The GKD loss: sum over layers of (1 - cos(h_child, h_parent)) plus KL(parent || child) of the
next-token distributions (plus, optionally, the language-modelling loss).

Two implementations of the same numbers:

* the **reference** (:func:`gkd_loss`): both models' logits for the whole batch in float32, then
  ``log_softmax``; simple, and what every figure before the fused path was measured with. Its
  memory is several ``tokens x vocabulary x 4`` bytes (3.2 GB per tensor for 16 x 1024 tokens of
  a 49,152-word vocabulary) and it makes a float32 copy of every hidden state.
* the **fused** path (:func:`fused_head_loss`, :func:`fused_cosine`): the logits are computed from
  the final hidden states ``loss_chunk`` tokens at a time, for parent and child, and never exist
  for the whole batch; the gradient with respect to the child's logits, ``softmax(child) -
  softmax(parent)`` (plus ``softmax(child) - onehot(next token)`` for the LM term), is turned into
  the gradients of the final hidden state and of the LM head inside the same loop (as Liger's fused
  linear losses do), so the backward pass only scales them. The cosine terms of all layers are one
  autograd node that computes in float32 without keeping float32 copies.

The per-chunk and per-layer arithmetic are small pure functions; ``compile=True`` runs them through
``torch.compile`` (one fused kernel each instead of a dozen passes over ``chunk x vocabulary``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from puzzle.errors import PuzzleError

COSINE_EPS = 1e-8


class LossError(PuzzleError, ValueError):
    """The GKD loss cannot be computed with these settings."""


# --------------------------------------------------------------------------- reference


def kl_parent_child(parent_logits: torch.Tensor, child_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(parent || child) of next-token distributions, in float32."""
    p_log = F.log_softmax(parent_logits.float(), dim=-1)
    c_log = F.log_softmax(child_logits.float(), dim=-1)
    return (p_log.exp() * (p_log - c_log)).sum(-1).mean()


def cosine_distance_sum(
    child_hidden: tuple[torch.Tensor, ...], parent_hidden: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Sum over layers of the mean (over tokens) of 1 - cos(h_child, h_parent).

    The models return the hidden state entering every layer plus the final (normed) output;
    the first entry (the embeddings) is skipped, so there is one term per layer.
    """
    total = child_hidden[1].new_zeros((), dtype=torch.float32)
    for hc, hp in zip(child_hidden[1:], parent_hidden[1:], strict=True):
        total = total + (1.0 - F.cosine_similarity(hc.float(), hp.float(), dim=-1)).mean()
    return total


def gkd_loss(
    child_out: Any, parent_out: Any, input_ids: torch.Tensor, settings: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted GKD loss and its parts (as floats, for logging), the reference way: from
    both models' outputs with full logits and hidden states."""
    parts: dict[str, torch.Tensor] = {}
    if settings.weight_cosine:
        parts["cosine"] = cosine_distance_sum(child_out.hidden_states, parent_out.hidden_states)
    if settings.weight_kl:
        parts["kl"] = kl_parent_child(parent_out.logits, child_out.logits)
    if settings.weight_lm:
        logits = child_out.logits[:, :-1].float()
        parts["lm"] = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1).long()
        )
    weights = {"cosine": settings.weight_cosine, "kl": settings.weight_kl, "lm": settings.weight_lm}
    loss = sum(weights[name] * value for name, value in parts.items())
    if not isinstance(loss, torch.Tensor):
        raise LossError("every GKD loss weight is 0: at least one of weight_cosine/kl/lm must be > 0")
    return loss, {name: float(value.detach()) for name, value in parts.items()}


# --------------------------------------------------------------------------- kernels


def kl_chunk(
    zc: torch.Tensor, zp: torch.Tensor, targets: torch.Tensor, coef_kl: float, coef_lm: float, with_lm: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of logits (child ``zc``, parent ``zp``: ``[n, vocab]``): the sums over its tokens
    of KL(parent || child) and of the LM loss (``targets`` -1: no target), and the gradient of
    ``coef_kl * KL + coef_lm * LM`` with respect to ``zc``, in float32."""
    lc = torch.log_softmax(zc.float(), dim=-1)
    lp = torch.log_softmax(zp.float(), dim=-1)
    parent_p = lp.exp()
    kl = lp.sub_(lc).mul_(parent_p).sum()  # sum p (log p - log c); lp is spent
    if with_lm:
        valid = targets >= 0
        safe = targets.clamp(min=0).unsqueeze(1)
        lm = -(lc.gather(1, safe).squeeze(1) * valid).sum()
    else:
        lm = kl.new_zeros(())
    child_p = lc.exp_()  # two exponentials over chunk x vocabulary, no other temporaries
    if not with_lm:
        return kl, lm, child_p.sub_(parent_p).mul_(coef_kl)
    # coef_kl * (softmax(child) - softmax(parent)) + coef_lm * (softmax(child) - onehot(target)),
    # the second term on rows that have a target
    rows = valid.to(child_p.dtype).unsqueeze(1) * coef_lm
    grad = child_p.mul_(rows + coef_kl).sub_(parent_p, alpha=coef_kl)
    grad.scatter_add_(1, safe, -rows)
    return kl, lm, grad


def cosine_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(a, b) (last dimension), computed in float32."""
    a32, b32 = a.float(), b.float()
    dot = (a32 * b32).sum(-1)
    na = a32.norm(dim=-1).clamp_min(COSINE_EPS)
    nb = b32.norm(dim=-1).clamp_min(COSINE_EPS)
    return (1.0 - dot / (na * nb)).mean()


def cosine_backward(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d/da of ``grad * cosine_forward(a, b)``, in ``a``'s dtype."""
    a32, b32 = a.float(), b.float()
    dot = (a32 * b32).sum(-1, keepdim=True)
    na = a32.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    nb = b32.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    tokens = a.numel() // a.shape[-1]
    scale = grad.float() / tokens
    cos = dot / (na * nb)
    return (-scale * (b32 / (na * nb) - cos * a32 / (na * na))).to(a.dtype)


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=None)


def kernel(fn: Callable[..., Any], compile: bool) -> Callable[..., Any]:
    """``fn`` itself, or its ``torch.compile``\\ d version (built once per process)."""
    return _compiled(fn) if compile else fn


# --------------------------------------------------------------------------- fused autograd nodes


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: the autocast dtype when autocast is on, else ``t``'s."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        h_child: torch.Tensor,
        w_child: torch.Tensor,
        h_parent: torch.Tensor,
        w_parent: torch.Tensor,
        targets: torch.Tensor,
        weight_kl: float,
        weight_lm: float,
        chunk: int,
        compile: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = h_child.shape[0]
        with_lm = bool(weight_lm)
        n_lm = int((targets >= 0).sum()) if with_lm else 0
        coef_kl = weight_kl / n
        coef_lm = weight_lm / max(1, n_lm)
        dtype = _matmul_dtype(h_child)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        step = kernel(kl_chunk, compile)
        with torch.autocast(h_child.device.type, enabled=False):
            hc, wc = h_child.to(dtype), w_child.to(dtype)
            hp, wp = h_parent.to(dtype), w_parent.to(dtype)
            grad_h = torch.empty_like(h_child) if need_h else None
            grad_w = torch.zeros(w_child.shape, dtype=dtype, device=w_child.device) if need_w else None
            kl_total = torch.zeros((), dtype=torch.float32, device=h_child.device)
            lm_total = torch.zeros((), dtype=torch.float32, device=h_child.device)
            for start in range(0, n, chunk):
                end = min(n, start + chunk)
                zc = hc[start:end] @ wc.T
                zp = hp[start:end] @ wp.T
                kl, lm, grad = step(zc, zp, targets[start:end], coef_kl, coef_lm, with_lm)
                del zc, zp
                kl_total += kl
                lm_total += lm
                if need_h or need_w:
                    g = grad.to(dtype)
                    del grad
                    if grad_h is not None:
                        grad_h[start:end] = g @ wc
                    if grad_w is not None:
                        grad_w.addmm_(g.T, hc[start:end])
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.w_dtype = w_child.dtype
        kl_mean = kl_total / n
        lm_mean = lm_total / max(1, n_lm)
        loss = weight_kl * kl_mean + weight_lm * lm_mean
        ctx.mark_non_differentiable(kl_mean, lm_mean)
        return loss, kl_mean, lm_mean

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        has_h, has_w = ctx.has
        scale = grad_loss
        out_h = grad_h * scale.to(grad_h.dtype) if has_h else None
        out_w = (grad_w * scale.to(grad_w.dtype)).to(ctx.w_dtype) if has_w else None
        return out_h, out_w, None, None, None, None, None, None, None


def fused_head_loss(
    h_child: torch.Tensor,
    w_child: torch.Tensor,
    h_parent: torch.Tensor,
    w_parent: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    weight_kl: float,
    weight_lm: float,
    chunk: int,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight_kl * KL + weight_lm * LM, KL, LM)`` from the final (normed) hidden states
    ``[batch, seq, hidden]`` of both models and their LM-head weights ``[vocab, hidden]``, computed
    ``chunk`` tokens at a time. KL is the mean over all tokens of KL(parent || child), LM the mean
    next-token cross-entropy of the child (0 when ``weight_lm`` is 0); only the first is
    differentiable, with respect to ``h_child`` and ``w_child``."""
    if chunk <= 0:
        raise LossError(f"the fused loss needs a chunk of >= 1 token, got {chunk}")
    if w_child.shape != w_parent.shape:
        raise LossError(f"child LM head {tuple(w_child.shape)} != parent's {tuple(w_parent.shape)}")
    batch, seq = input_ids.shape
    targets = torch.full_like(input_ids, -1, dtype=torch.long)
    targets[:, :-1] = input_ids[:, 1:]
    loss, kl, lm = _FusedHeadLoss.apply(
        h_child.reshape(batch * seq, -1),
        w_child,
        h_parent.reshape(batch * seq, -1).detach(),
        w_parent.detach(),
        targets.reshape(-1),
        float(weight_kl),
        float(weight_lm),
        int(chunk),
        bool(compile),
    )
    return loss, kl, lm


class _FusedCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, n: int, compile: bool, *hidden: torch.Tensor) -> torch.Tensor:
        child, parent = hidden[:n], hidden[n:]
        fwd = kernel(cosine_forward, compile)
        with torch.autocast(child[0].device.type, enabled=False):
            total = torch.zeros((), dtype=torch.float32, device=child[0].device)
            for a, b in zip(child, parent, strict=True):
                total += fwd(a, b)
        ctx.n, ctx.compile = n, compile
        ctx.save_for_backward(*hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        hidden = ctx.saved_tensors
        n = ctx.n
        bwd = kernel(cosine_backward, ctx.compile)
        with torch.autocast(hidden[0].device.type, enabled=False):
            grads = [
                bwd(a, b, grad) if ctx.needs_input_grad[2 + i] else None
                for i, (a, b) in enumerate(zip(hidden[:n], hidden[n:], strict=True))
            ]
        return (None, None, *grads, *([None] * n))


def fused_cosine(
    child_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    parent_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    *,
    compile: bool = False,
) -> torch.Tensor:
    """:func:`cosine_distance_sum` as one autograd node: the same sum over layers (the embeddings'
    entry skipped), computed in float32 without keeping float32 copies for the backward pass."""
    child = list(child_hidden[1:])
    parent = [h.detach() for h in parent_hidden[1:]]
    if len(child) != len(parent):
        raise LossError(f"child has {len(child)} hidden states, parent {len(parent)}")
    return _FusedCosine.apply(len(child), bool(compile), *child, *parent)
