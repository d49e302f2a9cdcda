"""The decode loop of :func:`preftune.generation.sample_batch`: k samples per prompt from one prefill.

The prompts are prefilled once (one row each); each prompt's keys and values are then copied k
times into a preallocated KV cache, one buffer per layer holding every position a row can reach
(prompt + ``max_new_tokens``), so a new token is written in place instead of the whole cache being
concatenated again each step (``DynamicCache`` does that: ~15 % of a decode step of SmolLM2-135M
with 32 rows on a CPU). Each step is one forward pass of the rows still writing: the next token of
every row is drawn, rows that stop (EOS, ``stop_when`` on their text, ``max_new_tokens``) are done,
and the rows done leave the batch, with their part of the cache, as soon as the rows they would
still cost outweigh one copy of the cache (:func:`_worth_compacting`).

Draws are by inverse CDF: each step takes one uniform number per row of the batch from the
generator, every row whether it is still writing or not, and row r's token is the one where r's
cumulative probability passes r's number. A sample therefore depends on its row number, its prompt
and the generator's seed, not on when the other rows stopped or left the batch.

Only attention caches whose every layer is a plain ``DynamicLayer`` (full attention) take this
path; :func:`fast_path_cache` says so after the prefill, and the caller decodes otherwise.
"""

from __future__ import annotations

import re

import torch

# top_p < 1: the nucleus is looked for among the most probable tokens first; a row whose top
# NUCLEUS_CANDIDATES tokens do not reach top_p sorts its whole vocabulary instead.
NUCLEUS_CANDIDATES = 256

# Weights per block of the two-level inverse CDF (:func:`_inverse_cdf`).
CDF_BLOCK = 256


def forward_accepts(model, argument: str) -> bool:
    """Whether the (base) model's forward takes ``argument``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def draw(logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_p: float) -> torch.Tensor:
    """Each row's next token: the argmax at temperature 0, else the token at which the row's
    cumulative probability (softmax of ``logits / temperature``, kept to the nucleus of ``top_p``:
    the top tokens whose probability reaches it, at least one) passes ``u`` (one number in [0, 1)
    per row)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float()
    probs = (logits if temperature == 1 else logits / temperature).softmax(-1)
    if top_p >= 1.0:
        return _inverse_cdf(probs, u)
    width = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top, order = probs.topk(width, -1)  # sorted, most probable first
    # the tokens past the candidates are in the nucleus only if the candidates fall short of top_p
    short = (top.sum(-1) < top_p).nonzero().flatten() if width < probs.shape[-1] else top.new_zeros(0).long()
    chosen = order.gather(-1, _inverse_cdf(_nucleus(top, top_p), u)[:, None]).squeeze(-1)
    if len(short):
        full, full_order = probs[short].sort(-1, descending=True)
        picked = _inverse_cdf(_nucleus(full, top_p), u[short])
        chosen[short] = full_order.gather(-1, picked[:, None]).squeeze(-1)
    return chosen


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities sorted most probable first, zeroed past the nucleus (where the mass ranked
    above a token reaches top_p)."""
    before = sorted_probs.cumsum(-1) - sorted_probs
    return sorted_probs.masked_fill(before >= top_p, 0.0)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds ``u`` times the row's total (never
    an index of weight 0). In two levels: the sums of blocks of :data:`CDF_BLOCK` weights, then
    the weights of the block found (one vectorised pass over the vocabulary instead of a
    sequential cumulative sum of it); the cumulative sums in float64."""
    rows, width = weights.shape
    pad = (-width) % CDF_BLOCK
    blocks = (torch.nn.functional.pad(weights, (0, pad)) if pad else weights).view(rows, -1, CDF_BLOCK)
    sums = blocks.sum(-1).to(torch.float64)
    cdf = sums.cumsum(-1)
    at = u.to(torch.float64) * cdf[:, -1]
    block = _first_above(cdf, at)
    rest = at - (cdf - sums).gather(-1, block[:, None]).squeeze(-1)  # the mass to go within it
    inner = blocks.gather(1, block[:, None, None].expand(-1, 1, CDF_BLOCK)).squeeze(1)
    inner = inner.to(torch.float64).cumsum(-1)
    return block * CDF_BLOCK + _first_above(inner, rest)


def _first_above(cdf: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Per row, the first index where ``cdf`` exceeds ``at``; rounding past the end gives the last
    index of positive weight (where ``cdf`` reaches its total)."""
    found = torch.searchsorted(cdf, at[:, None], right=True).squeeze(-1)
    last = (cdf < cdf[:, -1:]).sum(-1)
    return torch.minimum(found, last)


def fast_path_cache(cache) -> bool:
    """Whether the prefill's cache can be preallocated and have rows dropped: every layer a
    full-attention ``DynamicLayer`` (not sliding-window, state-space or linear-attention layers)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values are views of buffers sized for the whole
        decode: ``update`` writes the new positions in place."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, k: int, capacity: int):
            super().__init__()
            rows, heads, length, dim = keys.shape
            self._k = keys.new_empty(rows * k, heads, capacity, dim)
            self._v = values.new_empty(rows * k, values.shape[1], capacity, values.shape[-1])
            # each prompt's positions, once per sample (a broadcast copy: no repeated temporary)
            self._k.view(rows, k, heads, capacity, dim)[:, :, :, :length] = keys[:, None]
            self._v.view(rows, k, *self._v.shape[1:])[:, :, :, :length] = values[:, None]
            self.length, self.device, self.is_initialized = length, keys.device, True
            self._views()

        def _views(self):
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            new = key_states.shape[-2]
            self._k[:, :, self.length : self.length + new] = key_states
            self._v[:, :, self.length : self.length + new] = value_states
            self.length += new
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:  # not used: expanded once at init
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._views()

    return PreallocatedLayer


def _worth_compacting(done: int, writing: int, steps_left: int) -> bool:
    """Whether the ``done`` rows should leave the batch now. Each step they stay costs about one
    row's forward pass each, for at most ``steps_left`` steps; leaving copies the cache of the
    ``writing`` rows once, about a sixth of a row's forward pass per row (SmolLM2-135M on a CPU,
    ~170 positions; less where the cache is small next to the model). They leave when the saving
    is at least three times the copy (the batch may end before ``steps_left``)."""
    return done > 0 and writing > 0 and done * steps_left * 2 >= writing


def decode_samples(
    model,
    tokenizer,
    out,
    cache,
    mask: torch.Tensor,
    *,
    k: int,
    generator: torch.Generator,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_when: re.Pattern | None,
    on_done=None,
) -> list[str]:
    """The ``k`` samples of each prompt of a prefilled batch (``out``: the prefill's output with
    ``cache`` its cache, ``mask`` its attention mask), rows in prompt order, samples adjacent."""
    eos = tokenizer.eos_token_id
    device = mask.device
    n = mask.shape[0] * k
    Layer = _preallocated_layer_class()
    cache.layers = [
        Layer(layer.keys, layer.values, k, mask.shape[1] + max_new_tokens) for layer in cache.layers
    ]
    argument = "cache" if forward_accepts(model, "cache") else "past_key_values"

    def uniforms():  # one number per row of the batch, every row, each step
        if temperature <= 0:
            return None
        return torch.rand(n, generator=generator, dtype=torch.float64, device=device)

    logits = out.logits[:, -1, :].repeat_interleave(k, 0)
    del out
    token = draw(logits, uniforms(), temperature, top_p)
    written: list[list[int]] = [[] for _ in range(n)]
    texts: list[str | None] = [None] * n
    rows = list(range(n))  # the batch's rows: which sample each is
    slots = torch.arange(n, device=device)
    masks = torch.cat([mask.repeat_interleave(k, 0), mask.new_ones(n, max_new_tokens)], dim=1)
    positions = mask.long().sum(-1).repeat_interleave(k, 0)[:, None]  # the first new token's position
    width = mask.shape[1]
    step = 0
    while True:
        for slot, tok in enumerate(token.tolist()):
            row = rows[slot]
            if texts[row] is not None:
                continue  # done, not yet out of the batch
            stop = eos is not None and tok == eos
            if not stop:
                written[row].append(tok)
            text = None
            if not stop and stop_when is not None:
                text = tokenizer.decode(written[row], skip_special_tokens=True)
                stop = stop_when.search(text) is not None
            if stop or len(written[row]) >= max_new_tokens:
                texts[row] = (
                    tokenizer.decode(written[row], skip_special_tokens=True) if text is None else text
                )
                if on_done is not None:
                    on_done(1)
        step += 1
        alive = [slot for slot, row in enumerate(rows) if texts[row] is None]
        if not alive:
            return texts  # type: ignore[return-value]
        if _worth_compacting(len(rows) - len(alive), len(alive), max_new_tokens - step):
            keep = torch.tensor(alive, device=device)
            cache.batch_select_indices(keep)
            rows = [rows[s] for s in alive]
            slots, token, masks, positions = slots[keep], token[keep], masks[keep], positions[keep]
        width += 1
        logits = model(
            input_ids=token[:, None],
            attention_mask=masks[:, :width],
            position_ids=positions + (step - 1),
            use_cache=True,
            **{argument: cache},
        ).logits[:, -1, :]
        u = uniforms()
        token = draw(logits, None if u is None else u[slots], temperature, top_p)
