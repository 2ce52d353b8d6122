"""Images as self-contained PNG data URIs, at their native resolution (pages upscale them without smoothing)."""

import base64
import io

import numpy as np
from PIL import Image


def png_data_uri(image: np.ndarray) -> str:
    """uint8 [C, H, W] with C = 1 (grey) or 3 (RGB) → "data:image/png;base64,…"; the same bytes every time."""
    pixels = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
