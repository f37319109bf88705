"""The training loss's LM head: each token's log-probability of its label, with the hidden state's gradient taken in
the forward pass.

Why: trl's fused LM head (what SFTTrainer computes its loss with) never holds the [tokens, vocabulary] logits. It
projects a tile of tokens, folds the tile into running log-sum-exp statistics, and in backward projects the same tile
again to turn it into the gradient. A log-probability's gradient with respect to the hidden state is
(onehot(label) - softmax) @ W, times the one number backward brings for that token. When the whole vocabulary fits one
tile (Llama 2's 32,000 under trl's 32,768 columns), the softmax is known as soon as the tile is folded, so that product
is taken right there, from the tile already in memory. That is one 16-bit matmul of three fewer, and no tile in
backward, where the step's memory peaks. Every position is scored, including those whose label is -100, which then
weigh zero: trl's compact form picks the labelled positions by boolean indexing, and that waits for the GPU twice a
step.

The kernels are trl's own (trl.kernels.chunked_logprob, Triton on a GPU, torch on the CPU); backward multiplies the
kept fp32 gradient by each token's weight. Used by speed._loss_without_metrics where `supports` says the head is a
plain one (no bias, no soft-capping or logit scale, frozen, the vocabulary in one tile); trl's head otherwise.
"""
from __future__ import annotations

import functools
import types

# The tile is turned into c * (onehot - softmax) in 16 bits before its matmul, so probabilities far below fp16's
# smallest normal number keep their bits (trl's backward scales its tile by the loss's own weight the same way).
TILE_SCALE = 1024.0


def supports(model) -> bool:
    """Whether this module computes this model's head exactly as trl's does (model: the transformers model): no bias,
    no soft-capping or logit scale, a frozen weight, the vocabulary in one of trl's tiles."""
    from trl.kernels import chunked_logprob as trl_head
    from trl.trainer import utils as trl_utils

    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in (
        "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    return (head is not None and getattr(head, "bias", None) is None and not head.weight.requires_grad and not scaled
            and head.weight.shape[0] <= trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE and hasattr(trl_head, "_backward_kernel"))


def install(model) -> None:
    """`model(..., labels=labels, qlora_head=True)` returns (log-probabilities of each next-token label, zero where
    the label is -100; the mask of labelled positions). Otherwise the model's forward (trl's, when trl patched it) is
    unchanged. model: the transformers model (a PeftModel's get_base_model()); the call goes through the wrappers
    (peft, DDP) like any forward."""
    forward = model.forward

    @functools.wraps(type(model).forward)
    def with_head(self, *args, qlora_head=False, labels=None, **kwargs):
        if not qlora_head:
            return forward(*args, **kwargs) if labels is None else forward(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        head = self.get_output_embeddings()
        flat = hidden.reshape(-1, hidden.shape[-1])
        per_token = _log_probs().apply(flat, head.weight, labels.clamp(min=0).reshape(-1))
        return per_token.view(mask.shape).masked_fill(~mask, 0), mask

    model.forward = types.MethodType(with_head, model)


@functools.cache
def _log_probs():
    """The autograd function, built on first use: importing this module imports neither torch nor trl."""
    import torch
    from trl.kernels import chunked_logprob as trl_head

    class LogProbs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets):
            device = hidden.device
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
            n_all, vocab = hidden.shape[0], weight.shape[0]
            w = weight.to(dtype)
            triton = trl_head._use_triton(device)
            log_probs = torch.empty(n_all, device=device, dtype=torch.float32)
            grad = torch.zeros(hidden.shape, device=device, dtype=torch.float32)
            chunk = trl_head.TOKEN_CHUNK_SIZE
            buf = torch.empty((min(n_all, chunk), vocab), device=device, dtype=dtype)
            plain = dict(logit_scale=1.0, softcap=1.0, inv_t=1.0, HAS_SOFTCAP=False, BLOCK_SIZE=trl_head._BLOCK_SIZE)
            for start in range(0, n_all, chunk):
                end = min(start + chunk, n_all)
                n, rows = end - start, slice(start, end)
                tile = buf[:n]
                torch.mm(hidden[rows].to(dtype), w.t(), out=tile)
                running_max = torch.full((n,), float("-inf"), device=device, dtype=torch.float32)
                sum_exp, target_logit, unused = (torch.zeros(n, device=device, dtype=torch.float32) for _ in range(3))
                fold = trl_head._forward_kernel[(n,)] if triton else trl_head._forward_tile
                fold(tile, tile.stride(0), targets[rows], running_max, sum_exp, unused, unused, unused, unused,
                     target_logit, 0, vocab, HAS_ENTROPY=False, HAS_LOG_SUM_SQ_PROBS=False, HAS_MEAN_LOGITS=False,
                     HAS_IS_TOP1=False, **plain)
                log_z = running_max + torch.log(sum_exp)
                torch.sub(target_logit, log_z, out=log_probs[rows])
                # the tile becomes TILE_SCALE * d(log-probability)/d(logits), in place
                scale = torch.full((n,), TILE_SCALE, device=device, dtype=torch.float32)
                to_grad = (trl_head._backward_kernel[(n, -(-vocab // trl_head._BLOCK_SIZE))] if triton
                           else trl_head._backward_tile)
                to_grad(tile, tile.stride(0), targets[rows], log_z, log_z, scale, log_z, 0, vocab,
                        HAS_LOGPROB_GRAD=True, HAS_ENTROPY_GRAD=False, **plain)
                trl_head._addmm_fp32(grad[rows], tile, w)
            ctx.save_for_backward(grad)
            ctx.hidden_dtype = hidden.dtype
            return log_probs

        @staticmethod
        def backward(ctx, grad_log_probs):
            (grad,) = ctx.saved_tensors
            weight = (grad_log_probs.float() / TILE_SCALE).unsqueeze(-1)
            return torch.mul(grad, weight, out=torch.empty(grad.shape, device=grad.device, dtype=ctx.hidden_dtype)), \
                None, None

    return LogProbs
