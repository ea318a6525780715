"""Training building blocks, used by the thin recipes in the repository's `training/` folder: the losses
(`losses`), the text recipe (`text`: MNTP, sentence-transformers contrastive stage), the image-text recipe
(`clip`: CLIP trainer, cached text, text LoRA), what both share (`recipe`), and building encoders and
tokenizers from scratch (`factory`, `tokenization`).
"""
