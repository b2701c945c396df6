"""One decoding step at fixed shapes, recorded once as a CUDA graph and replayed per image token
(``generate_codes(..., cuda_graph=True)``).

The eager step attends to the cache's first ``length`` positions, a shape that grows by one
per token, and launches some twenty kernels per layer from Python: at the batch sizes of
generation its time is the host's, not the device's. Here the step's inputs live in fixed
buffers (the last code and its image index, on the device); every layer writes its keys and
values at that position of the full-length cache and attends to all of it under the pattern's
mask row for the position (``kernels.dense_mask_on``: what it may not see, the cache's zeros
beyond the position included, weighs nothing). No shape or Python value changes between tokens,
so one recording serves the whole image (it is recorded once per call).

Under autocast, recording needs autocast's weight-cast cache off, so a replay casts every weight
again; a model cast to bf16 (``generate --dtype bf16``, ``generate.cast_for_inference``) has no
casts to make.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ..attention.kernels import dense_mask_on
from .kv_cache import KVCache

WARMUP_STEPS = 2  # eager runs on a side stream before recording, as torch.cuda.graph asks
# Where generate_codes(cuda_graph=True) runs: the step is recorded on CUDA. The tests add "cpu",
# where the same fixed-shape step runs unrecorded.
GRAPH_DEVICES = ("cuda",)


class StaticDecodeStep:
    """``step(code, index)``: the image logits (b, vocab) after feeding ``code`` (b, 1) at image
    index ``index``, with the cache already holding every earlier position. ``record``: replay a
    CUDA graph (recorded on the first call); else run the same fixed-shape step eagerly. The
    returned logits are overwritten by the next call."""

    def __init__(self, dalle, cache: KVCache, batch: int, device: torch.device, record: bool):
        self.dalle, self.cache, self.record = dalle, cache, record
        self.code = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, code: torch.Tensor, index: int) -> torch.Tensor:
        if index + self.dalle.layout.text_len != self.cache.length:
            raise ValueError(f"image index {index} is not the cache's next position ({self.cache.length})")
        self.code.copy_(code)
        self.index.fill_(index)
        self.cache.length += 1
        if not self.record:
            return self.forward()
        if self.graph is None:
            self._record_graph()
        self.graph.replay()
        return self.logits

    def forward(self) -> torch.Tensor:
        """The step on the buffers: no host sync, no data-dependent Python (a test traces it whole)."""
        d = self.dalle
        position = self.index + d.layout.text_len
        attends = [partial(self._attend, layer, position) for layer in range(len(d.patterns))]
        h = d.finish_hidden(d.transformer(d.embed_image_at(self.code, self.index), attends))
        return d.to_image_logits(h[:, -1])

    def _attend(self, layer: int, position: torch.Tensor, q, k, v, dropout_p: float = 0.0):
        keys, values = self.cache.write_at(layer, position, k, v)
        mask = dense_mask_on(self.dalle.patterns[layer], q.device).index_select(0, position)  # (1, max_len)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def _record_graph(self) -> None:
        # Autocast's weight-cast cache must be off while recording (casts are graph kernels then).
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        with torch.cuda.device(self.code.device):  # the model's GPU, whichever is current
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), autocast:
                for _ in range(WARMUP_STEPS):  # each rewrites this position's keys and values: the same ones
                    self.forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), autocast:
                self.logits = self.forward()
