import dataclasses

import pytest
import torch

import lightfn as lf
from lightfn import tree


@tree.pytree_dataclass
class Pair:
    a: torch.Tensor
    b: dict
    name: str = tree.static_field(default="p")


def test_map_leaves_and_paths_name_keys_attributes_and_indices():
    t = {"w": torch.ones(2), "layers": [torch.zeros(1), (torch.ones(3),)], "pair": Pair(a=torch.ones(1), b={"x.y": torch.ones(2)})}
    doubled = tree.map(lambda x: x * 2, t)
    assert doubled["w"].tolist() == [2.0, 2.0]
    assert doubled["pair"].name == "p" and isinstance(doubled["pair"], Pair)
    paths = [tree.keystr(p) for p, _ in tree.leaves_with_path(t)]
    assert paths == ["['layers'][0]", "['layers'][1][0]", "['pair']['a']", "['pair']['b']['x.y']", "['w']"]
    assert len(tree.leaves(t)) == 5
    leaves, treedef = tree.flatten(t)
    assert tree.structure(tree.unflatten(treedef, leaves)) == treedef


def test_dataclass_is_a_node_not_a_leaf_and_static_fields_stay_in_treedef():
    p = Pair(a=torch.ones(1), b={"c": torch.ones(1)}, name="q")
    assert len(tree.leaves(p)) == 2
    q = p.replace(name="r")
    assert tree.structure(p) != tree.structure(q)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.a = torch.zeros(1)


def test_global_norm_cast_zeros_device_size():
    t = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0], dtype=torch.bfloat16), "n": torch.tensor(7)}
    assert tree.global_norm({"a": t["a"], "b": t["b"]}).item() == pytest.approx(5.0)
    c = tree.cast(t, torch.float64)
    assert c["a"].dtype == torch.float64 and c["b"].dtype == torch.float64 and c["n"].dtype == torch.int64
    assert tree.zeros_like(t)["a"].tolist() == [0.0]
    assert tree.to_device(t, "cpu")["a"] is t["a"]
    assert tree.size(t) == 3


def test_where_picks_leafwise():
    a, b = {"x": torch.ones(2)}, {"x": torch.zeros(2)}
    assert tree.where(torch.tensor(False), a, b)["x"].tolist() == [0.0, 0.0]


def test_structure_mismatch_names_paths():
    with pytest.raises(lf.TreeError) as e:
        tree.assert_same_structure({"a": torch.ones(1), "b": torch.ones(2)}, {"a": torch.ones(1), "c": torch.ones(2)})
    assert "['b']: missing" in str(e.value) and "['c']: unexpected" in str(e.value)
    with pytest.raises(lf.TreeError) as e:
        tree.assert_same_structure({"a": torch.ones(2)}, {"a": torch.ones(3)}, check_shapes=True)
    assert "tensor(2,) float32" in str(e.value) and "tensor(3,)" in str(e.value)
    with pytest.raises(lf.TreeError):
        tree.map(lambda x, y: x + y, {"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_torch_pytree_sees_dataclass_fields():
    import torch.utils._pytree as tp

    p = Pair(a=torch.ones(1), b={"c": torch.ones(1)})
    leaves, spec = tp.tree_flatten(p)
    assert len(leaves) == 2
    assert tp.tree_unflatten(leaves, spec).name == "p"


def test_leaves_and_flatten_trace_trees_with_constant_only_dicts():
    # dynamo's optree polyfill cannot flatten {"a": None}; lf.tree must still trace it
    t = {"mask": {"a": None, "b": None}, "w": Pair(a=torch.ones(2), b={"c": torch.ones(1)})}

    @torch.compile(fullgraph=True, backend="eager")
    def f(t):
        leaves, treedef = tree.flatten(t)
        rebuilt = tree.unflatten(treedef, [None if x is None else x * 2 for x in leaves])
        return tree.global_norm(rebuilt), len(tree.leaves(t)), tree.structure(t) == treedef

    norm, n, same = f(t)
    assert n == 2 and same and norm.item() == pytest.approx(12**0.5)


# ----------------------------------------------------------------------------- stack / unstack


def _member_state(seed):
    torch.manual_seed(seed)
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    return lf.TrainState.create(params=params, optimizer=lf.optim.adam(1e-3), seed=seed)


def test_stack_and_unstack_train_states_round_trip_exactly():
    members = [_member_state(s) for s in range(3)]
    stacked = tree.stack(members)
    assert isinstance(stacked, lf.TrainState)
    assert stacked.params["w"].shape == (3, 3, 2) and stacked.rng.shape == (3, 2) and stacked.step.shape == (3,)
    for i, m in enumerate(members):
        assert torch.equal(stacked.params["w"][i], m.params["w"])
        assert torch.equal(stacked.opt_state[0].mu["b"][i], m.opt_state[0].mu["b"])
    back = tree.unstack(stacked)
    assert len(back) == 3
    for m, b in zip(members, back):
        assert tree.structure(m) == tree.structure(b)
        for x, y in zip(tree.leaves(m), tree.leaves(b)):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_stack_keeps_equal_non_tensor_leaves_once():
    s = tree.stack([{"w": torch.zeros(2), "n": 3}, {"w": torch.ones(2), "n": 3}])
    assert s["n"] == 3 and s["w"].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert [t["n"] for t in tree.unstack(s)] == [3, 3]


def test_stack_errors_name_the_first_differing_path():
    a = {"enc": {"w": torch.zeros(2, 3)}, "dec": torch.zeros(4)}
    with pytest.raises(lf.TreeError, match=r"\['enc'\]\['w'\]: shape \(3, 3\) in trees\[1\], \(2, 3\) in trees\[0\]"):
        tree.stack([a, {"enc": {"w": torch.zeros(3, 3)}, "dec": torch.zeros(4)}])
    with pytest.raises(lf.TreeError, match=r"\['dec'\]: dtype float64 in trees\[2\], float32 in trees\[0\]"):
        tree.stack([a, a, {"enc": {"w": torch.zeros(2, 3)}, "dec": torch.zeros(4, dtype=torch.float64)}])
    with pytest.raises(lf.TreeError, match=r"different structure.*\['enc'\]\['v'\]"):
        tree.stack([a, {"enc": {"v": torch.zeros(2, 3)}, "dec": torch.zeros(4)}])
    with pytest.raises(lf.TreeError, match=r"\['n'\]: trees\[0\] has a int, trees\[1\] has a tensor of shape \(1,\) float32"):
        tree.stack([{"n": 1}, {"n": torch.zeros(1)}])
    with pytest.raises(lf.TreeError, match=r"\['n'\]: the non-tensor leaf is 2 in trees\[1\], 1 in trees\[0\]"):
        tree.stack([{"n": 1, "w": torch.zeros(1)}, {"n": 2, "w": torch.zeros(1)}])
    with pytest.raises(lf.TreeError, match="at least one tree"):
        tree.stack([])


def test_unstack_errors_on_unstacked_or_ragged_trees():
    with pytest.raises(lf.TreeError, match=r"\['b'\] is a 0-d tensor"):
        tree.unstack({"a": torch.zeros(2), "b": torch.zeros(())})
    with pytest.raises(lf.TreeError, match=r"\['a'\] has 2 members.*\['b'\] has 3"):
        tree.unstack({"a": torch.zeros(2, 1), "b": torch.zeros(3)})
