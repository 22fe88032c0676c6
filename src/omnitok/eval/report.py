"""A self-contained HTML report: metric tables, a seen-vs-held-out plot, and examples with pictures and audio.

Everything (plots, images, audio) is inlined as data URIs so the file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any

import numpy as np
from PIL import Image as PILImage


def _png_uri(pixels: np.ndarray, scale: int = 2) -> str:
    im = PILImage.fromarray(np.asarray(pixels, dtype=np.uint8))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), PILImage.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wav_uri(samples: np.ndarray, sample_rate: int = 16000) -> str:
    from omnitok.world.speech import encode_wav

    return (
        "data:audio/wav;base64," + base64.b64encode(encode_wav(np.asarray(samples, np.float32), sample_rate)).decode()
    )


def _plot(metrics: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in metrics if not n.startswith("_")]
    seen = [metrics[n]["seen"] if metrics[n]["seen"] is not None else np.nan for n in names]
    held = [metrics[n]["heldout"] if metrics[n]["heldout"] is not None else np.nan for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.2), dpi=100)
    x = np.arange(len(names))
    ax.bar(x - 0.2, seen, 0.4, label="seen")
    ax.bar(x + 0.2, held, 0.4, label="held-out")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, max(1.0, np.nanmax([*seen, *held, 0.0]) * 1.1))
    ax.set_title("accuracy (higher is better) / WER (lower is better)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _example(shown: dict[str, Any], score: Any) -> str:
    parts = []
    for key, value in shown.items():
        if value is None:
            continue
        label = html.escape(key)
        if isinstance(value, np.ndarray) and value.ndim == 3:
            parts.append(
                f'<figure><img src="{_png_uri(value)}" alt="{label}"><figcaption>{label}</figcaption></figure>'
            )
        elif isinstance(value, np.ndarray) and value.ndim == 1:
            parts.append(
                f'<figure><audio controls src="{_wav_uri(value)}"></audio><figcaption>{label}</figcaption></figure>'
            )
        else:
            parts.append(f"<p><b>{label}:</b> {html.escape(str(value))}</p>")
    verdict = score if isinstance(score, bool) else f"ref: {score[0]!r}" if isinstance(score, tuple) else score
    return f'<div class="ex">{"".join(parts)}<p class="v">{html.escape(str(verdict))}</p></div>'


def write_report(
    path: str | os.PathLike[str], metrics: dict[str, Any], records: dict[str, list[Any]], n_examples: int
) -> None:
    from omnitok.io import atomic_write_bytes

    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_fmt(m['all'])}</td><td>{_fmt(m['seen'])}</td>"
        f"<td>{_fmt(m['heldout'])}</td><td>{m['n']['all']}</td></tr>"
        for n, m in metrics.items()
        if not n.startswith("_")
    )
    sections = []
    for name, recs in records.items():
        shown = [r for r in recs if r.shown][:n_examples]
        if shown:
            cards = "".join(_example(r.shown, r.score) for r in shown)
            sections.append(f"<h2>{html.escape(name)}</h2><div class='grid'>{cards}</div>")
    plot = f'<img src="{_plot(metrics)}" alt="metrics plot">' if rows else ""
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>omnitok evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}
.grid{{display:flex;flex-wrap:wrap;gap:12px}}.ex{{border:1px solid #ddd;padding:8px;width:260px;font-size:13px}}
figure{{margin:4px 0}}audio{{width:240px}}.v{{color:#555}}</style></head><body>
<h1>omnitok evaluation</h1><p>world: {html.escape(str(metrics.get("_meta", {}).get("world", "")))} — test split;
held-out = compositions or voices never seen in training.</p>
<table><tr><th>metric</th><th>all</th><th>seen</th><th>held-out</th><th>n</th></tr>{rows}</table>
{plot}{"".join(sections)}</body></html>"""
    atomic_write_bytes(path, doc.encode("utf-8"))
