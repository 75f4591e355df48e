"""The token budget of one batch on an accelerator, from free memory and the model's bytes per token.

A fixed budget (16,384 tokens) suits a CPU, where a bigger batch only adds compute, but keeps a GPU's
batches far smaller than the card holds: on an H200 the defaults reached 0.36-0.51x of hand-written
padded ``generate`` (docs/performance.md). On CUDA and MPS the budget is derived once the weights are
loaded, like vLLM's ``gpu_memory_utilization``: the memory left under the utilization cap, less a reserve
for one step's transient activations (the logits of the positions it verifies, one prefill group), divided
by what one token of a batch keeps (its KV cache across all layers). Out-of-memory halving in the engine
stays the net.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("aligner_core")

#: The budget on a CPU, where batch size trades against compute rather than memory.
CPU_BATCH_TOKENS = 16384
#: Share of the accelerator's memory the engine plans to fill (vLLM's default is 0.9).
GPU_MEMORY_UTILIZATION = 0.9
#: Bounds of a derived budget: at least a few long prompts, at most what one planner pass handles well.
MIN_BATCH_TOKENS = 4096
MAX_BATCH_TOKENS = 1 << 20
#: Rows per batch on an accelerator when the budget is derived: one decoding step's logits (rows x vocabulary,
#: float32) are part of the activation reserve, so the rows are bounded with it.
ACCELERATOR_MAX_ROWS = 256


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """KV-cache bytes of one token: layers x KV heads x head dim x 2 (keys and values) x dtype size."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or (int(config.hidden_size) // heads if heads else 0)
    return layers * kv_heads * int(head_dim) * 2 * dtype_bytes


def activation_reserve(
    config: Any, dtype_bytes: int, *, verify_tokens: int = ACCELERATOR_MAX_ROWS, prefill_tokens: int = 4096
) -> int:
    """Transient memory of a decoding step, which does not grow with the batch budget: float32 logits of the
    positions one step computes (at most ``verify_tokens``: rows x draft width is capped, rows too), and the
    hidden/MLP activations of one prefill group."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    return verify_tokens * vocab * 4 + prefill_tokens * (4 * hidden + 2 * intermediate) * dtype_bytes


def derive_budget(
    free_bytes: int,
    total_bytes: int,
    per_token_bytes: int,
    *,
    reserve_bytes: int = 0,
    utilization: float = GPU_MEMORY_UTILIZATION,
) -> int:
    """Tokens a batch may hold: memory under ``utilization`` of the card that is still free, less the
    transient ``reserve_bytes``, per token of KV cache (with 10% headroom for the cache's own growth)."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if per_token_bytes <= 0:
        return CPU_BATCH_TOKENS
    kept = (1 - utilization) * total_bytes  # what the cap keeps for other users and fragmentation
    usable = max(0.0, free_bytes - kept - reserve_bytes)
    return max(MIN_BATCH_TOKENS, min(MAX_BATCH_TOKENS, int(usable // (per_token_bytes * 1.1))))


def budget_for(model: Any, *, utilization: float = GPU_MEMORY_UTILIZATION) -> int:
    """The batch budget of a loaded model on its device (CPU: the fixed CPU budget)."""
    import torch

    param = next(model.parameters())
    device = param.device
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    elif device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        total = int(torch.mps.recommended_max_memory())
        free = total - int(torch.mps.current_allocated_memory())
    else:
        return CPU_BATCH_TOKENS
    dtype_bytes = param.element_size()
    per_token = kv_bytes_per_token(model.config, dtype_bytes)
    reserve = activation_reserve(model.config, dtype_bytes)
    budget = derive_budget(int(free), int(total), per_token, reserve_bytes=reserve, utilization=utilization)
    logger.info(
        "batch budget on %s: %d tokens (%.1f of %.1f GiB free, %d KV bytes per token, %.1f GiB kept for "
        "activations, utilization %.2f)",
        device,
        budget,
        free / 2**30,
        total / 2**30,
        per_token,
        reserve / 2**30,
        utilization,
    )
    return budget
