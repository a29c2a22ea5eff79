"""PoSE inside `transformers.Trainer` (and TRL's `SFTTrainer`): a `data_collator` that turns tokenized documents into
PoSE samples, so an existing Trainer script gains PoSE by swapping its collator.

Example::

    from ctxext_kernels.pose import PoseDataCollator, PoseSampler
    from ctxext_kernels.pose.modeling import load_model

    model, tokenizer = load_model("base", rope_type="linear", target_length=16384)   # RoPE rescaled to Lt
    sampler = PoseSampler(original_window=2048, target_length=16384, seed=0)
    dataset = dataset.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    dataset = dataset.filter(lambda row: len(row["input_ids"]) >= sampler.min_document_length)
    Trainer(model=model, args=TrainingArguments(...), train_dataset=dataset,
            data_collator=PoseDataCollator(sampler)).train()
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.utils.data

from .sampler import PoseCollator, PoseSampler


class PoseDataCollator:
    """`data_collator` for transformers' `Trainer`: one tokenized document per feature in, one PoSE sample per row out.

    Each feature's `input_ids` (a list or tensor of Lx >= `sampler.min_document_length` token ids) is cropped by the
    sampler to L tokens (L = Lc, or Lt for `method="full"`) with position ids spanning [0, Lt).

    Returns `{"input_ids", "position_ids", "labels", "attention_mask"}`, each `[B, L]` int64; `labels` equal
    `input_ids` (the model shifts them) and `attention_mask` is all ones (`PoseCollator` says why it matters).

    Randomness comes from the sampler's generator. In a DataLoader worker process, or on a rank of a distributed run,
    the collator re-seeds it on its first batch from `(sampler.seed, rank, the worker's torch seed)`: without that,
    every worker and every rank would hold a copy of one generator and draw identical chunk layouts. The worker's seed
    changes every epoch and follows Trainer's `seed`. Trainer checkpoints do not hold the sampler's state, so a
    resumed Trainer run draws new layouts (`ctxext-train` resumes bit for bit).

    Parameters
    ----------
    sampler : PoseSampler
    input_key : str
        The feature field holding the token ids.
    """

    def __init__(self, sampler: PoseSampler, input_key: str = "input_ids"):
        self.sampler = sampler
        self.input_key = input_key
        self._collate = PoseCollator(sampler)
        self._stream = (0, None)  # (rank, worker seed) the generator currently serves; (0, None): the main process

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        missing = [index for index, feature in enumerate(features) if self.input_key not in feature]
        if missing:
            raise KeyError(f"features {missing[:5]} have no {self.input_key!r} field (fields: "
                           f"{sorted(features[missing[0]])}): tokenize the dataset first")
        self._select_stream()
        return self._collate([torch.as_tensor(feature[self.input_key]) for feature in features])

    def _select_stream(self) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        worker = torch.utils.data.get_worker_info()
        stream = (rank, None if worker is None else worker.seed)
        if stream != self._stream:
            entropy = [self.sampler.seed, rank, *([] if worker is None else [worker.seed])]
            self.sampler.load_state_dict({"bit_generator": np.random.PCG64(entropy).state})
            self._stream = stream
