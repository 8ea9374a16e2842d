"""imgtocap's captioner: frozen CNN encoder + causal BERT decoder, as plain PyTorch."""

from .captioner import Captioner
from .config import PRESETS, CaptionerConfig, preset
from .decoding import Generation
from .encoders import preprocess
from .image import ImageError, open_image
from .io import load_checkpoint, read_checkpoint, save_checkpoint
from .pretrained import build_captioner
from .tokenizer import decode_caption, encode_caption, load_tokenizer, normalize_caption

__all__ = [
    "PRESETS",
    "Captioner",
    "CaptionerConfig",
    "Generation",
    "build_captioner",
    "ImageError",
    "decode_caption",
    "encode_caption",
    "load_checkpoint",
    "load_tokenizer",
    "normalize_caption",
    "open_image",
    "preprocess",
    "preset",
    "read_checkpoint",
    "save_checkpoint",
]
