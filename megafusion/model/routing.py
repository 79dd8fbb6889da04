"""Index-based routing of tokens to their modality's tower.

The residual stream is kept in *modality-sorted* order across the whole decoder stack:
all text tokens first, then all image tokens, each group in sequence order. A tower then
runs on one contiguous slice (no gather), and only the shared attention needs sequence
order: q/k/v are gathered into it and the attention output is gathered back. A token
therefore costs exactly what it costs in the dense model; nothing runs both towers on
every token and selects afterwards.

Because image_ids increase in row-major order and every image's patches are
contiguous, the image slice is already [num_images, tokens_per_image] in order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import TEXT


@dataclass
class Routing:
    perm: torch.Tensor  # [B*L] flat sequence index of the k-th token in sorted order
    inv: torch.Tensor  # [B*L] sorted position of flat sequence index i
    n_text: int
    batch_size: int
    seq_len: int

    @classmethod
    def from_modality(cls, modality: torch.Tensor) -> "Routing":
        B, L = modality.shape
        flat = modality.reshape(-1)
        perm = torch.argsort(flat, stable=True)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        n_text = int((flat == TEXT).sum())
        return cls(perm=perm, inv=inv, n_text=n_text, batch_size=B, seq_len=L)

    @property
    def n_tokens(self) -> int:
        return self.perm.numel()

    @property
    def n_image(self) -> int:
        return self.n_tokens - self.n_text

    @property
    def text_positions(self) -> torch.Tensor:
        """Flat sequence indices of the text tokens, in sorted (= sequence) order."""
        return self.perm[: self.n_text]

    def to_sequence(self, x_sorted: torch.Tensor) -> torch.Tensor:
        """[B*L, ...] in sorted order -> [B, L, ...] in sequence order."""
        return x_sorted.index_select(0, self.inv).view(self.batch_size, self.seq_len, *x_sorted.shape[1:])

    def to_sorted(self, x_seq: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] in sequence order -> [B*L, ...] in sorted order."""
        return x_seq.reshape(self.n_tokens, *x_seq.shape[2:]).index_select(0, self.perm)

    def run(self, text_fn, image_fn, x_sorted: torch.Tensor) -> torch.Tensor:
        """Apply each tower's function to its contiguous slice. An empty modality still
        runs, on zero rows (free): under ZeRO-3 every rank must call the same modules in
        the same order, since each call gathers that module's parameters collectively and
        each backward reduces its gradients, whatever this rank's batch holds."""
        return torch.cat([text_fn(x_sorted[: self.n_text]), image_fn(x_sorted[self.n_text:])], 0)


def prompt_vectors(h_sorted: torch.Tensor, routing: Routing, n_images: int, tokens_per_image: int,
                   norm, row_before: torch.Tensor | None = None) -> torch.Tensor:
    """[n_images, hidden]: for each image, norm(hidden state) of the token just before its
    first token (its BOI, which has read the prompt), model.prompt_context's vector.
    An image opening a row takes row_before [B, hidden] (the hidden state of the token
    that precedes the row: a KV cache's last text token, zeros where that was an image);
    without it, and where the token before is another image, the vector is zeros.
    h_sorted is [B*L, hidden] in sorted order. No host synchronisation: the indices stay
    on the device."""
    if n_images == 0:
        # norm still runs, on no rows of h_sorted (so that its backward runs too): under
        # ZeRO-3 every rank gathers its weight, forward and backward.
        return norm(h_sorted[:0])
    first = routing.perm[routing.n_text + torch.arange(n_images, device=h_sorted.device) * tokens_per_image]
    opens_row = first % routing.seq_len == 0
    before = routing.inv[(first - 1).clamp_min(0)]
    in_row = ~opens_row & (before < routing.n_text)
    vectors = h_sorted.index_select(0, torch.where(in_row, before, 0))
    ok = in_row
    if row_before is not None:
        vectors = torch.where(opens_row[:, None], row_before.index_select(0, first // routing.seq_len)
                              .to(vectors.dtype), vectors)
        ok = in_row | opens_row
    vectors = norm(vectors)
    return vectors * ok[:, None].to(vectors.dtype)
