"""Model definitions built from megatron-core tensor-parallel layers; they know nothing of launchers or engines.

Import the model you need (`from models.gpt import GPT`): this package imports nothing itself, so
reading a config does not pay for importing megatron-core.
"""
