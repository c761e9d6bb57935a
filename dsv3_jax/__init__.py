"""dsv3-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX / Flax NNX.

    import dsv3_jax
    model = dsv3_jax.from_hf_pretrained("path/to/DeepSeek-V3", dtype="bfloat16")
    logits = model(token_ids)            # [B, T] -> [B, T, V]

    # after `python -m dsv3_jax.convert path/to/DeepSeek-V3 out/` (see docs/convert.md):
    model = dsv3_jax.from_pretrained("out/", mesh=mesh)   # Orbax restore, sharded by the rules

The functional core (pure jitted functions over explicit pytrees) is in `dsv3_jax.core`.
"""

from dsv3_jax.cache import Cache, LayerCache, init_cache
from dsv3_jax.checkpoint import from_hf_pretrained, hf_tensor_table
from dsv3_jax.config import ConfigError, ModelConfig, load_config
from dsv3_jax.model import Transformer
from dsv3_jax.orbax_checkpoint import from_pretrained
from dsv3_jax.safetensors_io import CheckpointError

__all__ = [
    "Cache", "CheckpointError", "ConfigError", "LayerCache", "ModelConfig", "Transformer",
    "from_hf_pretrained", "from_pretrained", "hf_tensor_table", "init_cache", "load_config",
]
__version__ = "0.1.0"
