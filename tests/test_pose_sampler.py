"""PoseSampler against the paper's definitions (arXiv 2309.10400, section 3.2), checked over many seeds."""

import itertools

import numpy as np
import pytest
import torch

from ctxext_kernels.pose import PoseCollator, PoseSampler

SEEDS = range(300)


def document(length: int) -> torch.Tensor:
    """A document whose token ids are their own indices, so a sample's tokens tell where they came from."""
    return torch.arange(length)


@pytest.mark.parametrize("lc, lt, n", [(16, 64, 2), (16, 64, 3), (8, 100, 5), (4, 5, 1), (6, 40, 6)])
def test_layout_follows_the_paper(lc, lt, n):
    lx = 3 * lt
    for seed in SEEDS:
        sampler = PoseSampler(lc, lt, num_chunks=n, seed=seed)
        layout = sampler.draw_layout(lx)
        assert len(layout.lengths) == n and all(length >= 1 for length in layout.lengths)
        assert sum(layout.lengths) == lc
        assert list(layout.starts) == [sum(layout.lengths[:i]) for i in range(n)]
        assert layout.skips[0] == 0
        assert all(a <= b for a, b in zip(layout.skips, layout.skips[1:])) and layout.skips[-1] <= lt - lc
        assert layout.offsets[0] == 0
        assert all(a <= b for a, b in zip(layout.offsets, layout.offsets[1:])) and layout.offsets[-1] <= lx - lc

        ids, pos = PoseSampler(lc, lt, num_chunks=n, seed=seed).sample(document(lx))
        expected_pos = [u + st + j for length, st, u in zip(layout.lengths, layout.starts, layout.skips)
                        for j in range(length)]
        expected_ids = [v + st + j for length, st, v in zip(layout.lengths, layout.starts, layout.offsets)
                        for j in range(length)]
        assert pos.tolist() == expected_pos and ids.tolist() == expected_ids
        assert ids.shape == pos.shape == (lc,) and pos.dtype == ids.dtype == torch.int64
        assert bool((pos[1:] > pos[:-1]).all()) and 0 <= int(pos.min()) and int(pos.max()) < lt


def test_skip_ranges_hit_both_ends_and_chunk_lengths_vary():
    lc, lt = 8, 24
    last_skips, first_lengths = set(), set()
    for seed in SEEDS:
        layout = PoseSampler(lc, lt, seed=seed).draw_layout(lt)
        last_skips.add(layout.skips[-1])
        first_lengths.add(layout.lengths[0])
    assert last_skips == set(range(lt - lc + 1))  # U{0 ... Lt-Lc} includes both ends
    assert first_lengths == set(range(1, lc))


def test_every_relative_distance_is_covered():
    """The paper's point: the Lc-token samples together cover every relative distance 1 ... Lt-1."""
    lc, lt = 8, 64
    seen = set()
    for seed in range(2000):
        _, pos = PoseSampler(lc, lt, seed=seed).sample(document(lt))
        seen.update((pos[None, :] - pos[:, None])[torch.triu_indices(lc, lc, 1).unbind()].tolist())
    assert seen == set(range(1, lt))


@pytest.mark.parametrize("content", ["random", "zero", "same"])
def test_content_offsets_per_strategy(content):
    lc, lt, lx = 12, 48, 200
    for seed in range(100):
        sampler = PoseSampler(lc, lt, num_chunks=3, content=content, seed=seed)
        layout = sampler.draw_layout(lx)
        if content == "zero":
            assert layout.offsets == (0, 0, 0)
        elif content == "same":
            assert layout.offsets == layout.skips
        ids, pos = PoseSampler(lc, lt, num_chunks=3, content=content, seed=seed).sample(document(lx))
        if content == "zero":
            assert ids.tolist() == list(range(lc))
        if content == "same":
            assert torch.equal(ids, pos)  # each token sits at its own position in the document


def test_random_content_reaches_the_end_of_the_document():
    lc, lt, lx = 8, 32, 64
    last = {PoseSampler(lc, lt, seed=seed).draw_layout(lx).offsets[-1] for seed in range(2000)}
    assert min(last) == 0 and max(last) == lx - lc


def test_full_length_and_randpos():
    lc, lt, lx = 8, 32, 50
    for seed in range(100):
        ids, pos = PoseSampler(lc, lt, seed=seed, method="full").sample(document(lx))
        assert pos.tolist() == list(range(lt)) and ids.numel() == lt
        assert ids.tolist() == list(range(int(ids[0]), int(ids[0]) + lt))
        ids, pos = PoseSampler(lc, lt, seed=seed, method="randpos").sample(document(lx))
        assert ids.numel() == pos.numel() == lc and ids.tolist() == list(range(int(ids[0]), int(ids[0]) + lc))
        assert bool((pos[1:] > pos[:-1]).all()) and int(pos.max()) < lt


def test_determinism_and_exact_resume():
    docs = [document(100 + 7 * i) for i in range(20)]
    a, b = PoseSampler(10, 80, num_chunks=3, seed=5), PoseSampler(10, 80, num_chunks=3, seed=5)
    assert all(torch.equal(x, y) for d in docs for x, y in zip(a.sample(d), b.sample(d)))
    assert not torch.equal(PoseSampler(10, 80, seed=6).sample(docs[0])[1], PoseSampler(10, 80, seed=5).sample(docs[0])[1])

    uninterrupted = PoseSampler(10, 80, seed=1)
    reference = [uninterrupted.sample(d) for d in docs]
    first = PoseSampler(10, 80, seed=1)
    head = [first.sample(d) for d in docs[:8]]
    state = first.state_dict()
    resumed = PoseSampler(10, 80, seed=999)
    resumed.load_state_dict(state)
    tail = [resumed.sample(d) for d in docs[8:]]
    for (x0, p0), (x1, p1) in zip(reference, head + tail):
        assert torch.equal(x0, x1) and torch.equal(p0, p1)


def test_collator_batches_and_packing():
    docs = [document(200) for _ in range(4)]
    batch = PoseCollator(PoseSampler(16, 64, seed=0))(docs)
    keys = ("input_ids", "labels", "position_ids", "attention_mask")
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (4, 16) for k in keys}
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool((batch["attention_mask"] == 1).all())

    packed = PoseCollator(PoseSampler(16, 64, seed=0), samples_per_row=2)(docs)
    assert packed["input_ids"].shape == (2, 32) and "attention_mask" not in packed
    assert torch.equal(packed["input_ids"].reshape(4, 16), batch["input_ids"])
    assert torch.equal(packed["position_ids"][:, 16], torch.zeros(2, dtype=torch.long))  # restart at every sample
    assert (packed["labels"][:, 16] == -100).all() and (packed["labels"][:, :16] >= 0).all()
    with pytest.raises(ValueError, match="multiple of samples_per_row"):
        PoseCollator(PoseSampler(16, 64), samples_per_row=3)(docs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(original_window=64, target_length=64), "must be smaller than target_length"),
    (dict(original_window=8, target_length=64, num_chunks=9), "num_chunks"),
    (dict(original_window=8, target_length=64, content="middle"), "content must be"),
    (dict(original_window=8, target_length=64, method="yarn"), "method must be"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoseSampler(**kwargs)


@pytest.mark.parametrize("method, content, needed", list(itertools.product(["pose"], ["random", "zero"], [16]))
                         + [("pose", "same", 64), ("full", "random", 64), ("randpos", "random", 16)])
def test_short_document_is_named(method, content, needed):
    sampler = PoseSampler(16, 64, content=content, method=method)
    with pytest.raises(ValueError, match=f"needs at least {needed}"):
        sampler.sample(document(needed - 1))
    sampler.sample(document(needed))


@pytest.mark.parametrize("rule, low, high, skipped_share", [("paper", 1, 15, 0.5), ("authors", 1, 8, 0.75)])
def test_first_chunk_length_follows_its_rule(rule, low, high, skipped_share):
    """Two chunks of Lc = 16: l_0 ~ U{1..Lc-1} (the paper's appendix) or U{1..ceil(Lc/2)} (the authors' train_pose.py:
    `rt1 = random.randint(1, (len_chunk + 1) // 2)`), checked by a chi-square test on 4000 draws; the share of tokens
    in the skipped chunk follows (1/2 and 3/4 in expectation)."""
    lc, draws = 16, 4000
    sampler = PoseSampler(lc, 64, seed=0, chunk_lengths=rule)
    first = np.array([sampler.draw_layout(64).lengths[0] for _ in range(draws)])
    support = np.arange(low, high + 1)
    assert set(first.tolist()) == set(support.tolist())
    counts = np.array([(first == n).sum() for n in support])
    expected = draws / len(support)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 2 * (len(support) - 1) + 15, f"chi2 {chi2:.1f} for {len(support) - 1} degrees of freedom"
    share = 1 - first.mean() / lc
    assert abs(share - ((lc - (low + high) / 2) / lc)) < 0.02 and abs(share - skipped_share) < 0.05


def test_authors_rule_needs_two_chunks():
    with pytest.raises(ValueError, match="num_chunks must be 2"):
        PoseSampler(16, 64, num_chunks=3, chunk_lengths="authors")
    with pytest.raises(ValueError, match="chunk_lengths must be one of"):
        PoseSampler(16, 64, chunk_lengths="uniform")


def test_contiguous_control_takes_poses_tokens_at_unskipped_positions():
    """Same seed, same chunks and content as PoSE; only the skips are gone (positions 0..Lc-1)."""
    lx = 500
    for seed in range(50):
        pose_ids, pose_pos = PoseSampler(16, 64, num_chunks=3, seed=seed).sample(document(lx))
        ids, pos = PoseSampler(16, 64, num_chunks=3, seed=seed, method="contiguous").sample(document(lx))
        assert torch.equal(ids, pose_ids) and torch.equal(pos, torch.arange(16))
        assert int(pose_pos.max()) >= 15


@pytest.mark.parametrize("method", ["pose", "contiguous", "full", "randpos"])
@pytest.mark.parametrize("content", ["random", "same"])
def test_every_sample_starts_with_bos_at_position_0(method, content):
    """With a BOS token, each sample is BOS at position 0 followed by L-1 tokens of the document: for PoSE the first
    chunk starts the document (BOS then its first tokens), for full/randpos any contiguous L-1 tokens."""
    lc, lt, bos = 16, 64, 10_000
    for seed in range(200):
        doc = document(lt + seed % 20)
        ids, pos = PoseSampler(lc, lt, seed=seed, method=method, content=content, bos_token_id=bos).sample(doc)
        length = lt if method == "full" else lc
        assert ids.shape == pos.shape == (length,)
        assert ids[0] == bos and pos[0] == 0 and (ids[1:] != bos).all()
        assert (pos.diff() > 0).all() and pos[-1] < lt
        if method in ("pose", "contiguous"):  # sampled as the document with BOS prepended: the first chunk opens it
            with_bos = torch.cat([torch.tensor([bos]), doc])
            layout = PoseSampler(lc, lt, seed=seed, method=method, content=content).draw_layout(with_bos.numel())
            assert torch.equal(ids, with_bos[layout.token_indices()]) and torch.equal(pos, layout.position_ids())
            first = layout.lengths[0]
            assert torch.equal(ids[1:first], doc[:first - 1]) and torch.equal(pos[:first], torch.arange(first))
        else:  # documents are arange(Lx): a contiguous window has consecutive ids
            assert (ids[1:].diff() == 1).all() and ids[-1] < doc.numel()
        if method == "full":
            assert torch.equal(pos, torch.arange(lt))


def test_leading_bos_follows_the_tokenizer():
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    from ctxext_kernels.pose.modeling import leading_bos

    def tokenizer(template: bool, bos: bool):
        backend = Tokenizer(models.WordLevel({"a": 0, "<s>": 1, "<unk>": 2}, unk_token="<unk>"))
        if template:
            backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>" if bos else None, unk_token="<unk>")

    assert leading_bos(tokenizer(template=True, bos=True)) == 1
    assert leading_bos(tokenizer(template=False, bos=True)) is None  # has a BOS token, but does not add it
    assert leading_bos(tokenizer(template=False, bos=False)) is None
