"""The toy world: synthetic scenes, speech, video and instruction data that can be scored exactly.

The names below are imported on first use (PEP 562): reading a world's shards (``omnitok.world.read``) needs
neither the scene parser nor scipy's signal module, which took 2.2 s to import on a 2-core Xeon in every process
that only read samples (the demo's tokenizer and pretokenizing steps).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omnitok.world.parser import parse_scene, scene_match, score_scene
    from omnitok.world.scene import Scene, SceneObject, render, render_image, sample_scene

_WHERE = {
    "Scene": "scene",
    "SceneObject": "scene",
    "parse_scene": "parser",
    "render": "scene",
    "render_image": "scene",
    "sample_scene": "scene",
    "scene_match": "parser",
    "score_scene": "parser",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"omnitok.world.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'omnitok.world' has no attribute {name!r}")


__all__ = [
    "Scene",
    "SceneObject",
    "parse_scene",
    "render",
    "render_image",
    "sample_scene",
    "scene_match",
    "score_scene",
]
