"""Pictures of MoR routing for TensorBoard: validation tokens coloured by the recursion depth they
reached, as an image (tokens on coloured boxes, a legend) and as markdown for the TEXT tab.

A token's depth is how many times the shared block ran on it: 0 = it left after the unique first
layers, Nr = it went through every recursion.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

# Shallow -> deep: light grey for depth 0 (no recursion), then yellow -> teal -> deep purple.
_ANCHORS = np.array([[253, 231, 37], [33, 145, 140], [59, 15, 112]], dtype=np.float64)
_DEPTH0 = (232, 232, 232)
_SUPERSCRIPT = str.maketrans("0123456789", "\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def depth_colours(max_depth: int) -> list[tuple[int, int, int]]:
    """One RGB colour per depth 0..max_depth."""
    colours = [_DEPTH0]
    for d in range(1, max_depth + 1):
        x = 0.0 if max_depth == 1 else (d - 1) / (max_depth - 1) * (len(_ANCHORS) - 1)
        i = min(int(x), len(_ANCHORS) - 2)
        c = _ANCHORS[i] + (x - i) * (_ANCHORS[i + 1] - _ANCHORS[i])
        colours.append(tuple(int(round(v)) for v in c))
    return colours


def _ink(rgb) -> tuple[int, int, int]:
    """Black on light boxes, white on dark ones."""
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


@lru_cache(maxsize=4)
def _font(size: int):
    """(font, newline mark, tab mark): DejaVu Sans Mono where the system has it (code reads best in a
    monospace font, and it has arrows), else Pillow's bundled font, which lacks them."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSansMono.ttf", size), "\u21b5", "\u2192"
    except OSError:
        return ImageFont.load_default(size=size), "\\n", "\\t"


def _compact(piece: str, newline: str, tab: str) -> str:
    """A token as drawn: newlines and tabs as marks, and indentation shortened to two dots -- the
    picture is small, and a run of spaces would take a line's width."""
    text = piece.replace("\r", "").replace("\n", newline).replace("\t", tab)
    return re.sub(r" {3,}", "\u00b7\u00b7", text)


def depth_image(samples: list[tuple[list[str], list[int]]], max_depth: int, shares: list[float] | None = None,
                width: int = 360, font_size: int = 12, max_lines: int = 10) -> np.ndarray:
    """HWC uint8 sized for TensorBoard's default image card (about 360 x 200 px, where it is shown
    without scaling): a legend line (a box per depth, with its share of tokens), then the samples'
    tokens in reading order, each on a box of its depth's colour, wrapped at the width, for at most
    `max_lines` lines in all; each sample starts a line below a rule."""
    from PIL import Image, ImageDraw

    (font, newline, tab), colours = _font(font_size), depth_colours(max_depth)
    line_h, pad, gap = font_size + 5, 6, 2
    boxes = [("depth", None)] + [(str(d) if shares is None else f"{d}: {100 * shares[d]:.0f}%", d)
                                 for d in range(max_depth + 1)]
    bottom = pad + max_lines * line_h
    placed, rules, x, y = [], [], pad, pad  # placed: (x, y, w, text, depth or None, in the legend)
    for i, (pieces, depths) in enumerate([([b[0] for b in boxes], [b[1] for b in boxes])] + samples):
        if i:
            if y + 2 * line_h > bottom:  # no line left for this sample
                break
            x, y = pad, y + line_h
            if i > 1:
                rules.append(y - 2)
        for piece, d in zip(pieces, depths):
            text = _compact(piece, newline, tab) if i else piece
            w = max(4, int(font.getlength(text))) + 2
            if x + w > width - pad and x > pad:
                x, y = pad, y + line_h
            if y + line_h > bottom:
                break
            placed.append((x, y, w, text, d, i == 0))
            x += w + (gap if i else 3 * gap)  # a gap: neighbours of one depth stay two tokens
    img = Image.new("RGB", (width, pad + max(y for _, y, *_ in placed) + line_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for y in rules:
        draw.line((pad, y, width - pad, y), fill=(160, 160, 160))
    for x, y, w, text, d, in_legend in placed:
        if d is None:
            draw.text((x, y + 1), text, fill=(0, 0, 0), font=font)
            continue
        # Legend boxes are outlined: depth 0's light grey must not vanish into the background.
        draw.rectangle((x, y, x + w, y + line_h - 2), fill=colours[d], outline=(120, 120, 120) if in_legend else None)
        draw.text((x + 1, y + 1), text, fill=_ink(colours[d]), font=font)
    return np.asarray(img)


def _code(piece: str) -> str:
    """A token as a markdown code span: spaces shown as a middle dot (code spans lose them), newlines
    as an arrow, backticks as quotes (they would close the span)."""
    text = piece.replace("\r", "").replace("\t", "\u2192").replace("`", "'")
    text = text.replace(" ", "\u00b7").replace("\n", "\u21b5")
    return "`" + (text or "\u2205") + "`"


def depth_markdown(samples: list[tuple[list[str], list[int]]], max_depth: int, shares: dict[str, list[float]],
                   heading: str) -> str:
    """The text version: a table of the share of tokens at each depth, then the samples with each
    token's depth as a superscript (plain characters: TensorBoard's sanitizer drops HTML)."""
    depths = range(max_depth + 1)
    out = [heading, "",
           "| depth | " + " | ".join(str(d) for d in depths) + " |",
           "|:--|" + "--:|" * (max_depth + 1)]
    for name, share in shares.items():
        out.append(f"| {name} | " + " | ".join(f"{100 * s:.1f}%" for s in share) + " |")
    for i, (pieces, ds) in enumerate(samples):
        lines, words = [], []
        for piece, d in zip(pieces, ds):
            # The text keeps its lines: break before a token that starts with a newline, else after.
            if piece.startswith("\n") and words:
                lines.append(" ".join(words))
                words = []
            words.append(_code(piece) + str(d).translate(_SUPERSCRIPT))
            if "\n" in piece.lstrip("\n"):
                lines.append(" ".join(words))
                words = []
        lines.append(" ".join(words))
        out += ["", f"**sample {i + 1}**", "", "  \n".join(lines)]  # two spaces: a markdown line break
    return "\n".join(out)
