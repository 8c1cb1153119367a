"""Everything `save_pretrained` copies into a cascade's folder: flat files importing only torch, transformers, timm,
numpy and each other.
"""
