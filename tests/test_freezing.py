"""train_step(trainable=...): frozen params, trainable partitions, eval-mode submodules."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lightfn as lf
from lightfn.callbacks import ModelCheckpoint
from lightfn.errors import StepError

F64 = torch.float64


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3),
    ).to(F64)


def cnn_data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


FROZEN = ("0.weight", "0.bias", "2.weight", "5.bias")  # a frozen backbone plus one stray leaf


def frozen_pred(path, leaf):
    return path[0] not in FROZEN


def cnn_problem():
    model = cnn()
    apply, params = lf.functionalize(model)

    def loss_fn(p, batch):
        x, y = batch
        logits = apply(p, x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).to(F64).mean()}

    return model, loss_fn, params


def batches(k=5):
    return [cnn_data(seed=s) for s in range(k)]


def train(step, state, bs):
    for b in bs:
        state, _ = step(state, b)
    return state


# ----------------------------------------------------------------------------- partitions and errors


def test_partition_combine_and_prefix_equals_predicate():
    params = {"backbone": {"w": torch.ones(2), "b": torch.zeros(1)}, "head": [torch.ones(3)]}
    train_part, frozen_part = lf.partition(params, {"backbone": False, "head": True})
    assert train_part == {"backbone": {"w": None, "b": None}, "head": [params["head"][0]]}
    assert frozen_part["head"] == [None] and frozen_part["backbone"]["w"] is params["backbone"]["w"]
    back = lf.combine(train_part, frozen_part)
    assert all(a is b for a, b in zip(lf.tree.leaves(back), lf.tree.leaves(params)))
    by_pred = lf.partition(params, lambda path, x: path[0] == "head")
    assert lf.tree.structure(by_pred[0]) == lf.tree.structure(train_part)


def test_bad_trainable_is_refused_naming_the_path():
    params = {"backbone": {"w": torch.ones(2)}, "head": {"w": torch.ones(2)}}
    with pytest.raises(StepError, match=r"\['head'\]: missing"):
        lf.partition(params, {"backbone": False})
    with pytest.raises(StepError, match=r"\['heads'\]: not in the params"):
        lf.partition(params, {"backbone": False, "head": True, "heads": True})
    with pytest.raises(StepError, match=r"params\['head'\]\['w'\] must be a Python bool, got Tensor"):
        lf.partition(params, {"backbone": False, "head": {"w": torch.tensor(True)}})
    with pytest.raises(StepError, match=r"params\['backbone'\]\['w'\] must be a Python bool, got int"):
        lf.partition(params, lambda path, x: int(path[0] == "head"))
    with pytest.raises(StepError, match="marks none of the 2 params as trainable"):
        lf.TrainState.create(params=params, optimizer=lf.optim.sgd(0.1), trainable={"backbone": False, "head": False})
    step = lf.train_step(lambda p, b: p["head"]["w"].sum(), lf.optim.sgd(0.1), trainable=lambda path, x: False)
    with pytest.raises(StepError, match="nothing to train"):
        step(lf.TrainState.create(params=params, optimizer=lf.optim.sgd(0.1)), None)


def test_a_state_built_without_trainable_is_refused_with_the_fix():
    _, loss_fn, params = cnn_problem()
    opt = lf.optim.adam(1e-2)
    step = lf.train_step(loss_fn, opt, trainable=frozen_pred)
    with pytest.raises(StepError, match=r"missing.*\n.*TrainState.create\(params=\.\.\., optimizer=opt, trainable="):
        step(lf.TrainState.create(params=params, optimizer=opt), cnn_data())


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("make_opt", [lambda: lf.optim.sgd(0.1, momentum=0.9), lambda: lf.optim.adamw(1e-2, weight_decay=0.1)])
def test_equals_training_with_frozen_params_closed_over(make_opt):
    _, loss_fn, params = cnn_problem()
    opt = make_opt()
    state = train(lf.train_step(loss_fn, opt, trainable=frozen_pred),
                  lf.TrainState.create(params=params, optimizer=opt, trainable=frozen_pred), batches())
    frozen = {k: v for k, v in params.items() if k in FROZEN}
    ref_loss = lambda p, b: loss_fn({**p, **frozen}, b)  # noqa: E731
    trainable = {k: v for k, v in params.items() if k not in FROZEN}
    ref = train(lf.train_step(ref_loss, opt), lf.TrainState.create(params=trainable, optimizer=opt), batches())
    for k in FROZEN:
        assert state.params[k] is params[k]  # the very tensor: bit-identical, never copied
    for k, v in ref.params.items():
        torch.testing.assert_close(state.params[k], v, rtol=0, atol=1e-12)
        assert not torch.equal(v, params[k])  # it did train


def test_opt_state_has_no_leaves_for_frozen_params():
    _, loss_fn, params = cnn_problem()
    state = lf.TrainState.create(params=params, optimizer=lf.optim.adam(1e-2), trainable=frozen_pred)
    named = [lf.tree.keystr(p) for p, x in lf.tree.leaves_with_path(state.opt_state) if x.ndim > 0]
    assert named and not [n for n in named if any(f"'{k}'" in n for k in FROZEN)]
    trainable = [k for k in params if k not in FROZEN]
    assert len(named) == 2 * len(trainable)  # mu and nu, one each per trainable leaf
    step = lf.train_step(loss_fn, lf.optim.adam(1e-2), trainable=frozen_pred)
    assert step.init_opt_state(params)[0].mu.keys() == state.opt_state[0].mu.keys()
    after, _ = step(state, cnn_data())
    assert lf.tree.structure(after.opt_state) == lf.tree.structure(state.opt_state)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_matches_torch_with_requires_grad_false(kind):
    model, loss_fn, params = cnn_problem()
    for name, p in model.named_parameters():
        p.requires_grad_(name not in FROZEN)
    trained = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        topt, opt = torch.optim.SGD(trained, lr=0.1, momentum=0.9), lf.optim.sgd(0.1, momentum=0.9)
    else:
        topt, opt = torch.optim.Adam(trained, lr=1e-2), lf.optim.adam(1e-2)
    state = train(lf.train_step(loss_fn, opt, trainable=frozen_pred),
                  lf.TrainState.create(params=params, optimizer=opt, trainable=frozen_pred), batches(6))
    for x, y in batches(6):
        topt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        topt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=0, atol=1e-10)
        if name in FROZEN:
            assert p.grad is None and torch.equal(state.params[name], params[name])


def test_frozen_backbone_gets_no_backward():
    # Autograd tracks only the head's leaves: the frozen one is a plain constant in the loss.
    params = {"backbone": torch.ones(3, dtype=F64), "head": torch.ones(3, dtype=F64)}

    def loss_fn(p, x):
        return (x * p["backbone"] * p["head"]).sum()

    calls = []

    def loss_counting(p, x):
        out = loss_fn(p, x)
        calls.append(torch._C._functorch.is_gradtrackingtensor(p["backbone"]))
        return out

    opt = lf.optim.sgd(1.0)
    step = lf.train_step(loss_counting, opt, trainable={"backbone": False, "head": True})
    state, _ = step(lf.TrainState.create(params=params, optimizer=opt, trainable={"backbone": False, "head": True}),
                    torch.tensor([1.5, 2.5, -1.0], dtype=F64))
    assert calls == [False]  # the frozen leaf reached the loss as a plain constant
    assert state.params["head"].tolist() == [-0.5, -1.5, 2.0] and state.params["backbone"].tolist() == [1.0] * 3


# ----------------------------------------------------------------------------- fit, checkpoints


def _loader():
    x, y = cnn_data(n=32, seed=7)
    return lf.data.ArrayLoader((x, y), batch_size=8, shuffle=False)


def test_under_fit_and_resume_from_a_checkpoint(tmp_path):
    _, loss_fn, params = cnn_problem()
    opt = lf.optim.adam(1e-2)
    step = lf.train_step(loss_fn, opt, trainable=frozen_pred)
    fresh = lf.TrainState.create(params=params, optimizer=opt, trainable=frozen_pred)
    straight = lf.fit(step, fresh, _loader(), max_epochs=3, jit=False, progress=False)
    assert int(straight.step) == 12
    for k in FROZEN:
        assert torch.equal(straight.params[k], params[k])
    # manual loop over the same batches gives the same numbers
    manual = fresh
    for _ in range(3):
        manual = train(step, manual, list(_loader()))
    for k in params:
        torch.testing.assert_close(straight.params[k], manual.params[k], rtol=0, atol=1e-12)

    lf.fit(step, fresh, _loader(), max_epochs=2, jit=False, progress=False, callbacks=[ModelCheckpoint(tmp_path)])
    loaded = lf.load(tmp_path / "last.safetensors", like=fresh)
    assert lf.tree.structure(loaded.opt_state) == lf.tree.structure(fresh.opt_state)
    resumed = lf.fit(step, fresh, _loader(), max_epochs=3, jit=False, progress=False,
                     resume_from=tmp_path / "last.safetensors")
    for a, b in zip(lf.tree.leaves(resumed), lf.tree.leaves(straight)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_save_load_continue_equals_straight(tmp_path):
    _, loss_fn, params = cnn_problem()
    opt = lf.optim.sgd(0.1, momentum=0.9)
    step = lf.train_step(loss_fn, opt, trainable={k: k not in FROZEN for k in params})
    fresh = lf.TrainState.create(params=params, optimizer=opt, trainable=step.trainable)
    bs = batches(6)
    straight = train(step, fresh, bs)
    lf.save(tmp_path / "s.safetensors", train(step, fresh, bs[:3]))
    resumed = train(step, lf.load(tmp_path / "s.safetensors", like=fresh), bs[3:])
    for a, b in zip(lf.tree.leaves(resumed), lf.tree.leaves(straight)):
        assert torch.equal(a, b)


def test_fit_clipping_reinitializes_only_the_trainable_opt_state():
    _, loss_fn, params = cnn_problem()
    opt = lf.optim.sgd(0.1)
    step = lf.train_step(loss_fn, opt, trainable=frozen_pred)
    state = lf.TrainState.create(params=params, optimizer=opt, trainable=frozen_pred)
    out = lf.fit(step, state, _loader(), max_epochs=1, jit=False, progress=False, gradient_clip_val=0.5,
                 accumulate_grad_batches=2)
    assert int(out.step) == 4
    for k in FROZEN:
        assert torch.equal(out.params[k], params[k])


@pytest.mark.compile
def test_compiled_matches_eager():
    # Both forms: a path predicate (paths must read the same inside the trace) and a dict
    # whose insertion order ("0.weight" before "0.bias") is not optree's sorted order.
    _, loss_fn, params = cnn_problem()
    opt = lf.optim.adam(1e-2)
    for trainable in (frozen_pred, {k: k not in FROZEN for k in params}):
        step = lf.train_step(loss_fn, opt, trainable=trainable)
        fresh = lf.TrainState.create(params=params, optimizer=opt, trainable=trainable)
        eager = train(step, fresh, batches(3))
        compiled = train(lf.jit(step), fresh, batches(3))
        for a, b in zip(lf.tree.leaves(compiled), lf.tree.leaves(eager)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        for k in FROZEN:
            assert torch.equal(compiled.params[k], params[k])


# ----------------------------------------------------------------------------- eval-mode submodules


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        return self.head(self.backbone(x))


def test_eval_modules_keep_a_frozen_backbone_in_eval_mode():
    torch.manual_seed(0)
    net = Net().to(F64)
    x = torch.randn(8, 1, 6, 6, dtype=F64)
    apply, params, buffers = lf.functionalize(net, with_state=True, eval_modules=["backbone"])
    out, new_buffers = apply(params, buffers, x)
    ref = Net().to(F64)
    ref.load_state_dict(net.state_dict())
    ref.train()
    ref.backbone.eval()
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-12)  # dropout off, running stats read
    for k, v in buffers.items():
        changed = not torch.equal(new_buffers[k], v)
        assert changed == k.startswith("head."), k
        torch.testing.assert_close(new_buffers[k], ref.state_dict()[k], rtol=0, atol=1e-12)
    assert net.training and net.backbone.training  # the caller's module is not switched


def test_eval_modules_need_no_state_when_every_batchnorm_is_in_eval():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(StepError, match="with_state=True"):
        lf.functionalize(net)
    apply, params = lf.functionalize(net, eval_modules=["1"])
    x = torch.randn(5, 3)
    net[1].eval()
    torch.testing.assert_close(apply(params, x), net(x))
    with pytest.raises(StepError, match=r"eval_modules \['backbone'\] are not submodules of Sequential"):
        lf.functionalize(net, eval_modules=["backbone"])
