"""Hugging Face checkpoints from a local directory: config.json -> ModelConfig, safetensors -> Model.

    model = load_model("./my-model", dtype="bfloat16")       # or Model.from_pretrained(...)

Only files inside the directory are read; no hub is ever asked (neither huggingface_hub nor
transformers is imported). What is read:

    config.json                        architectures[0] in ARCHITECTURES, the shape, rope, bias switches
    model.safetensors                  or model.safetensors.index.json and its shards; opened by the
                                       safetensors package, which memory-maps each file

Tensors are renamed and packed the way Model holds them (concatenated along dim 0):

    model.embed_tokens.weight                           -> embed
    model.layers.{i}.self_attn.{q,k,v}_proj.weight      -> layers.{i}.wqkv          (.bias -> bqkv)
    model.layers.{i}.self_attn.o_proj.weight            -> layers.{i}.wo            (.bias -> bo)
    model.layers.{i}.self_attn.{q,k}_norm.weight        -> layers.{i}.{q,k}_norm.weight       (Qwen3)
    model.layers.{i}.mlp.{gate,up}_proj.weight          -> layers.{i}.w_gate_up
    model.layers.{i}.mlp.down_proj.weight               -> layers.{i}.w_down
    model.layers.{i}.{input,post_attention}_layernorm   -> layers.{i}.{input,post_attention}_norm.weight
    model.norm.weight -> norm.weight;  lm_head.weight -> lm_head (absent or ignored when tied)

Anything the model cannot run exactly raises before a weight is read: VmemUnsupported names the
architecture, activation, rope type or bias it lacks; VmemInvalidArgument names the missing file, the
missing / unexpected tensor or the shape that disagrees with config.json.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from vmem.engine.model import PRESETS, Model, ModelConfig, RopeScaling
from vmem.errors import VmemInvalidArgument, VmemUnsupported

logger = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers some older checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def load_model(path, dtype: torch.dtype | str | None = None) -> Model:
    """The checkpoint at ``path`` as a Model; dtype None / "auto": config.json's ``dtype``."""
    path = _directory(path)
    cfg = config_from_hf(read_json(path / "config.json"), dtype=dtype)
    plan = tensor_plan(cfg)
    tensors = _read_tensors(path, plan, cfg)
    model = Model(cfg, tensors, name=str(path))
    logger.info("loaded %s: %s, %d layers, %.1fM parameters, %s", path, cfg.dtype, cfg.num_layers,
                cfg.num_params / 1e6, "tied embeddings" if cfg.tie_word_embeddings else "untied")
    return model


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise VmemInvalidArgument("%s is missing from the checkpoint directory %s" % (path.name, path.parent))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise VmemInvalidArgument("%s is not valid JSON: %s" % (path, exc)) from None
    if not isinstance(data, dict):
        raise VmemInvalidArgument("%s must hold a JSON object" % path)
    return data


def config_from_hf(hf: dict, *, dtype: torch.dtype | str | None = None) -> ModelConfig:
    """ModelConfig for a Hugging Face config.json (as a dict). Raises VmemUnsupported for what the model
    lacks and VmemInvalidArgument for a missing or malformed field."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise VmemUnsupported("config.json: architecture %r is not supported; vmem runs %s"
                              % (arch, ", ".join(ARCHITECTURES)))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise VmemUnsupported("config.json: hidden_act %r is not supported (the MLP is SwiGLU with silu)" % (act,))
    if hf.get("mlp_bias"):
        raise VmemUnsupported("config.json: mlp_bias is not supported")
    heads = _field(hf, "num_attention_heads")
    hidden = _field(hf, "hidden_size")
    qwen2, qwen3 = arch == "Qwen2ForCausalLM", arch == "Qwen3ForCausalLM"
    attention_bias = bool(hf.get("attention_bias", False)) and arch != "MistralForCausalLM"
    window = _sliding_window(hf, arch)
    max_position = _field(hf, "max_position_embeddings")
    if window is not None and window < max_position:
        logger.warning("the checkpoint has a sliding window of %d tokens and vmem has no sliding-window "
                       "attention: sequences are limited to %d tokens (where both agree)", window, window)
        max_position = window
    theta, scaling = _rope(hf)
    try:
        return ModelConfig(
            vocab_size=_field(hf, "vocab_size"), hidden_size=hidden, num_layers=_field(hf, "num_hidden_layers"),
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads, intermediate_size=_field(hf, "intermediate_size"),
            rope_theta=theta, rope_scaling=scaling, dtype=_dtype(hf, dtype), max_position=max_position,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias, qk_norm=qwen3, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window)
    except VmemInvalidArgument as exc:
        raise VmemInvalidArgument("config.json: %s" % exc) from None


def tensor_plan(cfg: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Model's state_dict name -> the checkpoint tensors (name, shape) that, concatenated along dim 0, make it."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q_rows, kv_rows = cfg.num_heads * d, cfg.num_kv_heads * d
    plan = {"embed": [("model.embed_tokens.weight", (v, h))], "norm.weight": [("model.norm.weight", (h,))]}
    if not cfg.tie_word_embeddings:
        plan["lm_head"] = [("lm_head.weight", (v, h))]
    for i in range(cfg.num_layers):
        src, dst = "model.layers.%d." % i, "layers.%d." % i
        attn, mlp = src + "self_attn.", src + "mlp."
        plan[dst + "input_norm.weight"] = [(src + "input_layernorm.weight", (h,))]
        plan[dst + "post_attention_norm.weight"] = [(src + "post_attention_layernorm.weight", (h,))]
        plan[dst + "wqkv"] = [(attn + "q_proj.weight", (q_rows, h)), (attn + "k_proj.weight", (kv_rows, h)),
                              (attn + "v_proj.weight", (kv_rows, h))]
        plan[dst + "wo"] = [(attn + "o_proj.weight", (h, q_rows))]
        if cfg.qkv_bias:
            plan[dst + "bqkv"] = [(attn + "q_proj.bias", (q_rows,)), (attn + "k_proj.bias", (kv_rows,)),
                                  (attn + "v_proj.bias", (kv_rows,))]
        if cfg.o_bias:
            plan[dst + "bo"] = [(attn + "o_proj.bias", (h,))]
        if cfg.qk_norm:
            plan[dst + "q_norm.weight"] = [(attn + "q_norm.weight", (d,))]
            plan[dst + "k_norm.weight"] = [(attn + "k_norm.weight", (d,))]
        plan[dst + "w_gate_up"] = [(mlp + "gate_proj.weight", (f, h)), (mlp + "up_proj.weight", (f, h))]
        plan[dst + "w_down"] = [(mlp + "down_proj.weight", (h, f))]
    return plan


# ---------------------------------------------------------------------------------------------------------

def _directory(path) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise VmemInvalidArgument("model %r is neither a preset (%s) nor a checkpoint directory (nothing is "
                                  "downloaded: give a local path)" % (str(path), ", ".join(PRESETS)))
    return p


def _field(hf: dict, name: str):
    value = hf.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise VmemInvalidArgument("config.json: %s must be a positive int, got %r" % (name, value))
    return value


def _dtype(hf: dict, dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPES:
        raise VmemUnsupported("dtype %r is not supported; choose one of %s" % (dtype, ", ".join(DTYPES)))
    return DTYPES[dtype]


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from transformers 5's ``rope_parameters`` or the older ``rope_theta`` +
    ``rope_scaling`` fields."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise VmemUnsupported("config.json: per-layer rope parameters are not supported: %r" % (params,))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise VmemUnsupported("config.json: partial rotary embeddings are not supported")
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise VmemUnsupported("config.json: rope_type %r is not supported (default, linear, llama3)" % (kind,))
    try:
        if kind == "linear":
            return theta, RopeScaling("linear", float(params["factor"]))
        return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                                  float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    except KeyError as exc:
        raise VmemInvalidArgument("config.json: rope scaling %r lacks %s" % (kind, exc)) from None


def _sliding_window(hf: dict, arch: str) -> int | None:
    """The attention window where any layer slides (Mistral: sliding_window; Qwen: only with use_sliding_window)."""
    window = hf.get("sliding_window")
    if arch != "MistralForCausalLM" and not hf.get("use_sliding_window", False):
        return None
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise VmemInvalidArgument("config.json: sliding_window must be a positive int or null, got %r" % (window,))
    return window


def _safetensors_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it (one file, or the shards of model.safetensors.index.json)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise VmemInvalidArgument("%s has no weight_map" % index)
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise VmemInvalidArgument("shard %s named by %s is missing" % (shard.name, index.name))
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        found = sorted(p.name for p in path.glob("*.bin")) or sorted(p.name for p in path.glob("*.pt"))
        raise VmemInvalidArgument("no model.safetensors or model.safetensors.index.json in %s%s" % (
            path, " (found %s; convert it to safetensors)" % ", ".join(found[:3]) if found else ""))
    from safetensors import safe_open
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _read_tensors(path: Path, plan: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Check every tensor's presence and shape first (headers only), then read, convert and pack."""
    from safetensors import safe_open
    files = _safetensors_files(path)
    wanted = {name: shape for parts in plan.values() for name, shape in parts}
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise VmemInvalidArgument("the checkpoint lacks %d tensor(s) config.json calls for: %s%s"
                                  % (len(missing), ", ".join(missing[:4]), " ..." if len(missing) > 4 else ""))
    unexpected = sorted(n for n in set(files) - set(wanted) if not n.endswith(_IGNORED_SUFFIXES)
                        and not (n == "lm_head.weight" and cfg.tie_word_embeddings))
    if unexpected:
        raise VmemInvalidArgument("the checkpoint has tensor(s) this architecture does not use (is config.json "
                                  "right?): %s%s" % (", ".join(unexpected[:4]), " ..." if len(unexpected) > 4 else ""))
    tensors = {}
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt")) for file in set(files.values())}
        for name, shape in wanted.items():
            got = tuple(handles[files[name]].get_slice(name).get_shape())
            if got != shape:
                raise VmemInvalidArgument("tensor %s in %s has shape %s; config.json implies %s"
                                          % (name, files[name].name, got, shape))
        for dst, parts in plan.items():      # one packed tensor at a time: peak memory ~ the model + one tensor
            pieces = [handles[files[name]].get_tensor(name).to(cfg.dtype) for name, _ in parts]
            tensors[dst] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return tensors
