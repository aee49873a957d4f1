"""Grok-1 as xai-org released it: the JAX checkpoint `ckpt-0/`, read without a converted copy.

The release (the torrent, or xai-org/grok-1 on Hugging Face) is a folder `ckpt-0/` of pickled parameters named
`tensor{i:05d}_000`, and a SentencePiece `tokenizer.model`. The facts this module relies on, from xai-org's
`model.py`, `checkpoint.py` and `run.py`:

- File i holds parameter i of the model's parameter tree `{module path: {parameter name: array}}` as
  `jax.tree_util` flattens it: dictionary keys in sorted order, so layers sort as text (decoder_layer_0, _1,
  _10, ...). Two parameters sit outside the layers (the embeddings and the final norm) and twelve in each.
- Weights are [in, out] (they multiply from the right). The seven matrices of a layer are `QuantizedWeight8bit`
  records: an int8 weight and scales shaped [..., B, out]. `model.py` computes `weight.astype(bf16) * scales`
  on each of B equal blocks of input rows (B = 1: one scale per output column; the attention output and the
  experts' down matrix use B = 8, one block per device of the release's 8-way sharding), in bfloat16.
- Embeddings (tied to the output) are cast to bfloat16 before use; the router and the norms compute in float32.
- The release has no config file: its sizes are in `run.py`. Other sizes come from `grok1_config.json` beside
  `ckpt-0/`, holding the fields of the official `LanguageModelConfig` as `dataclasses.asdict` writes them.
- `runners.py` encodes prompts without a BOS token.

`Grok1Release` presents the parameters under the names of the community PyTorch conversions (transposed to
[out, in], experts one by one), so the Grok-1 family reads them like any other checkpoint. Every file is parsed
(headers only) and checked against the shape its index calls for before a single weight is read.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ModelNotFoundError
from .hf import read_json
from .restricted_pickle import StoredArray, StoredQuantized, read_pickle

CKPT = "ckpt-0"
CONFIG_FILE = "grok1_config.json"
TOKENIZER_FILE = "tokenizer.model"
_FILE = re.compile(r"^tensor(\d{5})_(\d{3})$")
BLOCK_COLUMNS = 512  # output columns dequantized at a time: bounds the float32 scratch of one matrix
TOKENIZER_CONFIG = {"add_bos_token": False, "add_eos_token": False}  # runners.py encodes without BOS


@dataclass(frozen=True)
class Grok1Config:
    """The sizes of a Grok-1 model, named as the official LanguageModelConfig / TransformerConfig name them."""

    vocab_size: int = 128 * 1024
    pad_token: int = 0
    eos_token: int = 2
    sequence_len: int = 8192
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    emb_size: int = 48 * 128
    key_size: int = 128
    num_q_heads: int = 48
    num_kv_heads: int = 8
    num_layers: int = 64
    widening_factor: float = 8.0
    attn_output_multiplier: float = 0.08838834764831845
    num_experts: int = 8
    num_selected_experts: int = 2

    @property
    def ffn_size(self) -> int:
        """model.py's ffn_size: two thirds of widening_factor * emb_size, rounded up to a multiple of 8."""
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (8 - size) % 8

    def official_config(self) -> dict:
        """These sizes as a grok1_config.json holds them: LanguageModelConfig fields, TransformerConfig ones
        under "model"."""
        fields = dataclasses.asdict(self)
        return {**{k: v for k, v in fields.items() if k in _LANGUAGE_MODEL_FIELDS},
                "model": {k: v for k, v in fields.items() if k not in _LANGUAGE_MODEL_FIELDS}}

    def hf_config(self) -> dict:
        """The config.json of the grok-1 family for these sizes."""
        return {
            "architectures": ["Grok1ModelForCausalLM"], "model_type": "grok-1",
            "vocab_size": self.vocab_size, "hidden_size": self.emb_size, "intermediate_size": self.ffn_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_q_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.key_size,
            "attn_output_multiplier": self.attn_output_multiplier,
            "embedding_multiplier_scale": self.embedding_multiplier_scale,
            "output_multiplier_scale": self.output_multiplier_scale, "max_attn_value": 30.0,
            "num_experts": self.num_experts, "num_experts_per_tok": self.num_selected_experts,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": self.sequence_len,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": self.eos_token,
            "pad_token_id": self.pad_token, "torch_dtype": "bfloat16",
        }


RELEASED = Grok1Config()  # run.py's values
_LANGUAGE_MODEL_FIELDS = ("vocab_size", "pad_token", "eos_token", "sequence_len", "embedding_multiplier_scale",
                          "output_multiplier_scale")


def find_release(path: str | Path) -> tuple[Path, Path] | None:
    """(the folder holding ckpt-0, ckpt-0) when path is the release's folder or its ckpt-0; else None."""
    path = Path(path).expanduser()
    for ckpt in (path / CKPT, path):
        if ckpt.is_dir() and any(_FILE.match(f.name) for f in _listing(ckpt)):
            return (ckpt.parent if ckpt == path else path), ckpt
    return None


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def tokenizer_path(root: Path) -> Path:
    """The release's tokenizer.model: beside ckpt-0, or one folder up (xai-org/grok-1's checkpoints/ layout)."""
    for folder in (root, root.parent):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    raise ModelNotFoundError(f"no {TOKENIZER_FILE} beside {root / CKPT}: put the release's {TOKENIZER_FILE} "
                             f"(from xai-org/grok-1) in {root}")


def read_config(root: Path) -> Grok1Config:
    """The release's sizes (run.py) or, when root holds grok1_config.json, the sizes it gives."""
    file = root / CONFIG_FILE
    if not file.is_file():
        return RELEASED
    cfg = read_json(file)
    model = cfg.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{file} has no \"model\" object (the TransformerConfig fields)")
    fields = {}
    for key, value in [*((k, v) for k, v in cfg.items() if k != "model"), *model.items()]:
        if key == "vocab_size" and "vocab_size" in fields:
            continue  # the language model's vocab_size, given first, is the one its embeddings use
        if key in Grok1Config.__dataclass_fields__ and value is not None:
            kind = type(getattr(RELEASED, key))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise CheckpointError(f"{file}: {key} must be a number, got {value!r}")
            fields[key] = kind(value)
    missing = [k for k in ("emb_size", "key_size", "num_q_heads", "num_kv_heads", "num_layers", "vocab_size")
               if k not in fields]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}")
    config = Grok1Config(**{**_DATACLASS_DEFAULTS, **fields})
    if config.num_experts < 2:
        raise CheckpointError(f"{file} describes a model without experts (num_experts {config.num_experts}); "
                              f"edgerun runs Grok-1's mixture-of-experts form only")
    return config


# TransformerConfig's own defaults, for fields a grok1_config.json leaves out (run.py sets all of them)
_DATACLASS_DEFAULTS = {"widening_factor": 4.0, "attn_output_multiplier": 1.0, "num_experts": -1,
                       "num_selected_experts": 1, "embedding_multiplier_scale": 1.0, "output_multiplier_scale": 1.0}


@dataclass(frozen=True)
class Param:
    path: str  # module path / parameter name, as xai-org's checkpoint.py prints it
    shape: tuple[int, ...]
    quantized: bool  # a QuantizedWeight8bit matrix in the release (a plain float array is accepted too)
    name: str  # the community name it is given
    transpose: bool = False  # [in, out] -> [out, in]
    experts: bool = False  # stacked [E, in, out]: one community tensor per expert


def parameters(cfg: Grok1Config) -> list[Param]:
    """Every parameter in file order: the tree {module: {name: param}} flattened with sorted keys."""
    D, E, F = cfg.emb_size, cfg.num_experts, cfg.ffn_size
    q, kv = cfg.num_q_heads * cfg.key_size, cfg.num_kv_heads * cfg.key_size
    tree = {"language_model/in_out_embed": {"embeddings": ((cfg.vocab_size, D), False, "model.embed_tokens.weight",
                                                           False, False)},
            "language_model/rms_norm": {"scale": ((D,), False, "model.norm.scale", False, False)}}
    for i in range(cfg.num_layers):
        layer, n = f"transformer/decoder_layer_{i}/", f"model.layers.{i}."
        attn = {"query": ((D, q), "q"), "key": ((D, kv), "k"), "value": ((D, kv), "v"), "linear": ((q, D), "o")}
        for module, (shape, x) in attn.items():
            tree[f"{layer}multi_head_attention/{module}"] = {"w": (shape, True, f"{n}attn.{x}_proj.weight", True,
                                                                   False)}
        for module, shape in (("linear", (E, D, F)), ("linear_v", (E, D, F)), ("linear_1", (E, F, D))):
            tree[f"{layer}moe/{module}"] = {"w": (shape, True, f"{n}moe_block.experts.{{e}}.{module}.weight",
                                                  True, True)}
        for module, x in (("rms_norm", "pre_attn"), ("rms_norm_1", "post_attn"), ("rms_norm_2", "pre_moe"),
                          ("rms_norm_3", "post_moe")):
            tree[layer + module] = {"scale": ((D,), False, f"{n}{x}_norm.scale", False, False)}
        tree[layer + "router"] = {"w": ((D, E), False, f"{n}moe_block.gate.weight", True, False)}
    return [Param(f"{module}/{name}", *tree[module][name]) for module in sorted(tree) for name in sorted(tree[module])]


class Grok1Release:
    """The release's tensors under community names, with the interface of SafetensorsReader.

    Quantized matrices and the embeddings come out in bfloat16 (as model.py computes with them), the router and
    norms in float32, as stored."""

    def __init__(self, root: Path, ckpt: Path, config: Grok1Config):
        self.dir = ckpt
        self.params = parameters(config)
        self._check_files(ckpt, root)
        self._stored = [self._checked(i, param) for i, param in enumerate(self.params)]
        self._names: dict[str, tuple[int, int | None]] = {}  # community name -> (file index, expert)
        for i, param in enumerate(self.params):
            if param.experts:
                for e in range(param.shape[0]):
                    self._names[param.name.format(e=e)] = (i, e)
            else:
                self._names[param.name] = (i, None)

    def _file(self, i: int) -> Path:
        return self.dir / f"tensor{i:05d}_000"

    def _check_files(self, ckpt: Path, root: Path) -> None:
        want = len(self.params)
        found = {int(m[1]) for m in map(_FILE.match, (f.name for f in _listing(ckpt))) if m}
        missing = sorted(set(range(want)) - found)
        if max(found, default=0) >= want or (len(missing) > 1 and missing == list(range(missing[0], want))):
            model, hint = ((f"the model {root / CONFIG_FILE} describes", "") if (root / CONFIG_FILE).is_file() else
                           (f"the released Grok-1 ({RELEASED.num_layers} layers)",
                            f"; for another size put {CONFIG_FILE} beside {CKPT}"))
            raise CheckpointError(f"{ckpt} holds {len(found)} parameter files (tensor00000_000 to "
                                  f"{self._file(max(found)).name}) where {model} has {want}{hint}")
        if missing:
            raise CheckpointError(f"{ckpt} lacks {self._file(missing[0]).name} ({self.params[missing[0]].path}); "
                                  f"download it again")

    def _checked(self, i: int, param: Param) -> StoredArray | StoredQuantized:
        stored = read_pickle(self._file(i))
        problem = _mismatch(stored, param)
        if problem:
            raise CheckpointError(f"{self._file(i)} holds {stored.describe()} where parameter {i} ({param.path}) "
                                  f"should be {problem}")
        return stored

    # -- the SafetensorsReader interface -------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._names)

    def describe(self, name: str) -> str:
        i, e = self._names[name]
        return f"{self._file(i).name}, {self.params[i].path}" + ("" if e is None else f" expert {e}")

    def shape(self, name: str) -> tuple[int, ...]:
        i, e = self._names[name]
        shape = self.params[i].shape[1:] if e is not None else self.params[i].shape
        return tuple(reversed(shape)) if self.params[i].transpose else shape

    def dtype(self, name: str) -> torch.dtype:
        i, _ = self._names[name]
        stored = self._stored[i]
        return torch.bfloat16 if _in_bf16(self.params[i]) else stored.dtype

    def common_dtype(self) -> torch.dtype:
        """What the model computes in: bfloat16 (the norms and router are float32 and stay so)."""
        return torch.bfloat16

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        i, e = self._names[name]
        stored, param = self._stored[i], self.params[i]
        if isinstance(stored, StoredQuantized):
            t = _dequantize(stored, e, param.transpose)
        else:
            t = _plain(stored, e, self.dtype(name), param.transpose)
        return t if index is None else t[index]

    def get_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.get(name).narrow(dim, start, stop - start).contiguous()

    def close(self) -> None:
        pass


def _in_bf16(param: Param) -> bool:
    """model.py multiplies with the matrices and embeddings in bfloat16 (fprop_dtype)."""
    return param.quantized or param.name == "model.embed_tokens.weight"


def _mismatch(stored: StoredArray | StoredQuantized, param: Param) -> str | None:
    """What the parameter should be, when the file does not hold it; None when it does."""
    if isinstance(stored, StoredQuantized):
        w, s = stored.weight, stored.scales
        *lead, rows, cols = param.shape
        blocks = s.shape[-2] if len(s.shape) == len(param.shape) else 0
        if (param.quantized and w.shape == param.shape and w.dtype == torch.int8 and blocks and rows % blocks == 0
                and s.shape == (*lead, blocks, cols) and s.dtype.is_floating_point):
            return None
    elif stored.shape == param.shape and stored.dtype.is_floating_point:
        return None
    want = f"int8 weight {list(param.shape)} with scales {[*param.shape[:-2], 'B', param.shape[-1]]}" \
        if param.quantized else f"a float array {list(param.shape)}"
    return f"{want}; the files do not match the model's sizes"


def _dequantize(stored: StoredQuantized, expert: int | None, transpose: bool) -> torch.Tensor:
    """weight * scales in bfloat16, as model.py computes it (transposed to [out, in] when asked): each of the
    scales' B blocks of input rows takes its row of scales. The product of an int8 and a bfloat16 is exact in
    float32, so rounding it to bfloat16 gives what a bfloat16 multiply gives. Done BLOCK_COLUMNS output columns at
    a time, so the float32 scratch stays small."""
    w, s = stored.weight, stored.scales
    weight, scales = (w.read(), s.read()) if expert is None else (w.read(expert, expert + 1)[0],
                                                                  s.read(expert, expert + 1)[0])
    rows, cols = weight.shape
    blocks = scales.shape[0]
    out = torch.empty((cols, rows) if transpose else (rows, cols), dtype=torch.bfloat16)
    grouped = weight.view(blocks, rows // blocks, cols)
    for start in range(0, cols, BLOCK_COLUMNS):
        stop = min(cols, start + BLOCK_COLUMNS)
        part = (grouped[:, :, start:stop].float() * scales[:, None, start:stop].float()).reshape(rows, stop - start)
        if transpose:
            out[start:stop] = part.T
        else:
            out[:, start:stop] = part
    return out


def _plain(stored: StoredArray, expert: int | None, dtype: torch.dtype, transpose: bool) -> torch.Tensor:
    """A float array (or one expert of it) in dtype, read and converted a block of rows at a time."""
    shape = stored.shape if expert is None else stored.shape[1:]
    if expert is not None or len(shape) < 2:
        t = stored.read() if expert is None else stored.read(expert, expert + 1)[0]
        t = t.to(dtype)
    else:
        t = torch.empty(shape, dtype=dtype)
        step = max(1, (64 << 20) // (stored.itemsize * math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            t[start:stop] = stored.read(start, stop)
    return t.T.contiguous() if transpose else t
