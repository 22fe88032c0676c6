"""The toy world: synthetic scenes, speech, video and instruction data that can be scored exactly."""

from omnitok.world.parser import parse_scene, scene_match, score_scene
from omnitok.world.scene import Scene, SceneObject, render, render_image, sample_scene

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
