"""Long context: a checkpoint's Dual Chunk Attention and rope-scaling settings, set from the command line and honoured
by every backend (what they buy is measured in ``qwen2lib.scratch.context_study``, notebook 07).

Settings are config.json keys, so the deploy package, the graphs and transformers read the same thing:

    --dca CHUNK,LOCAL[,ORIGINAL]  dual_chunk_attention_config {chunk_size, local_size, original_max_position_embeddings}
    --yarn FACTOR[,ORIGINAL]      rope scaling {rope_type: yarn, factor, original_max_position_embeddings}, and
                                  max_position_embeddings = FACTOR x ORIGINAL

The YaRN trap: transformers releases disagree on what ``original_max_position_embeddings`` means. The pinned one takes
the factor as given and uses the original length only for the correction range (warning when the two disagree); older
ones recompute factor = max_position_embeddings / original. Writing max_position_embeddings = factor x original makes
both readings give the same frequencies.

Transformers' own Qwen2 has no DCA (it ignores the key), so a torch run with DCA uses the deploy package (patch 7);
a graph with DCA is compiled from a package whose config.json carries it (``qwen2lib.compile.dual_chunk``).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

from transformers import AutoConfig, Qwen2Config

from ..errors import Qwen2LibError

YARN_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}


def dca_config_from_dict(d: dict) -> tuple[int, int, int]:
    """Validate a HF ``dual_chunk_attention_config`` -> (chunk_size, local_size, original_max_position_embeddings).

    Extra keys (e.g. vLLM's ``sparse_attention_config``) are ignored.
    """
    if not isinstance(d, dict):
        raise LongContextError(f"dual_chunk_attention_config must be a dict, got {type(d).__name__}")
    values = {}
    for key in ("chunk_size", "local_size", "original_max_position_embeddings"):
        if key not in d:
            raise LongContextError(f"dual_chunk_attention_config is missing {key!r}")
        value = d[key]
        # bool is an int subclass; True as a chunk size is a config bug, not 1
        if isinstance(value, bool) or not isinstance(value, int):
            raise LongContextError(f"dual_chunk_attention_config[{key!r}] must be an int, got {value!r}")
        if value <= 0:
            raise LongContextError(f"dual_chunk_attention_config[{key!r}] must be positive, got {value}")
        values[key] = value
    if values["local_size"] >= values["chunk_size"]:
        raise LongContextError(
            f"dual_chunk_attention_config['local_size'] ({values['local_size']}) must be smaller than "
            f"chunk_size ({values['chunk_size']}): the chunk length chunk_size - local_size would be <= 0"
        )
    return values["chunk_size"], values["local_size"], values["original_max_position_embeddings"]


class LongContextError(Qwen2LibError, ValueError):
    """A long-context setting that is malformed, or that the chosen backend cannot run."""


# ---- settings ---------------------------------------------------------------------------------------


def _ints(text: str, what: str, count: tuple[int, ...]) -> list[str]:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in count or not all(parts):
        raise LongContextError(f"{what} {text!r}: expected {' or '.join(str(c) for c in count)} comma-separated values")
    return parts


def parse_dca(text: str) -> dict:
    """'CHUNK,LOCAL[,ORIGINAL]' -> a dual_chunk_attention_config (ORIGINAL defaults to CHUNK; it is recorded only)."""
    parts = _ints(text, "--dca", (2, 3))
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise LongContextError(f"--dca {text!r}: CHUNK, LOCAL and ORIGINAL are whole numbers of tokens") from None
    config = {"chunk_size": values[0], "local_size": values[1],
              "original_max_position_embeddings": values[2] if len(values) == 3 else values[0]}
    try:
        dca_config_from_dict(config)
    except ValueError as error:
        raise LongContextError(f"--dca {text!r}: {error}") from None
    return config


def rope_scaling_of(config: dict) -> dict | None:
    """The rope scaling a config.json asks for (old ``rope_scaling`` or transformers 5 ``rope_parameters``), or None."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else dict(scaling)


def parse_yarn(text: str, config: dict) -> dict:
    """'FACTOR[,ORIGINAL]' -> config.json overrides: YaRN scaling and max_position_embeddings = FACTOR x ORIGINAL.

    ORIGINAL (the length the model was trained at) defaults to the checkpoint's max_position_embeddings.
    """
    parts = _ints(text, "--yarn", (1, 2))
    try:
        factor = float(parts[0])
        original = int(parts[1]) if len(parts) == 2 else int(config["max_position_embeddings"])
    except ValueError:
        raise LongContextError(f"--yarn {text!r}: FACTOR is a number > 1, ORIGINAL a whole number of tokens") from None
    if not factor > 1 or not math.isfinite(factor) or original <= 0:
        raise LongContextError(f"--yarn {text!r}: need FACTOR > 1 and ORIGINAL > 0")
    current = rope_scaling_of(config)
    if current and current.get("rope_type", current.get("type")) != "yarn":
        raise LongContextError(f"--yarn: this checkpoint already scales RoPE with {current.get('rope_type', current.get('type'))!r}; "
                               "YaRN would replace it, which changes what the model was trained with")
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    return {"rope_scaling": scaling, "max_position_embeddings": int(round(factor * original))}


def long_context_overrides(dca: str | None = None, yarn: str | None = None, config: dict | None = None) -> dict:
    """config.json overrides for ``--dca`` / ``--yarn`` ({} when neither is given)."""
    overrides = {}
    if dca:
        overrides["dual_chunk_attention_config"] = parse_dca(dca)
        if (config or {}).get("use_sliding_window"):
            raise LongContextError("--dca: this checkpoint enables sliding-window attention, which Dual Chunk "
                                   "Attention cannot be combined with")
    if yarn:
        overrides.update(parse_yarn(yarn, config or {}))
    return overrides


def apply_overrides(config: dict, overrides: dict | None) -> dict:
    """A config.json dict with the overrides written in the key it already uses for rope (a copy)."""
    out = copy.deepcopy(config)
    for key, value in (overrides or {}).items():
        if key == "rope_scaling" and "rope_parameters" in out:  # transformers 5 layout: keep rope_theta beside it
            out["rope_parameters"] = {**(out.get("rope_parameters") or {}), **value}
            out.pop("rope_scaling", None)
        else:
            out[key] = copy.deepcopy(value)
    return out


def describe(config: dict) -> str | None:
    """One line naming the long-context settings of a config.json dict, or None when it has none."""
    parts = []
    dca = config.get("dual_chunk_attention_config")
    if dca:
        parts.append(f"Dual Chunk Attention (chunk_size {dca.get('chunk_size')}, local_size {dca.get('local_size')})")
    scaling = rope_scaling_of(config)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        original = scaling.get("original_max_position_embeddings")
        parts.append(f"{'YaRN' if kind == 'yarn' else kind} rope scaling x{scaling.get('factor')}"
                     + (f" over {original} positions" if original else ""))
    if not parts:
        return None
    return "; ".join(parts) + f"; max_position_embeddings {config.get('max_position_embeddings')}"


def announce(config: dict, where: str) -> None:
    """Say on stderr which long-context settings a run uses: they are never applied (or dropped) silently."""
    line = describe(config)
    if line:
        print(f"[long context] {where}: {line}", file=sys.stderr)


def announce_graph(graph_dca: dict | None, config: dict) -> None:
    """Name a compiled graph's long-context settings (its manifest's ``dual_chunk_attention``), and say so when it
    runs without the checkpoint's DCA."""
    announce({**config, "dual_chunk_attention_config": graph_dca}, "onnx graph")
    if config.get("dual_chunk_attention_config") and not graph_dca:
        print("[long context] onnx graph: plain attention, although the checkpoint asks for Dual Chunk Attention "
              "(compiled with graph.dual_chunk_attention: false); positions past its training length are unseen",
              file=sys.stderr)


def workdir_tag(overrides: dict) -> str:
    """A folder name for the stages built with these overrides (their own package, graphs and stats)."""
    parts = []
    dca = overrides.get("dual_chunk_attention_config")
    if dca:
        parts.append(f"dca{dca['chunk_size']}-{dca['local_size']}")
    scaling = overrides.get("rope_scaling")
    if scaling:
        parts.append(f"yarn{scaling['factor']:g}-{scaling['original_max_position_embeddings']}")
    return "_".join(parts)


def hf_config_with(folder, overrides: dict | None, trust_remote_code: bool = False):
    """The transformers config of a folder with ``overrides`` applied to its config.json (None: no overrides)."""
    if not overrides:
        return None
    data = apply_overrides(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")), overrides)
    cls = (type(AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True))
           if trust_remote_code else Qwen2Config)
    return cls.from_dict(data)
