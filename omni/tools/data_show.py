"""`omni data show`: one packed batch drawn, so users see what the model is fed before they pay for a run.

The picture has one row per packed sequence and one column per position, in two panels:
    top     the modality of each position (text, image, audio, padding), with segment boundaries in white
    bottom  the loss mask: positions whose next token is learned (omni.loss.target_mask), coloured by modality
The text summary lists each row's segments with their lengths and targets, and the batch's fill rate.
"""

from __future__ import annotations

import io
import re

import numpy as np

from omni import storage
from omni.batch import AUDIO, IMAGE, MODALITY_NAMES, PAD, TEXT
from omni.loss import target_mask
from omni.tokens import describe_tokens

COLOURS = {PAD: (0.93, 0.93, 0.93), TEXT: (0.20, 0.45, 0.85), IMAGE: (0.95, 0.60, 0.10), AUDIO: (0.20, 0.70, 0.35)}


def summarize(batch: dict, vocab, tokenizer, max_chars: int = 100) -> str:

    rows, seq_len = batch["tokens"].shape
    used = batch["segment_ids"] > 0
    lines = [f"{rows} rows x {seq_len} positions, {used.mean():.1%} filled, "
             f"{int(batch['is_target'].sum())} target tokens "
             + ", ".join(f"{MODALITY_NAMES[m]} {int(((batch['modality'] == m) & used).sum())}"
                         for m in (TEXT, IMAGE, AUDIO))]
    for r in range(rows):
        ids = batch["segment_ids"][r]
        segments = [int(s) for s in np.unique(ids[ids > 0])]
        lines.append(f"row {r}: {len(segments)} example(s), {int((ids > 0).sum())}/{seq_len} positions")
        for s in segments:
            at = ids == s
            text = _compact(describe_tokens(batch["tokens"][r][at], vocab, tokenizer))
            text = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
            lines.append(f"    [{int(at.sum()):4d} tok, {int(batch['is_target'][r][at].sum()):4d} target] {text}")
    return "\n".join(lines)


def _compact(text: str) -> str:
    """Image spans as <image RxC>, audio code runs as <N audio codes>: the summary shows structure, not ids."""
    def image(match):
        rows = match.group(0).count("<row>")
        return f"<image {rows}x{match.group(0).count('<patch>') // max(rows, 1)}>"

    text = re.sub(r"<boi>(?:(?:<patch>)+<row>)*<eoi>", image, text)
    return re.sub(r"(?:<(?:a\d+:\d+|delay)>)+", lambda m: f"<{m.group(0).count('<')} audio codes>", text)


def draw(batch: dict, out_path, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    modality = np.asarray(batch["modality"])
    segment_ids = np.asarray(batch["segment_ids"])
    rows, seq_len = modality.shape
    image = np.zeros((rows, seq_len, 3))
    for m, colour in COLOURS.items():
        image[modality == m] = colour
    learned = np.concatenate([np.asarray(target_mask(batch)), np.zeros((rows, 1), bool)], axis=1)
    mask_image = np.where(learned[..., None], image, np.asarray(COLOURS[PAD]))
    boundary = np.zeros_like(segment_ids, bool)
    boundary[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]

    fig, axes = plt.subplots(2, 1, figsize=(min(24, 4 + seq_len / 32), 1.5 + 0.5 * rows), sharex=True)
    for ax, picture, name in ((axes[0], image, "modality"), (axes[1], mask_image, "loss mask (next token learned)")):
        picture = picture.copy()
        picture[boundary] = (1.0, 1.0, 1.0)
        ax.imshow(picture, aspect="auto", interpolation="nearest")
        ax.set_ylabel("row")
        ax.set_title(name, fontsize=10)
    axes[1].set_xlabel("position")
    handles = [Patch(color=COLOURS[m], label=MODALITY_NAMES.get(m, "padding")) for m in (TEXT, IMAGE, AUDIO, PAD)]
    fig.legend(handles=handles, loc="upper right", ncol=4, fontsize=8)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out_path = storage.path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    fig.savefig(data, dpi=100, format="png")
    plt.close(fig)
    storage.write_bytes(out_path, data.getvalue())
    return out_path
