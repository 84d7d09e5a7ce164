"""The networks of DALL·E Mini, one concept per file.

- `bart.py`, `bart_stacks.py` and `dallebart.py`: DalleBart, the text → image-codes
  transformer (layers, stacks) and its loader.
- `vqgan.py` with `vqgan_layers.py`: the VQGAN that maps image codes ↔ pixels.
- `clip.py`: the CLIP scorer that ranks candidate images.

Import by full path, e.g. `from dalle_mini.models.vqgan import VQModel, VQGANConfig`.
"""
