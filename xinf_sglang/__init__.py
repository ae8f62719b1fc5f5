"""sglite: an SGLang-style inference runtime (``xinf_sglang.runtime``) shipped as the Xinference engine ``sglite``."""
