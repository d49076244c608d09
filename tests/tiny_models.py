"""The tests' tiny random decoders: the package's own (llmprune/testing.py, which the benchmarks' smoke runs use
too), and what only the tests need of them."""

from llmprune.testing import VOCAB, save_tiny_model_dir, tiny_model  # noqa: F401  (tests import them from here)

# The module each family applies after its last decoder layer (hidden_states[-1] is taken after it).
FINAL_NORM = {"llama": "model.norm", "mistral": "model.norm", "gemma3": "model.norm", "qwen2": "model.norm",
              "opt": "model.decoder.final_layer_norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}
