"""A character-level transformer language model: bf16 autocast, clipping, accumulation, perplexity.

    python examples/transformer_lm.py                       # a built-in corpus, eagerly
    python examples/transformer_lm.py --text my.txt         # any text file
    python examples/transformer_lm.py --jit                 # compiled (minutes of compilation on a CPU)

The model is two ``nn.TransformerEncoderLayer``\\ s under a causal mask (a GPT-style decoder),
turned into a pure function by ``lf.functionalize``. The optimizer is one
``lf.optim`` chain: global-norm clipping, then AdamW on a linear-warmup + cosine schedule,
all inside ``lf.optim.multi_steps`` so the gradients of ``--accumulate`` batches are
averaged per update (the schedule counts updates, not batches). ``precision="bf16-mixed"``
autocasts the forward inside the step; params and optimizer state stay float32.

Perplexity is ``exp(total NLL / total tokens)`` over the whole validation set, not a mean of
per-batch perplexities: the eval loss function returns the NLL *summed* over each row's
tokens and the row's token count (each divided by the batch's rows, so fit's row-weighted
means are total / rows for both), and the :class:`Perplexity` callback divides the two.
At the end text is sampled from the trained params with temperature, by the Gumbel-max
trick on ``lf.random`` keys: the same seed gives the same text.

The built-in corpus is made up here, deterministically: a few hundred KB would be too slow
for a CPU, so it is ~40 KB of sentences like ``"7 plus 5 is 12."`` and ``"the red cat sees
a small dog."``: a model that learns the grammar gets a low perplexity, one that learns the
arithmetic too gets lower still.
"""

from __future__ import annotations

import math
import pathlib
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import lightfn as lf
from lightfn.fit import fit

from _common import describe_jit, example_parser, jit_arg, setup

_NOUNS = ("cat", "dog", "bird", "fish", "fox", "horse", "mouse", "owl")
_ADJECTIVES = ("red", "small", "big", "old", "quick", "lazy", "green", "happy")
_VERBS = ("sees", "likes", "chases", "follows", "helps", "finds")


def builtin_corpus(n_sentences: int = 2400, seed: int = 0) -> str:
    """``n_sentences`` sentences, half arithmetic, half a tiny grammar; the same text for a seed."""
    rng = random.Random(seed)  # a local generator: the text depends on the seed only

    def noun_phrase() -> str:
        det = rng.choice(("the", "a"))
        return f"{det} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}" if rng.random() < 0.5 else f"{det} {rng.choice(_NOUNS)}"

    sentences = []
    for _ in range(n_sentences):
        if rng.random() < 0.5:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            op = rng.choice(("plus", "minus")) if a >= b else "plus"
            sentences.append(f"{a} {op} {b} is {a + b if op == 'plus' else a - b}.")
        else:
            sentences.append(f"{noun_phrase()} {rng.choice(_VERBS)} {noun_phrase()}.")
    return " ".join(sentences) + "\n"


class CharTransformer(nn.Module):
    """Token + learned position embeddings, causal encoder layers, a linear head."""

    def __init__(self, vocab: int, *, context: int, width: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=dropout, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        # -inf above the diagonal: position i attends to positions <= i only
        mask = torch.full((t, t), float("-inf"), device=tokens.device).triu(1)
        h = self.embed(tokens) + self.position[:t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class Perplexity(lf.callbacks.Callback):
    """Log ``val/ppl = exp(val/nll_sum / val/tokens)`` after every validation (and in lf.validate).

    Both are fit's row-weighted means of per-row sums, i.e. totals over the set divided by
    the same row count, so their ratio is the NLL per token over the whole set.
    """

    def on_validation_end(self, ctx: lf.callbacks.Context) -> lf.callbacks.Signal | None:
        nll, tokens = ctx.metrics.get("val/nll_sum"), ctx.metrics.get("val/tokens")
        if ctx.stage == "sanity" or nll is None or not tokens:  # fit's sanity pass is not logged
            return None
        return lf.callbacks.Signal(log={"val/ppl": math.exp(nll / tokens)})


def windows(ids: torch.Tensor, context: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-character targets), both ``(n, context)``, from windows every ``stride``."""
    starts = torch.arange(0, len(ids) - context - 1, stride)
    rows = ids[starts[:, None] + torch.arange(context + 1)]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def sample(apply, params, prompt: list[int], n: int, *, context: int, temperature: float, key: torch.Tensor) -> list[int]:
    """``n`` characters after ``prompt``, each drawn as argmax(logits / T + Gumbel noise)."""
    ids = list(prompt)
    with torch.no_grad():
        for i in range(n):
            x = torch.tensor([ids[-context:]])
            logits = apply(params, x, train=False)[0, -1].float()
            u = lf.random.uniform(lf.random.fold_in(key, i), logits.shape).clamp(min=1e-12)
            ids.append(int((logits / temperature - torch.log(-torch.log(u))).argmax()))
    return ids[len(prompt):]


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__.splitlines()[0], "transformer_lm", max_epochs=8, batch_size=32, lr=3e-3)
    parser.add_argument("--text", type=pathlib.Path, default=None, help="train on this text file instead of the built-in corpus")
    parser.add_argument("--context", type=int, default=64, help="characters per training window (default 64)")
    parser.add_argument("--width", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    parser.add_argument("--accumulate", type=int, default=2, help="batches averaged per optimizer update (default 2)")
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (default 1.0)")
    parser.add_argument("--warmup", type=int, default=30, help="warmup updates (default 30)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--sample-chars", type=int, default=160, help="characters to sample at the end (default 160)")
    # Eager by default: on a CPU, compiling this step (bf16 autocast, attention and their
    # backward, the accumulation's two branches) takes minutes, longer than the training
    # itself at these sizes; compiled and eager runs give the same numbers.
    parser.add_argument("--jit", dest="no_jit", action="store_false", help="compile the steps with lf.jit (default: eager)")
    parser.set_defaults(no_jit=True)
    args = parser.parse_args(argv)
    setup(args)
    t0 = time.monotonic()

    text = args.text.read_text() if args.text is not None else builtin_corpus(seed=args.seed)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    split = int(0.9 * len(ids))
    train_x, train_y = windows(ids[:split], args.context, args.context // 2)  # half-overlapping
    val_x, val_y = windows(ids[split:], args.context, args.context)
    source = str(args.text) if args.text is not None else "built-in corpus"
    print(f"data: {source}: {len(text):,} characters, vocabulary {len(chars)}; "
          f"{len(train_x)} train / {len(val_x)} val windows of {args.context}")

    model = CharTransformer(len(chars), context=args.context, width=args.width, heads=4, layers=args.layers, dropout=0.1)
    apply, params = lf.functionalize(model.train())

    def loss_fn(params, batch):
        x, y = batch
        logits = apply(params, x, train=True)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def eval_loss_fn(params, batch):
        x, y = batch
        logits = apply(params, x, train=False)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        rows = x.shape[0]
        # per-row sums: fit's row-weighted mean of each is (set total) / (set rows)
        return nll / y.numel(), {"nll_sum": nll / rows, "tokens": torch.tensor(y.numel() / rows)}

    train = lf.data.ArrayLoader((train_x, train_y), batch_size=args.batch_size, seed=args.seed)
    val = lf.data.ArrayLoader((val_x, val_y), batch_size=64, shuffle=False, drop_last=False)
    # the schedule counts optimizer updates: batches per epoch (after --limit-train-batches) / accumulate
    limit = args.limit_train_batches
    batches = len(train) if limit is None else min(len(train), limit if isinstance(limit, int) else int(len(train) * limit))
    updates = max(args.warmup + 1, args.max_epochs * batches // args.accumulate)
    schedule = lf.optim.linear_warmup_cosine_decay(args.lr, min(args.warmup, updates - 1), updates, end_lr=args.lr / 20)
    opt = lf.optim.multi_steps(
        lf.optim.chain(lf.optim.clip_by_global_norm(args.clip), lf.optim.adamw(schedule, weight_decay=0.01)),
        every_k=args.accumulate,
    )
    state = lf.TrainState.create(params=params, optimizer=opt, seed=args.seed)
    logger = lf.loggers.CSVLogger(args.out, name="")
    perplexity = Perplexity()
    checkpoint = lf.callbacks.ModelCheckpoint(logger.log_dir / "checkpoints", monitor="val/loss", save_last=True)
    printer = lf.callbacks.ProgressLog(max_epochs=args.max_epochs)

    how = describe_jit(args)
    print(f"training a {args.layers}-layer causal transformer, width {args.width} ({lf.tree.size(params):,} params), "
          f"bf16-mixed, AdamW peak lr {args.lr:g} (warmup {args.warmup}, cosine to {updates} updates), clip {args.clip:g}, "
          f"batch {args.batch_size} x {args.accumulate} accumulated, {len(train)} batches/epoch, {args.max_epochs} epoch(s), {how}")
    state = fit(
        lf.train_step(loss_fn, opt, precision="bf16-mixed"), state, train,
        val_data=val, eval_step=lf.eval_step(eval_loss_fn, precision="bf16-mixed"),
        max_epochs=args.max_epochs, max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        jit=jit_arg(args), callbacks=[perplexity, checkpoint, printer], loggers=[logger],
        hparams={"lr": args.lr, "batch_size": args.batch_size, "accumulate": args.accumulate, "context": args.context,
                 "width": args.width, "layers": args.layers, "seed": args.seed, "data": source},
    )
    logger.close()

    # the whole validation set once more, outside fit: the same pass, the same callback
    final = lf.validate(lf.eval_step(eval_loss_fn, precision="bf16-mixed"), state, val, callbacks=[perplexity])
    params = lf.tree.to_device(state.params, "cpu")
    prompt = "3 plus 4 is"
    out = sample(apply, params, [index[c] for c in prompt if c in index], args.sample_chars,
                 context=args.context, temperature=args.temperature, key=lf.random.key(args.seed))
    print(f"\ntrained {int(state.step)} steps ({int(state.step) // args.accumulate} updates); "
          f"val perplexity {final['val/ppl']:.3f} (NLL {math.log(final['val/ppl']):.4f} nats/char; "
          f"a uniform guess: {len(chars)})")
    print(f"sample (temperature {args.temperature:g}): {prompt + ''.join(chars[i] for i in out)!r}")
    print(f"metrics: {logger.metrics_file}")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
