"""Fixed inputs for the parity gate: varied texts and generated images.

The texts stress the tokenizer (unicode, punctuation, emoji, HTML entities,
truncation past 77 tokens); the images stress preprocessing (every common
mode, odd sizes, aspect ratios, JPEG large enough for reduced-size decoding).
Images are smooth, photo-like content: pure noise is unrealistic and would
exaggerate what lossy decoding changes.
"""
from __future__ import annotations

import io

import numpy as np

SAMPLE_TEXTS: list[str] = [
    "a red bicycle at night",
    "A photo of a dog.",
    "two cats sleeping on a sofa",
    "golden retriever playing fetch in the park",
    "a bowl of fruit: apples, pears & bananas",
    "DON'T PANIC",
    "it's the dog's toy, isn't it? they'll know, we'd go, I'm sure, you've seen",
    "“curly quotes” and ‘single ones’",
    "fish &amp; chips &amp;amp; peas &#39;quoted&#39; &lt;b&gt;",
    "café naïve coöperate résumé",
    "cafe\u0301 with a combining accent",
    "Straße in München",
    "東京の夜景",
    "上海外滩的夜晚",
    "서울의 거리 풍경",
    "Красная площадь зимой",
    "صورة لقطة على الشاطئ",
    "תמונה של כלב בים",
    "समुद्र तट पर सूर्यास्त",
    "Ακρόπολη στην Αθήνα",
    "sunset 🌅 over the sea 🌊",
    "family 👨‍👩‍👧‍👦 picnic",
    "flags 🇫🇷 🇯🇵 🇧🇷",
    "ﬁne ﬂowers (ligatures)",
    "ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ",
    "mojibake: cafÃ© naÃ¯ve",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u200band zwsp",
    "\x1b[31mANSI red\x1b[0m text",
    "   leading and trailing spaces   ",
    "",
    "   ",
    "1999 2024 3.14159 1,000,000 42nd",
    "https://example.com/path?q=red+car&x=1",
    "/home/user/Pictures/IMG_0042.JPG",
    "def f(x): return x**2  # code",
    "<start_of_text> literal special tokens <end_of_text>",
    "😀<end_of_text> after an emoji",
    "!!!???...---***",
    "snake_case and kebab-case and CamelCase",
    "a" * 300,
    "word " * 100,
    ("an extremely long description of a busy street market with vendors selling fresh fruit, vegetables, "
     "spices, fabrics, handmade jewellery, pottery, leather goods, street food stalls with smoke rising, "
     "children running between the stalls, tourists taking photos, and musicians playing in the corner"),
    "🐶" * 90,
    "x-ray of a hand",
    "a blurry photo of a bird",
    "the letter A in a sans-serif font",
    "night sky with the milky way and a tent",
    "snowy mountain peak under a blue sky",
    "a plate of sushi, chopsticks, and soy sauce",
    "MiXeD CaSe QuErY",
    "émoji + ünïcödé + 中文 + 123",
    "question? answer! (maybe) [brackets] {braces}",
    "100% cotton t-shirt, size XL",
    "O'Reilly's café",
    "<html><body>tagged</body></html>",
]

# label -> (width, height, PIL mode, save format); labels end in the file suffix.
_IMAGES: dict[str, tuple[int, int, str, str]] = {
    "rgb-square.png": (224, 224, "RGB", "PNG"),
    "rgb-landscape.jpg": (1024, 768, "RGB", "JPEG"),
    "rgb-portrait.jpg": (480, 900, "RGB", "JPEG"),
    "rgb-small.png": (50, 37, "RGB", "PNG"),
    "rgb-wide.png": (900, 90, "RGB", "PNG"),
    "rgba.png": (300, 200, "RGBA", "PNG"),
    "la.png": (257, 311, "LA", "PNG"),
    "grey.jpg": (640, 480, "L", "JPEG"),
    "palette.png": (320, 240, "P", "PNG"),
    "cmyk.jpg": (500, 400, "CMYK", "JPEG"),
    "i16.png": (200, 300, "I;16", "PNG"),
    "bilevel.png": (256, 256, "1", "PNG"),
    "webp.webp": (333, 222, "RGB", "WEBP"),
}


def _smooth_rgb(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Gradients plus a few soft blobs: enough structure to move embeddings, no noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        channel = 128 + 60 * np.sin(a * x / 37 + b * y / 53 + c * 6)
        for _ in range(3):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.1, 0.4) * max(width, height)
            channel += rng.uniform(-80, 80) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(channel)
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def sample_images(seed: int = 0) -> dict[str, bytes]:
    """Encoded image files, label -> bytes, deterministic for a seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for label, (width, height, mode, fmt) in _IMAGES.items():
        rgb = Image.fromarray(_smooth_rgb(width, height, rng))
        if mode == "RGBA":
            alpha = np.linspace(0, 255, width * height, dtype=np.float32).reshape(height, width)
            image = Image.merge("RGBA", (*rgb.split(), Image.fromarray(alpha.astype(np.uint8))))
        elif mode == "LA":
            image = rgb.convert("LA")
        elif mode == "I;16":
            image = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).convert("I;16")
        elif mode == "P":
            image = rgb.quantize(colors=64)
        else:
            image = rgb.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
        out[label] = buffer.getvalue()
    return out
