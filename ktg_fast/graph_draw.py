"""Drawing a graph in the paper's style: graphviz DOT text, and a PNG where graphviz's ``dot`` works."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .io import atomic_write_text

if TYPE_CHECKING:  # only for annotations: graph.py imports this module
    from .graph import Graph

__all__ = ["to_dot", "draw"]


def to_dot(graph: "Graph", *, title: Optional[str] = None, accuracies: Optional[Sequence[float]] = None,
           metric: str = "val") -> str:
    """Graphviz DOT text in the paper's style.

    The target node is red, frozen nodes blue, edges labelled by gate,
    cutoff edges left out.  ``accuracies`` (percent, one per network node)
    are printed in the node labels as e.g. ``val 73.9 %`` (``metric`` names the split).

    Raises:
        ValueError: ``accuracies`` does not hold one value per network node.
    """
    if accuracies is not None and len(accuracies) != graph.num_nodes:
        raise ValueError(f"accuracies must hold one value per network node ({graph.num_nodes}), got "
                         f"{len(accuracies)}")
    out = ["digraph KTG {", "  rankdir=LR;", '  node [shape=ellipse, style=filled, fillcolor="white", fontname="Helvetica"];']
    if title:
        out.append(f'  labelloc="t"; label="{title}";')
    out.append('  n0 [label="Label", shape=box, fillcolor="#dddddd"];')
    for i, node in enumerate(graph.nodes, start=1):
        text = f"{i}: {node.model}"
        if accuracies is not None:
            text += f"\\n{metric} {float(accuracies[i - 1]):.1f} %"
        if i == graph.target:
            style = 'fillcolor="#f4a6a6", color="#c00000", penwidth=2'
        elif graph.is_frozen(i):
            style = 'fillcolor="#a6c8f4", color="#0050c0"'
            text += "\\n(frozen)"
        else:
            style = 'fillcolor="white"'
        out.append(f'  n{i} [label="{text}", {style}];')
    for s in range(graph.num_nodes + 1):
        for t in range(1, graph.num_nodes + 1):
            g = graph.gates[s][t]
            if s != t and g != "cutoff":
                out.append(f'  n{s} -> n{t} [label="{g}"];')
    out.append("}")
    return "\n".join(out) + "\n"

def draw(graph: "Graph", path: str | os.PathLike, *, title: Optional[str] = None,
         accuracies: Optional[Sequence[float]] = None, metric: str = "val",
         on_png_skipped: Any = None) -> list[Path]:
    """Write ``<path>.dot`` and, with graphviz's ``dot``, ``<path>.png``; return the files written.

    ``accuracies`` (percent, one per network node) are printed in the node
    labels as e.g. ``val 73.9 %`` (``metric`` names the split).  When
    ``dot`` is missing or fails, the PNG is skipped and the reason goes to
    ``on_png_skipped`` (default: a logged warning); the ``.dot`` file is
    written either way.
    """
    base = Path(path).with_suffix("")
    dot_path = base.with_suffix(".dot")
    text = to_dot(graph, title=title, accuracies=accuracies, metric=metric)
    atomic_write_text(dot_path, text)
    written = [dot_path]
    skip = on_png_skipped or (lambda why: logging.getLogger("ktg_fast").warning("%s", why))
    exe = shutil.which("dot")
    if exe is None:
        skip("graph PNGs skipped: graphviz's `dot` is not installed (the .dot files are written); install "
             "graphviz (e.g. apt-get install graphviz) and run the command again to draw them")
        return written
    png = base.with_suffix(".png")
    tmp = png.with_name(png.name + ".tmp")
    try:
        subprocess.run([exe, "-Tpng", str(dot_path), "-o", str(tmp)], check=True, capture_output=True,
                       text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        tmp.unlink(missing_ok=True)
        detail = (getattr(e, "stderr", None) or "").strip().splitlines()
        why = f"exit code {e.returncode}" if isinstance(e, subprocess.CalledProcessError) else str(e)
        skip(f"graph PNGs skipped: graphviz's `{exe} -Tpng` failed ({why}" + (f": {detail[0]}" if detail else "")
             + "); the .dot files are written")
        return written
    os.replace(tmp, png)
    written.append(png)
    return written
