"""PoSE position sampling (Zhu et al., arXiv 2309.10400, section 3.2), the full-length mode and the RandPos baseline.

PoSE trains a model for a target context Lt inside its original window Lc: the Lc training tokens are cut into N chunks,
and every chunk is moved right by a random skip, so the position ids of one sample span [0, Lt) while the sequence
stays Lc tokens long. With `u_0 = 0` and `u_i ~ U{u_(i-1), ..., Lt - Lc}` the ids stay strictly increasing and below Lt,
and over many samples every relative distance 1 ... Lt-1 is seen.

Randomness comes from one numpy PCG64 generator per sampler; its state is a plain dict of ints (JSON-serialisable), so
a checkpoint restores it and a resumed run draws exactly the samples the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

METHODS = ("pose", "full", "randpos", "contiguous")
CONTENT_STRATEGIES = ("random", "zero", "same")
# How chunk lengths are drawn: "paper" (appendix: a uniformly random composition of Lc into N positive parts, so
# l_0 ~ U{1, ..., Lc-1} for N = 2) or "authors" (dwzhu-pku/PoSE train_pose.py, N = 2 only: l_0 ~ U{1, ..., ceil(Lc/2)},
# which leaves on average 3/4 of the tokens, not 1/2, in the skipped second chunk).
CHUNK_LENGTH_RULES = ("paper", "authors")


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Where the chunks of one PoSE sample come from and which positions they get (all lists have N entries).

    lengths: l_i, chunk lengths (each >= 1, summing to Lc); starts: st_i = l_0 + ... + l_(i-1);
    skips: u_i, the position skip of chunk i (chunk i has positions u_i + st_i ... u_i + st_i + l_i - 1);
    offsets: v_i, the content skip (chunk i's tokens are x[v_i + st_i : v_i + st_i + l_i]).
    """

    lengths: tuple[int, ...]
    starts: tuple[int, ...]
    skips: tuple[int, ...]
    offsets: tuple[int, ...]

    def position_ids(self) -> torch.Tensor:
        """`[Lc]` int64 position ids of the sample."""
        return torch.cat([torch.arange(u + st, u + st + n) for n, st, u in zip(self.lengths, self.starts, self.skips)])

    def token_indices(self) -> torch.Tensor:
        """`[Lc]` int64 indices into the document of the sample's tokens."""
        return torch.cat([torch.arange(v + st, v + st + n) for n, st, v in zip(self.lengths, self.starts, self.offsets)])


class PoseSampler:
    """Draw `(input_ids, position_ids)` training samples from documents.

    Parameters
    ----------
    original_window : int
        Lc, the training sequence length (the model's original context window in the paper).
    target_length : int
        Lt, the context length to extend to; every position id is < Lt.
    num_chunks : int
        N, how many chunks one sample is cut into (the paper uses 2; any 1 <= N <= Lc works).
    content : {"random", "zero", "same"}
        How the content skip v_i is chosen: "random" `v_i ~ U{v_(i-1), ..., Lx - Lc}` (v_0 = 0, as u_0, so the first
        chunk starts the document like the authors' code), "zero" `v_i = 0` (Lc contiguous tokens), "same" `v_i = u_i`
        (the tokens that really sit at those positions: the document needs >= Lt tokens).
    seed : int
        Seed of the sampler's generator.
    chunk_lengths : {"paper", "authors"}
        "paper" (default, the paper's appendix): the N lengths are a uniformly random composition of Lc, so with
        N = 2 the first chunk has l_0 ~ U{1, ..., Lc-1} tokens and half of all tokens sit in the skipped chunk.
        "authors" (their released training code, N = 2 only): l_0 ~ U{1, ..., ceil(Lc/2)}, so three quarters of the
        tokens sit in the skipped chunk, which trains long distances more often.
    bos_token_id : int, optional
        The BOS token the tokenizer puts before every document (None: it adds none). Documents are passed without
        it; every sample then starts with BOS at position 0, as in the authors' code, where the tokenizer adds BOS and
        the first chunk starts the document: "pose"/"contiguous" sample the document with BOS prepended (the first
        chunk opens with BOS at position 0), "full"/"randpos" take L-1 contiguous tokens after a BOS at position 0
        ("randpos" draws the other L-1 positions from [1, Lt)). A document needs `min_document_length` tokens either
        way.
    method : {"pose", "full", "randpos", "contiguous"}
        "full": the full-length baseline, Lt contiguous tokens (random offset) with positions 0 ... Lt-1.
        "randpos": the paper's RandPos baseline, Lc contiguous tokens (random offset) with Lc distinct positions drawn
        uniformly from [0, Lt) and sorted.
        "contiguous": the control for PoSE's skips: exactly PoSE's tokens (the same draws, so the same seed gives the
        same chunks) at positions 0 ... Lc-1, i.e. every skip u_i = 0. Fine-tuning with it separates "adapted to the
        rescaled RoPE" from "learned the skipped distances".
    """

    def __init__(self, original_window: int, target_length: int, num_chunks: int = 2, content: str = "random",
                 seed: int = 0, method: str = "pose", chunk_lengths: str = "paper", bos_token_id: int | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if content not in CONTENT_STRATEGIES:
            raise ValueError(f"content must be one of {CONTENT_STRATEGIES}, got {content!r}")
        if original_window < 1:
            raise ValueError(f"original_window (Lc) must be >= 1, got {original_window}")
        if original_window >= target_length:
            raise ValueError(f"original_window (Lc={original_window}) must be smaller than target_length "
                             f"(Lt={target_length}): PoSE extends a window, it cannot shrink or keep it")
        if chunk_lengths not in CHUNK_LENGTH_RULES:
            raise ValueError(f"chunk_lengths must be one of {CHUNK_LENGTH_RULES}, got {chunk_lengths!r}")
        if chunk_lengths == "authors" and method in ("pose", "contiguous") and num_chunks != 2:
            raise ValueError(f"chunk_lengths='authors' is the authors' two-chunk rule; num_chunks must be 2, got "
                             f"{num_chunks}")
        if not 1 <= num_chunks <= original_window:
            raise ValueError(f"num_chunks must be between 1 and original_window (Lc={original_window}) since every "
                             f"chunk holds at least one token, got {num_chunks}")
        self.original_window = original_window
        self.target_length = target_length
        self.num_chunks = num_chunks
        self.content = content
        self.chunk_lengths = chunk_lengths
        self.method = method
        self.bos_token_id = bos_token_id
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def sample_length(self) -> int:
        """Tokens per sample: Lt for "full", Lc otherwise."""
        return self.target_length if self.method == "full" else self.original_window

    @property
    def min_document_length(self) -> int:
        """The fewest tokens a document needs: Lt for "full" and content "same", Lc otherwise."""
        if self.method == "full" or (self.method in ("pose", "contiguous") and self.content == "same"):
            return self.target_length
        return self.original_window

    def state_dict(self) -> dict:
        """The generator state (plain ints and strings), for checkpoints."""
        return {"bit_generator": self._rng.bit_generator.state, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict()`: the next draws equal those the saved sampler would have made."""
        self._rng.bit_generator.state = state["bit_generator"]

    def _uniform(self, low: int, high: int) -> int:
        """One draw from U{low, ..., high} (both ends included)."""
        return int(self._rng.integers(low, high, endpoint=True))

    def draw_layout(self, document_length: int) -> ChunkLayout:
        """Draw the chunk lengths, position skips u_i and content skips v_i of one PoSE sample for a document of
        `document_length` tokens (method "pose" only)."""
        if self.method not in ("pose", "contiguous"):
            raise ValueError(f"chunk layouts exist for methods 'pose' and 'contiguous' only, this sampler is "
                             f"{self.method!r}")
        self._check_document(document_length)
        lc, lt = self.original_window, self.target_length
        if self.chunk_lengths == "authors":  # one cut, l_0 ~ U{1, ..., ceil(Lc/2)}
            cuts = np.array([self._uniform(1, (lc + 1) // 2)])
        else:  # N - 1 distinct cut points in 1 ... Lc-1: a uniformly random composition of Lc into N positive lengths
            cuts = np.sort(self._rng.choice(np.arange(1, lc), size=self.num_chunks - 1, replace=False))
        bounds = [0, *(int(c) for c in cuts), lc]
        lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        starts = tuple(bounds[:-1])
        skips = [0]
        for _ in range(1, self.num_chunks):
            skips.append(self._uniform(skips[-1], lt - lc))
        if self.method == "contiguous":  # drawn all the same, so the generator stays in step with PoSE's
            skips = [0] * self.num_chunks
        if self.content == "zero":
            offsets = [0] * self.num_chunks
        elif self.content == "same":
            offsets = list(skips)
        else:
            offsets = [0]
            for _ in range(1, self.num_chunks):
                offsets.append(self._uniform(offsets[-1], document_length - lc))
        return ChunkLayout(lengths, starts, tuple(skips), tuple(offsets))

    def sample(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training sample from one document.

        Parameters
        ----------
        tokens : torch.Tensor
            `[Lx]` integer token ids of one document, Lx >= `min_document_length`.

        Returns
        -------
        input_ids, position_ids : torch.Tensor
            `[L]` each (L = `sample_length`), int64; position ids strictly increasing and < Lt.
        """
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        tokens = tokens.long()
        self._check_document(tokens.numel())
        bos = [] if self.bos_token_id is None else [self.bos_token_id]
        if self.method in ("pose", "contiguous"):
            tokens = torch.cat([tokens.new_tensor(bos), tokens])  # the document as the tokenizer encodes it
            layout = self.draw_layout(tokens.numel())
            return tokens[layout.token_indices()], layout.position_ids()
        length = self.sample_length - len(bos)
        start = self._uniform(0, tokens.numel() - length)
        input_ids = torch.cat([tokens.new_tensor(bos), tokens[start:start + length]])
        if self.method == "full":
            return input_ids, torch.arange(input_ids.numel())
        # BOS keeps position 0; the content's positions are distinct draws from the rest of [0, Lt)
        positions = len(bos) + np.sort(self._rng.choice(self.target_length - len(bos), size=length, replace=False))
        return input_ids, torch.from_numpy(np.concatenate([np.zeros(len(bos), np.int64), positions])).long()

    def _check_document(self, document_length: int) -> None:
        if document_length < self.min_document_length:
            why = ("full-length training" if self.method == "full" else
                   "content='same'" if self.content == "same" and self.method in ("pose", "contiguous") else
                   "one sample")
            raise ValueError(f"document has {document_length} tokens but {why} needs at least "
                             f"{self.min_document_length} (Lc={self.original_window}, Lt={self.target_length})")


class PoseCollator:
    """Turn documents into training batches `{input_ids, labels, position_ids[, attention_mask]}`, each
    `[B, samples_per_row * L]`.

    One sample per row (the default) comes with an all-ones `attention_mask`, and it is not decoration: transformers
    >= 5, given position ids but no mask and no cache (i.e. in training), reads every place where the ids do not step
    by one as the start of another packed sequence and blocks attention across it, which would cut each PoSE chunk off
    from the chunks before it. With the mask each row is one causal sequence.

    With `samples_per_row > 1` consecutive samples are packed into one row; the position ids restart with every sample
    (each PoSE sample starts at position 0) and the first label of every packed sample after the first is -100, so no
    token is trained to predict the start of an unrelated sample. Such rows get no mask: attention must stay within a
    sample but cross PoSE's skips, which only a backend that splits rows at restarts alone does
    (`attn_implementation="ctxext"` on a batch of one row, or flash-attention with `cu_seqlens`); stock transformers
    5 splits at the skips too.

    Parameters
    ----------
    sampler : PoseSampler
    samples_per_row : int
        Samples packed into one row; the number of documents passed in must be a multiple of it.
    """

    def __init__(self, sampler: PoseSampler, samples_per_row: int = 1):
        if samples_per_row < 1:
            raise ValueError(f"samples_per_row must be >= 1, got {samples_per_row}")
        self.sampler = sampler
        self.samples_per_row = samples_per_row

    def __call__(self, documents: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if not documents or len(documents) % self.samples_per_row:
            raise ValueError(f"got {len(documents)} documents; need a positive multiple of samples_per_row="
                             f"{self.samples_per_row}")
        samples = [self.sampler.sample(torch.as_tensor(doc)) for doc in documents]
        input_ids = torch.stack([ids for ids, _ in samples])
        position_ids = torch.stack([pos for _, pos in samples])
        labels = input_ids.clone()
        if self.samples_per_row > 1:
            labels.view(-1, self.samples_per_row, labels.shape[-1])[:, 1:, 0] = -100
        rows = len(documents) // self.samples_per_row
        batch = {"input_ids": input_ids.reshape(rows, -1), "labels": labels.reshape(rows, -1),
                 "position_ids": position_ids.reshape(rows, -1)}
        if self.samples_per_row == 1:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch
