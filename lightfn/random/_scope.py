"""``rng_scope``: torch's random functions (dropout, ``torch.rand``...) routed to a key.

A ``TorchFunctionMode`` dynamo traces into one graph; the n-th random call in the scope
draws from ``fold_in(key, n)`` (see :mod:`lightfn.random`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import StepError
from . import _attention
from ._keys import bernoulli, check_key, dropout, fold_in, normal, randint, uniform

__all__ = ["rng_scope"]



def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    size = kwargs.get("size", args)
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = size[0]
    return tuple(int(s) for s in size)


class rng_scope(TorchFunctionMode):
    """Route torch's random functions to ``key`` while the scope is open.

    Covers ``F.dropout``/``nn.Dropout``, ``torch.rand``/``randn``/``rand_like``/
    ``randn_like``/``randint``/``bernoulli``/``normal`` and ``Tensor.uniform_``/
    ``normal_``/``bernoulli_``. The n-th random call in the scope draws from
    ``fold_in(key, n)``, so results depend only on the key and the program, never on
    torch's global generator. Other random functions raise :class:`StepError` rather than
    silently drawing numbers a resumed run could not reproduce.

    Under ``torch.compile`` (torch 2.14) dropout, ``rand``, ``randint``, ``bernoulli`` and
    ``uniform_`` give the same bits as eagerly and normal draws agree to float rounding,
    but dynamo does not route ``rand_like``/``randn_like`` through function modes: inside
    compiled steps write ``torch.rand(x.shape)`` or use :func:`uniform` with a key. Torch
    2.11's dynamo does not route ``rand``/``randn``/``randint`` either (dropout,
    ``bernoulli`` and ``uniform_`` it does): there, steps that ``torch.compile`` compiles
    should draw with :func:`uniform`/:func:`normal`/:func:`randint` and a key. ``fit``'s
    default compiled steps are captured without dynamo (``make_fx``), where every
    function above is routed on both versions.

    ``key`` may also be a function of no arguments that returns the key: it is called on the
    scope's first random draw, and never if nothing is drawn (``lf.train_step`` passes
    ``lambda: fold_in(state.rng, state.step)`` when it runs eagerly, so a step without
    randomness derives no key).
    """

    def __init__(self, key: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self._key = key if callable(key) else check_key(key)
        self.count = 0

    @property
    def key(self) -> torch.Tensor:
        if callable(self._key):
            self._key = check_key(self._key())
        return self._key

    def _next(self) -> torch.Tensor:
        self.count += 1
        return fold_in(self.key, self.count)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(self, args, kwargs)
        if func in _UNSUPPORTED:
            raise StepError(
                f"{getattr(func, '__name__', func)} inside a lightfn step would draw from torch's global RNG, "
                "which is not part of the train state, so a resumed run could not reproduce it. "
                "Use lf.random (uniform, normal, bernoulli, randint) with a key instead."
            )
        return func(*args, **kwargs)

    def _dropout(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        x = args[0] if args else kwargs["input"]
        p = float(_arg(args, kwargs, 1, "p", 0.5))
        training = bool(_arg(args, kwargs, 2, "training", True))
        if not training:
            return x
        return dropout(self._next(), x, p, True)

    def _feature_dropout(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        # Whole channels are dropped: one draw per (sample, channel), broadcast over space.
        x = args[0] if args else kwargs["input"]
        p = float(_arg(args, kwargs, 1, "p", 0.5))
        if not bool(_arg(args, kwargs, 2, "training", True)) or p == 0.0:
            return x
        mask_shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2) if x.dim() > 2 else (x.shape[0],) + (1,) * (x.dim() - 1)
        keep = uniform(self._next(), mask_shape, torch.float32, x.device) >= p
        return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros_like(x))

    def _attention(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        # Attention dropout runs as keyed plain ops (see lightfn/random/_attention.py for why).
        p = float(_arg(args, kwargs, 4, "dropout_p", 0.0))
        if p == 0.0:
            return F.scaled_dot_product_attention(*args, **kwargs)
        q, k, v = (_arg(args, kwargs, i, n, None) for i, n in enumerate(("query", "key", "value")))
        return _attention.sdpa(
            q, k, v, attn_mask=_arg(args, kwargs, 3, "attn_mask", None), dropout_p=p, drop=self._drop,
            is_causal=bool(_arg(args, kwargs, 5, "is_causal", False)), scale=_arg(args, kwargs, 6, "scale", None),
            enable_gqa=bool(_arg(args, kwargs, 7, "enable_gqa", False)),
        )

    def _multi_head_attention(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # nn.MultiheadAttention's inner SDPA / dropout calls are invisible to this mode (it
        # is off while handling a call), so with its dropout active the function is rebuilt.
        bound = _attention.bind_mha(args, kwargs)
        if not bound["training"] or float(bound["dropout_p"]) == 0.0:
            return F.multi_head_attention_forward(*args, **kwargs)
        return _attention.multi_head_attention(bound, self._drop)

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return dropout(self._next(), x, p, True)

    def _factory(self, kwargs: dict[str, Any], like: torch.Tensor | None) -> tuple[torch.dtype, Any]:
        dtype = kwargs.get("dtype") or (like.dtype if like is not None else torch.get_default_dtype())
        device = kwargs.get("device") or (like.device if like is not None else self.key.device)
        return dtype, device

    def _rand(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        dtype, device = self._factory(kwargs, None)
        return uniform(self._next(), _shape(args, kwargs), dtype, device)

    def _randn(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        dtype, device = self._factory(kwargs, None)
        return normal(self._next(), _shape(args, kwargs), dtype, device)

    def _rand_like(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        dtype, device = self._factory(kwargs, args[0])
        return uniform(self._next(), args[0].shape, dtype, device)

    def _randn_like(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        dtype, device = self._factory(kwargs, args[0])
        return normal(self._next(), args[0].shape, dtype, device)

    def _randint(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        ints = [a for a in args if isinstance(a, int)]
        size = kwargs.get("size", next((a for a in args if isinstance(a, (tuple, list, torch.Size))), None))
        low, high = (0, ints[0]) if len(ints) == 1 else (ints[0], ints[1])
        low, high = kwargs.get("low", low), kwargs.get("high", high)
        device = kwargs.get("device") or self.key.device
        out = randint(self._next(), low, high, tuple(size), device)
        return out.to(kwargs.get("dtype") or torch.int64)

    def _bernoulli(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        probs = args[0] if args else kwargs["input"]
        p = _arg(args, kwargs, 1, "p", None)
        p = probs if p is None else p
        return bernoulli(self._next(), p, probs.shape, probs.device).to(probs.dtype)

    def _normal(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        mean = _arg(args, kwargs, 0, "mean", 0.0)
        std = _arg(args, kwargs, 1, "std", 1.0)
        size = kwargs.get("size", args[2] if len(args) > 2 else None)
        ref = mean if isinstance(mean, torch.Tensor) else std if isinstance(std, torch.Tensor) else None
        shape = tuple(size) if size is not None else torch.broadcast_shapes(
            *(t.shape for t in (mean, std) if isinstance(t, torch.Tensor))
        )
        dtype, device = self._factory(kwargs, ref)
        return normal(self._next(), shape, dtype, device) * std + mean

    def _uniform_(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        t = args[0]
        low, high = float(_arg(args, kwargs, 1, "from", 0.0)), float(_arg(args, kwargs, 2, "to", 1.0))
        return t.copy_(uniform(self._next(), t.shape, t.dtype, t.device, low, high))

    def _normal_(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        t = args[0]
        mean, std = float(_arg(args, kwargs, 1, "mean", 0.0)), float(_arg(args, kwargs, 2, "std", 1.0))
        return t.copy_(normal(self._next(), t.shape, t.dtype, t.device) * std + mean)

    def _bernoulli_(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        t = args[0]
        p = _arg(args, kwargs, 1, "p", 0.5)
        return t.copy_(bernoulli(self._next(), p, t.shape, t.device).to(t.dtype))


# Looked up per torch call inside a scope: one table for all scopes, not one per scope.
_HANDLERS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.dropout: rng_scope._dropout,
    F.dropout1d: rng_scope._feature_dropout,
    F.dropout2d: rng_scope._feature_dropout,
    F.dropout3d: rng_scope._feature_dropout,
    torch.rand: rng_scope._rand,
    torch.randn: rng_scope._randn,
    torch.rand_like: rng_scope._rand_like,
    torch.randn_like: rng_scope._randn_like,
    torch.randint: rng_scope._randint,
    torch.bernoulli: rng_scope._bernoulli,
    torch.normal: rng_scope._normal,
    torch.Tensor.uniform_: rng_scope._uniform_,
    torch.Tensor.normal_: rng_scope._normal_,
    torch.Tensor.bernoulli_: rng_scope._bernoulli_,
    F.scaled_dot_product_attention: rng_scope._attention,
    F.multi_head_attention_forward: rng_scope._multi_head_attention,
}

_UNSUPPORTED = frozenset(
    {
        torch.multinomial,
        torch.poisson,
        torch.randperm,
        torch.randint_like,
        torch.Tensor.random_,
        torch.Tensor.exponential_,
        torch.Tensor.geometric_,
        torch.Tensor.cauchy_,
        torch.Tensor.log_normal_,
        F.alpha_dropout,
        F.feature_alpha_dropout,
    }
)
