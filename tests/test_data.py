"""lightfn.data: ArrayLoader batches, order, resume, sharding, errors; iterate / num_batches."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightfn as lf
from lightfn.data import ArrayLoader, DataError, iterate, num_batches
from lightfn.errors import LightfnError


def make_data(n: int = 23) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 3, 2, generator=g), "y": torch.arange(n) * 10}


def expected_batches(loader: ArrayLoader, data, epoch: int) -> list:
    """The batches of ``epoch`` built by hand from ``order`` and plain indexing."""
    order = loader.order(epoch)
    n, b = loader.num_samples, loader.batch_size
    out = []
    for i in range(len(loader)):
        idx = order[i * b : min((i + 1) * b, n)]
        out.append({k: v[idx] for k, v in data.items()})
    return out


def assert_batches_equal(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys()
        for k in e:
            assert a[k].shape == e[k].shape
            assert torch.equal(a[k], e[k])


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_match_manual_indexing(shuffle: bool, drop_last: bool) -> None:
    data = make_data(23)
    loader = ArrayLoader(data, batch_size=5, shuffle=shuffle, drop_last=drop_last, seed=3)
    assert len(loader) == (4 if drop_last else 5)
    for epoch in range(3):
        batches = list(loader.iter_epoch(epoch))
        assert_batches_equal(batches, expected_batches(loader, data, epoch))
        assert [b["y"].shape[0] for b in batches] == ([5] * 4 if drop_last else [5, 5, 5, 5, 3])
    if not shuffle:
        assert torch.equal(loader.order(0), torch.arange(23))
        assert torch.equal(torch.cat([b["y"] for b in loader]), data["y"][: 20 if drop_last else 23])


def test_every_sample_once_per_epoch_with_ragged_last_batch() -> None:
    data = make_data(23)
    loader = ArrayLoader(data, batch_size=4, drop_last=False, seed=5)
    seen = torch.cat([b["y"] for b in loader.iter_epoch(2)])
    assert sorted(seen.tolist()) == data["y"].tolist()
    # with drop_last the 3 rows of the last partial batch are the ones left out
    kept = torch.cat([b["y"] for b in ArrayLoader(data, 4, seed=5).iter_epoch(2)])
    assert kept.tolist() == seen[:20].tolist()


def test_pytree_structure_is_kept() -> None:
    x, y = torch.randn(10, 4), torch.arange(10)

    class Pair(NamedTuple):
        x: torch.Tensor
        y: torch.Tensor

    tup = next(iter(ArrayLoader((x, y), 4, shuffle=False)))
    assert isinstance(tup, tuple) and len(tup) == 2
    assert torch.equal(tup[0], x[:4]) and torch.equal(tup[1], y[:4])

    nt = next(iter(ArrayLoader(Pair(x, y), 4, shuffle=False)))
    assert isinstance(nt, Pair) and torch.equal(nt.y, y[:4])

    nested = next(iter(ArrayLoader({"in": {"x": x}, "out": [y, y * 2]}, 4, shuffle=False)))
    assert set(nested) == {"in", "out"} and isinstance(nested["out"], list)
    assert torch.equal(nested["in"]["x"], x[:4]) and torch.equal(nested["out"][1], y[:4] * 2)

    single = list(ArrayLoader(y, 3, seed=1))
    assert all(isinstance(b, torch.Tensor) and b.shape == (3,) for b in single)


def test_batches_of_a_shuffled_dict_stay_aligned_across_leaves() -> None:
    x = torch.arange(50.0).unsqueeze(1).repeat(1, 3)
    for batch in ArrayLoader({"x": x, "y": torch.arange(50)}, 7, seed=9):
        assert torch.equal(batch["x"][:, 0].long(), batch["y"])
        assert batch["x"].is_contiguous()


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    data = make_data(40)
    a = ArrayLoader(data, 8, seed=11)
    b = ArrayLoader(make_data(40), 8, seed=11)
    assert torch.equal(a.order(3), b.order(3))
    assert_batches_equal(list(a.iter_epoch(3)), list(b.iter_epoch(3)))
    # iterating other epochs in between changes nothing: no hidden state
    list(a.iter_epoch(0))
    assert torch.equal(a.order(3), b.order(3))
    # other epochs and other seeds give other permutations
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), ArrayLoader(data, 8, seed=12).order(0))
    assert sorted(a.order(4).tolist()) == list(range(40))
    assert a.order(0).dtype == torch.int64


def test_set_epoch_and_iter() -> None:
    data = make_data(30)
    loader = ArrayLoader(data, 6, seed=2)
    assert_batches_equal(list(loader), list(loader.iter_epoch(0)))
    loader.set_epoch(4)
    assert_batches_equal(list(loader), list(loader.iter_epoch(4)))
    assert_batches_equal(list(iterate(loader, 4)), list(loader.iter_epoch(4)))


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_iter_epoch_start_is_the_tail_of_the_epoch(drop_last: bool, shuffle: bool) -> None:
    data = make_data(23)
    loader = ArrayLoader(data, 4, shuffle=shuffle, drop_last=drop_last, seed=7)
    full = list(loader.iter_epoch(1))
    for k in range(len(loader) + 1):
        assert_batches_equal(list(loader.iter_epoch(1, start=k)), full[k:])
        assert_batches_equal(list(iterate(loader, 1, start=k)), full[k:])


def test_large_dataset_is_gathered_in_chunks_correctly() -> None:
    # 6000 rows of 784 floats: a shuffled epoch spans several gather chunks
    x = torch.randn(6000, 784)
    y = torch.arange(6000)
    loader = ArrayLoader((x, y), 64, seed=0)
    order = loader.order(0)
    batches = list(loader)
    assert len(batches) == 6000 // 64
    for i in (0, 1, 9, 10, 11, 50, len(batches) - 1):
        idx = order[i * 64 : (i + 1) * 64]
        assert torch.equal(batches[i][0], x[idx]) and torch.equal(batches[i][1], y[idx])
    tail = list(loader.iter_epoch(0, start=13))
    assert torch.equal(tail[0][1], batches[13][1]) and torch.equal(tail[-1][0], batches[-1][0])


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_reassemble_the_global_batches(world_size: int, drop_last: bool, shuffle: bool) -> None:
    data = make_data(37)
    loader = ArrayLoader(data, 8, shuffle=shuffle, drop_last=drop_last, seed=4)
    shards = [loader.shard(r, world_size) for r in range(world_size)]
    for epoch in (0, 1):
        full = list(loader.iter_epoch(epoch))
        per_rank = [list(s.iter_epoch(epoch)) for s in shards]
        for r, batches in enumerate(per_rank):
            assert len(batches) == len(full) == len(shards[r])
        for g, global_batch in enumerate(full):
            parts = [per_rank[r][g] for r in range(world_size)]
            if global_batch["y"].shape[0] == 8:
                assert all(p["y"].shape[0] == 8 // world_size for p in parts)
            for k in global_batch:
                assert torch.equal(torch.cat([p[k] for p in parts]), global_batch[k])
        # each sample exactly once per epoch across ranks
        seen = torch.cat([b["y"] for batches in per_rank for b in batches])
        assert len(seen) == len(set(seen.tolist())) == (32 if drop_last else 37)
        # resume mid-epoch on a shard
        assert_batches_equal(list(shards[-1].iter_epoch(epoch, start=2)), per_rank[-1][2:])


def test_shard_rows_of_a_full_batch_and_an_uneven_last_batch() -> None:
    y = torch.arange(10)
    loader = ArrayLoader(y, 4, shuffle=False, drop_last=False)
    got = [[b.tolist() for b in loader.shard(r, 4)] for r in range(4)]
    # batches [0..3], [4..7], [8, 9]: the 2-row last batch goes to ranks 0 and 1
    assert got == [[[0], [4], [8]], [[1], [5], [9]], [[2], [6], []], [[3], [7], []]]
    two = [[b.tolist() for b in loader.shard(r, 2)] for r in range(2)]
    assert two == [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7], [9]]]
    assert loader.shard(1, 2).rank == 1 and loader.shard(1, 2).world_size == 2
    assert loader.shard(1, 2).batch_size == 4


def test_device_argument_on_cpu() -> None:
    data = make_data(12)
    loader = ArrayLoader(data, 4, device="cpu", seed=1)
    assert loader.device == torch.device("cpu")
    assert_batches_equal(list(loader), expected_batches(loader, data, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_resident_on_cuda() -> None:
    data = make_data(50)
    loader = ArrayLoader(data, 8, device="cuda", seed=1, drop_last=False)
    assert loader.device.type == "cuda"  # moved once, at construction
    batches = list(loader.iter_epoch(2))
    assert all(b["x"].is_cuda and b["y"].is_cuda for b in batches)
    expected = expected_batches(loader, data, 2)
    assert_batches_equal([{k: v.cpu() for k, v in b.items()} for b in batches], expected)
    shard = loader.shard(1, 2)
    assert torch.equal(next(iter(shard.iter_epoch(2)))["y"].cpu(), expected[0]["y"][4:])


def test_properties_and_len() -> None:
    loader = ArrayLoader(make_data(23), 5, shuffle=False, drop_last=False, seed=9)
    assert (loader.num_samples, loader.batch_size, loader.shuffle, loader.drop_last, loader.seed) == (
        23, 5, False, False, 9
    )
    assert len(loader) == math.ceil(23 / 5) and len(ArrayLoader(make_data(23), 5)) == 23 // 5
    assert len(ArrayLoader(make_data(23), 23)) == 1
    assert "num_samples=23" in repr(loader)


# ----------------------------------------------------------------------------- errors


def test_error_empty_dataset() -> None:
    with pytest.raises(DataError, match="empty dataset.*0 samples"):
        ArrayLoader({"x": torch.zeros(0, 3)}, 4)
    with pytest.raises(DataError, match="no tensors"):
        ArrayLoader({}, 4)


def test_error_mismatched_leading_dims_names_both_paths() -> None:
    with pytest.raises(DataError) as info:
        ArrayLoader({"x": torch.zeros(10, 3), "y": torch.zeros(9)}, 2)
    msg = str(info.value)
    assert "['x']" in msg and "['y']" in msg and "10" in msg and "9" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, LightfnError)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None])
def test_error_bad_batch_size(bad) -> None:
    with pytest.raises(DataError, match="batch_size"):
        ArrayLoader(torch.zeros(10), bad)


def test_error_batch_larger_than_data_with_drop_last() -> None:
    with pytest.raises(DataError, match=r"batch_size=16 is larger than the dataset \(10 samples\).*drop_last=False"):
        ArrayLoader(torch.zeros(10), 16)
    # without drop_last it is one short batch
    assert [b.shape[0] for b in ArrayLoader(torch.zeros(10), 16, drop_last=False)] == [10]


def test_error_non_tensor_leaves() -> None:
    import numpy as np

    with pytest.raises(DataError, match=r"\['y'\] has type ndarray.*torch.as_tensor"):
        ArrayLoader({"x": torch.zeros(4), "y": np.zeros(4)}, 2)
    with pytest.raises(DataError, match=r"\[1\]\[0\] has type int"):
        ArrayLoader((torch.zeros(4), [1, 2, 3, 4]), 2)
    with pytest.raises(DataError, match="0-d"):
        ArrayLoader({"x": torch.zeros(4), "s": torch.tensor(1.0)}, 2)


def test_error_bad_shard_arguments() -> None:
    loader = ArrayLoader(torch.zeros(24), 6)
    with pytest.raises(DataError, match="batch_size=6 is not divisible by world_size=4"):
        loader.shard(0, 4)
    with pytest.raises(DataError, match="rank=2 must be < world_size=2"):
        loader.shard(2, 2)
    with pytest.raises(DataError, match="already a shard"):
        loader.shard(0, 2).shard(0, 1)


def test_error_bad_epoch_or_start() -> None:
    loader = ArrayLoader(torch.zeros(24), 6)
    with pytest.raises(DataError, match="start=5 is past the end of the epoch \\(4 batches\\)"):
        loader.iter_epoch(0, start=5)
    with pytest.raises(DataError, match="epoch must be >= 0"):
        loader.iter_epoch(-1)
    with pytest.raises(DataError, match="start must be >= 0"):
        iterate([1, 2], 0, start=-1)
    with pytest.raises(DataError, match="cannot iterate over int"):
        iterate(3, 0)


# ----------------------------------------------------------------------------- iterate / num_batches


def test_iterate_a_list_skips_start() -> None:
    batches = [torch.full((2,), float(i)) for i in range(5)]
    assert [b[0].item() for b in iterate(batches, epoch=0)] == [0, 1, 2, 3, 4]
    assert [b[0].item() for b in iterate(batches, epoch=3, start=2)] == [2, 3, 4]
    assert list(iterate(batches, 0, start=7)) == []
    assert num_batches(batches) == 5
    assert num_batches(b for b in batches) is None


def test_iterate_a_dataloader_resumes_exactly_when_its_order_is_fixed() -> None:
    ds = TensorDataset(torch.arange(20.0), torch.arange(20))
    dl = DataLoader(ds, batch_size=4, shuffle=False)
    full = [b[1].tolist() for b in iterate(dl, 0)]
    assert full == [list(range(i, i + 4)) for i in range(0, 20, 4)]
    assert [b[1].tolist() for b in iterate(dl, 1, start=3)] == full[3:]
    assert num_batches(dl) == 5


def test_iterate_sets_the_epoch_of_a_distributed_sampler() -> None:
    ds = TensorDataset(torch.arange(16))
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    dl = DataLoader(ds, batch_size=4, sampler=sampler)
    epoch2 = [b[0].tolist() for b in iterate(dl, 2)]
    assert sampler.epoch == 2
    sampler.set_epoch(2)
    assert sum(epoch2, []) == list(iter(sampler))
    # resuming epoch 2 at batch 1 after another epoch gives the same tail
    list(iterate(dl, 5))
    assert [b[0].tolist() for b in iterate(dl, 2, start=1)] == epoch2[1:]
    # also through a batch sampler
    bs = torch.utils.data.BatchSampler(sampler, batch_size=2, drop_last=False)
    list(iterate(DataLoader(ds, batch_sampler=bs), 7))
    assert sampler.epoch == 7


def test_num_batches_of_an_iterable_dataset_loader_is_none() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.arange(6))

    dl = DataLoader(Stream(), batch_size=2)
    assert num_batches(dl) is None
    assert [b.tolist() for b in iterate(dl, 0, start=1)] == [[2, 3], [4, 5]]
    assert num_batches(ArrayLoader(torch.zeros(10), 3)) == 3


# ------------------------------------------------------------------ Poisson sampling


def test_poisson_batches_are_fixed_capacity_masked_and_deterministic():
    x, y = torch.arange(200.0).unsqueeze(1), torch.arange(200)
    loader = ArrayLoader((x, y), poisson_rate=0.05, seed=7)
    assert len(loader) == 20 and loader.expected_batch_size == pytest.approx(10.0)
    assert loader.batch_size == lf.data.poisson_capacity(200, 0.05)
    batches = list(loader.iter_epoch(3))
    for b in batches:
        assert isinstance(b, lf.data.MaskedBatch) and b.mask.dtype == torch.bool
        assert b.data[0].shape == (loader.batch_size, 1) and b.mask.shape == (loader.batch_size,)
        rows = int(b.mask.sum())
        real = b.data[1][b.mask]
        assert torch.equal(b.data[0][b.mask].squeeze(1).long(), real)  # leaves stay aligned
        assert real.tolist() == sorted(set(real.tolist())) and len(real) == rows  # distinct rows
        assert torch.all(b.mask[:rows]) and not torch.any(b.mask[rows:])  # drawn rows first
    again = list(loader.iter_epoch(3))
    assert all(torch.equal(a.mask, b.mask) and torch.equal(a.data[1], b.data[1]) for a, b in zip(batches, again))
    # Exact resume mid-epoch, and a new epoch or seed draws new batches.
    tail = list(loader.iter_epoch(3, start=5))
    assert all(torch.equal(a.data[1], b.data[1]) for a, b in zip(batches[5:], tail)) and len(tail) == 15
    other = list(loader.iter_epoch(4))
    assert any(not torch.equal(a.data[1], b.data[1]) for a, b in zip(batches, other))


def test_poisson_inclusion_rate_is_q_for_every_row():
    n, q = 100, 0.1
    loader = ArrayLoader(torch.arange(n), poisson_rate=q, seed=0)
    counts = torch.zeros(n)
    sizes = []
    for epoch in range(60):  # 600 batches
        for b in loader.iter_epoch(epoch):
            counts[b.data[b.mask]] += 1
            sizes.append(int(b.mask.sum()))
    draws = 60 * len(loader)
    # Per-row inclusion frequency ~ q (binomial sd of the mean over 100 rows ~ 0.0012).
    assert (counts / draws).mean().item() == pytest.approx(q, abs=0.005)
    assert ((counts / draws) - q).abs().max().item() < 0.06
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.2)  # binomial, not fixed


def test_poisson_capacity_is_the_binomial_quantile():
    scipy_stats = pytest.importorskip("scipy.stats")
    for n, q in [(60_000, 0.004), (100, 0.1), (1000, 0.001), (50, 1e-4)]:
        c = lf.data.poisson_capacity(n, q)
        assert scipy_stats.binom.sf(c, n, q) <= 1e-6 < scipy_stats.binom.sf(c - 1, n, q)
    assert lf.data.poisson_capacity(10, 1.0) == 10


def test_poisson_overflow_keeps_capacity_rows_and_warns_once():
    loader = ArrayLoader(torch.arange(100), poisson_rate=0.5, batch_size=30, seed=0)
    with pytest.warns(UserWarning, match="more than its capacity batch_size=30") as record:
        batches = list(loader.iter_epoch(0)) + list(loader.iter_epoch(1))
    assert len([w for w in record if "capacity" in str(w.message)]) == 1
    assert all(b.mask.shape == (30,) for b in batches)
    assert all(int(b.mask.sum()) == 30 for b in batches)  # P[Bin(100, .5) <= 30] is 4e-5
    assert all(len(set(b.data.tolist())) == 30 for b in batches)


def test_poisson_arguments_are_checked():
    with pytest.raises(DataError, match="poisson_rate"):
        ArrayLoader(torch.arange(10), poisson_rate=0.0)
    with pytest.raises(DataError, match="poisson_rate"):
        ArrayLoader(torch.arange(10), poisson_rate=1.5)
    with pytest.raises(DataError, match="needs a batch_size"):
        ArrayLoader(torch.arange(10))
    loader = ArrayLoader(torch.arange(10), poisson_rate=0.5)
    with pytest.raises(DataError, match="Poisson"):
        loader.shard(0, 2)
    with pytest.raises(DataError, match="Poisson"):
        loader.order(0)
