"""LoRA adapters of an LLM replica: where an adapter is found, and the 404 for one that is not.

This module owns ``BellaLoraLoader``, the ``model_downloader`` Ray's ``LLMServer`` wraps in
``serve.multiplexed`` (so each replica keeps at most ``lora_config.max_num_adapters_per_replica``
adapters, least recently used out, and Serve routes ``base:adapter`` to replicas holding it).
Adapters in a local directory (``experimental_configs.bella_lora_path``, set from a local
``lora_config.dynamic_lora_loading_path``) are read in place; cloud paths go to Ray's loader.
An adapter that does not exist raises ``ModelNotFoundError`` before vLLM sees it: vLLM's
engine dies on a LoRA path without ``adapter_config.json``.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

from ray_worker.config import adapter_of
from ray_worker.errors import ModelNotFoundError
from ray_worker.serve.llm_config import LORA_PATH_KEY

__all__ = ["BellaLoraLoader", "adapter_dir"]

_ids = itertools.count(1)


def adapter_dir(root: str, lora_model_id: str, base: str) -> str:
    """The directory of ``lora_model_id`` (``base:adapter``) under ``root``; 404 if none."""
    adapter = adapter_of(lora_model_id, base)
    path = os.path.join(root, adapter) if adapter else ""
    if not adapter or not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ModelNotFoundError(f"The model `{lora_model_id}` does not exist.", "model")
    return path


class BellaLoraLoader(LoraModelLoader):
    """Ray's ``LoraModelLoader``, reading adapters of a local directory in place."""

    async def load_model_from_config(
        self, lora_model_id: str, llm_config: Any
    ) -> DiskMultiplexConfig:
        root = (getattr(llm_config, "experimental_configs", None) or {}).get(LORA_PATH_KEY)
        if root is None:
            if adapter_of(lora_model_id, str(llm_config.model_id)) is None:
                raise ModelNotFoundError(f"The model `{lora_model_id}` does not exist.", "model")
            return await super().load_model_from_config(lora_model_id, llm_config)
        return DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=None,
            local_path=adapter_dir(str(root), lora_model_id, str(llm_config.model_id)),
            lora_assigned_int_id=next(_ids),
        )
