"""The models: loading (local, hub snapshot or builtin GGUF), placement over devices, kernels, the pair forward.

- `loading`: resolve a model name, load tokenizer and causal LM, weight and tokenizer fingerprints.
- `placement`: lay a model too big for one device over several.
- `kernels`: the attention and LM-head kernels a device supports (flash-attn, Liger) and their CPU fallbacks.
- `safetensors_files`: checkpoint files read as mapped views and written a tensor at a time.
- `forward`: one forward of chosen ‖ rejected sequences into per-sequence log-prob statistics.
- `sequence_parallel`: sequences split over a group of ranks (DeepSpeed Ulysses), their sums gathered.
- `tiling`: each MLP run over tiles of a long sequence (DeepSpeed's TiledMLP).
- `deepspeed_import`: DeepSpeed imported without the MLflow its autotuner would import.

May use: `pipeline.cache`, `pipeline.core`, `pipeline.config`, `pipeline.schema`, `pipeline.errors`.
"""
