"""PoseDataCollator: its samples obey the paper's constraints, PoSE chunks attend to each other, and inside
transformers' Trainer and TRL's SFTTrainer the patched rotary module sees exactly the collator's position ids."""

import pytest
import torch

from ctxext_kernels.pose import PoseCollator, PoseDataCollator, PoseSampler
from pose_fixtures import TINY_WINDOW, save_tiny_llama

LC, LT = TINY_WINDOW // 4, 4 * TINY_WINDOW  # a 16-token window stretched to 256 positions
VOCAB = 256  # byte tokens; documents are permutations of them, so a token names its index in its document


def documents(count: int, seed: int = 0) -> list[list[int]]:
    """`count` documents of distinct tokens, lengths in [LC, VOCAB]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(LC, VOCAB + 1, (count,), generator=generator).tolist()
    return [torch.randperm(VOCAB, generator=generator)[:length].tolist() for length in lengths]


def check_positions(batch: dict, num_chunks: int = 2) -> None:
    """The paper's constraints on one batch (section 3.2): L = Lc tokens per row, position ids strictly increasing
    from 0 and below Lt, the skip u (position id minus index) non-decreasing from u_0 = 0 up to at most Lt - Lc and
    changing at most N - 1 times; labels are the input ids (the model shifts them), the mask is all ones."""
    shape = batch["input_ids"].shape
    assert shape[1] == LC and all(value.shape == shape for value in batch.values())
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert torch.equal(batch["attention_mask"], torch.ones_like(batch["input_ids"]))
    for positions in batch["position_ids"]:
        skips = positions - torch.arange(LC)
        assert skips[0] == 0 and (skips.diff() >= 0).all() and skips.max() <= LT - LC and positions.max() < LT
        assert (skips.diff() > 0).sum() <= num_chunks - 1


def test_samples_obey_the_paper():
    """Content too: every chunk is a contiguous run of its own document, content skips v_i non-decreasing from 0 and
    at most Lx - Lc, and content and position chunks share their boundaries."""
    docs = documents(64)
    batch = PoseDataCollator(PoseSampler(LC, LT, num_chunks=3, seed=1))([{"input_ids": doc} for doc in docs])
    check_positions(batch, num_chunks=3)
    for doc, tokens, positions in zip(docs, batch["input_ids"], batch["position_ids"]):
        index = torch.tensor([doc.index(token) for token in tokens.tolist()])  # where each token sits in the document
        offsets = index - torch.arange(LC)
        assert offsets[0] == 0 and (offsets.diff() >= 0).all() and offsets.max() <= len(doc) - LC
        boundaries = torch.nonzero((offsets.diff() != 0) | ((positions - torch.arange(LC)).diff() != 0))
        assert boundaries.numel() <= 2
    assert batch["position_ids"].max() >= LC  # positions beyond the training window occur


def test_first_batch_equals_the_sampler_and_errors_are_named():
    docs = documents(4)
    batch = PoseDataCollator(PoseSampler(LC, LT, seed=3))([{"input_ids": torch.tensor(doc)} for doc in docs])
    reference = PoseSampler(LC, LT, seed=3)
    for doc, tokens, positions in zip(docs, batch["input_ids"], batch["position_ids"]):
        expected_tokens, expected_positions = reference.sample(torch.tensor(doc))
        assert torch.equal(tokens, expected_tokens) and torch.equal(positions, expected_positions)
    with pytest.raises(KeyError, match="no 'input_ids' field"):
        PoseDataCollator(PoseSampler(LC, LT))([{"text": "not tokenized"}])
    with pytest.raises(ValueError, match="needs at least 16"):
        PoseDataCollator(PoseSampler(LC, LT))([{"input_ids": [1, 2, 3]}])


def test_dataloader_workers_draw_their_own_layouts():
    """Two workers over two epochs: every batch has its own layout (a copied generator would repeat them), and the
    same torch seed repeats the whole run."""
    dataset = [{"input_ids": doc} for doc in documents(4)]

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2,
                                             collate_fn=PoseDataCollator(PoseSampler(LC, LT, seed=0)))
        return [batch["position_ids"][0] for _ in range(2) for batch in loader]

    layouts = run()
    assert len({tuple(positions.tolist()) for positions in layouts}) == len(layouts) == 8
    assert all(torch.equal(a, b) for a, b in zip(layouts, run()))


@pytest.fixture(scope="module")
def extended_model(tmp_path_factory):
    from ctxext_kernels.pose.modeling import load_model

    return load_model(save_tiny_llama(tmp_path_factory.mktemp("collator") / "model"), rope_type="linear",
                      target_length=LT)


@pytest.mark.parametrize("collator", ["trainer", "ctxext-train"])
def test_chunks_attend_to_each_other(extended_model, collator):
    """In training (no cache), a token of the first chunk changes the logits of the last chunk: the batch of the
    Trainer collator and of ctxext-train's PoseCollator keeps each row one causal sequence although its ids jump."""
    model, _ = extended_model
    sampler = PoseSampler(LC, LT, seed=0)
    batch = (PoseDataCollator(sampler)([{"input_ids": doc} for doc in documents(4)]) if collator == "trainer" else
             PoseCollator(sampler)([torch.as_tensor(doc) for doc in documents(4)]))
    jumps = batch["position_ids"].diff() > 1
    row = int(torch.nonzero(jumps.any(1))[0])  # a row whose chunks sit apart
    last = int(torch.nonzero(jumps[row])[-1]) + 1  # the last chunk's first index
    changed = {k: v[row:row + 1].clone() for k, v in batch.items() if k != "labels"}
    changed["input_ids"][0, 0] = (changed["input_ids"][0, 0] + 1) % VOCAB
    with torch.no_grad():
        before = model(**{k: v[row:row + 1] for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        after = model(**changed, use_cache=False).logits
    assert (before[0, last:] - after[0, last:]).abs().amax(-1).min() > 0


def train_and_watch(model, make_trainer):
    """Train 3 steps with the rotary patch on; return the batches the collator made, the position ids the rotary
    module received, and the logged losses."""
    from ctxext_kernels.integrations import patch_model, unpatch
    from ctxext_kernels.integrations.rotary import FUSED_ATTRIBUTE

    made, received = [], []
    collator = PoseDataCollator(PoseSampler(LC, LT, seed=0))

    def data_collator(features):
        batch = collator(features)
        made.append({k: v.clone() for k, v in batch.items()})
        return batch

    def on_rotary(module, args, kwargs, output):
        fused = getattr(output[0], FUSED_ATTRIBUTE)  # the patched module: the kernels get the ids themselves
        received.append(fused.position_ids.clone())

    from datasets import Dataset

    hook = model.model.rotary_emb.register_forward_hook(on_rotary, with_kwargs=True)
    patch_model(model)
    try:
        trainer = make_trainer(Dataset.from_dict({"input_ids": documents(8)}), data_collator)
        trainer.train()
    finally:
        unpatch()
        hook.remove()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return made, received, losses


TRAINING = dict(max_steps=3, per_device_train_batch_size=2, use_cpu=True, report_to=[], learning_rate=1e-3,
                logging_steps=1, save_strategy="no", disable_tqdm=True)


def check_training(made, received, losses):
    assert len(received) == 3 and len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for batch, positions in zip(made, received):  # the collator may run ahead of the model, never behind
        check_positions(batch)
        assert torch.equal(positions, batch["position_ids"])
    assert max(int(positions.max()) for positions in received) >= LC


def test_trainer_trains_on_the_collator_positions(extended_model, tmp_path):
    import copy

    from transformers import Trainer, TrainingArguments

    model = copy.deepcopy(extended_model[0])
    check_training(*train_and_watch(model, lambda dataset, collator: Trainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), **TRAINING), train_dataset=dataset,
        data_collator=collator)))


def test_sft_trainer_trains_on_the_collator_positions(extended_model, tmp_path):
    import copy

    from trl import SFTConfig, SFTTrainer

    model, tokenizer = copy.deepcopy(extended_model[0]), extended_model[1]
    # max_length=None: SFTTrainer would otherwise truncate the documents (to 1024 tokens) before the collator
    check_training(*train_and_watch(model, lambda dataset, collator: SFTTrainer(
        model=model, args=SFTConfig(output_dir=str(tmp_path), max_length=None, **TRAINING), train_dataset=dataset,
        data_collator=collator, processing_class=tokenizer)))
