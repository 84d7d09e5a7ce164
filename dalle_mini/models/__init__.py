"""The networks of DALL·E Mini, one file per model: `bart.py` (DalleBart, text → image codes),
`vqgan.py` with `vqgan_layers.py` (VQGAN, image codes ↔ pixels), `clip.py` (the scorer).

Import them by full path, e.g. `from dalle_mini.models.vqgan import VQModel, VQGANConfig`.
"""
