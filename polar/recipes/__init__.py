"""Training recipes: YAML files of ``polar train`` settings.

A recipe is a mapping of :func:`polar.train` argument names to values (``--recipe NAME`` for a shipped one, or a
path to your own file). Two extra keys: ``adapter_overrides`` (``{adapter: {setting: value}}``, applied when that
adapter is trained, e.g. LoRA's learning rate) and ``grid`` (informational: the reference's sweep).
Explicit arguments / command-line flags override recipe values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).parent
INFO_KEYS = ("grid", "notes")


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    if path.suffix in (".yaml", ".yml"):
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist.")
    raise ValueError(f"unknown recipe {str(name_or_path)!r}; shipped recipes: {', '.join(list_recipes())} "
                   "(or pass a path to a YAML file).")


def load_recipe(name_or_path: str | Path, adapter: str | None = None, valid_keys: Any = None) -> dict[str, Any]:
    """The settings of a recipe, with its ``adapter_overrides`` for ``adapter`` applied.

    ``valid_keys`` (e.g. the fields of :class:`polar.training.TrainSettings`) rejects unknown keys with a message
    listing the valid ones.
    """
    import yaml

    path = recipe_path(name_or_path)
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {str(path)!r}: expected a mapping of settings, got {type(data).__name__}.")
    overrides = data.pop("adapter_overrides", None) or {}
    for key in INFO_KEYS:
        data.pop(key, None)
    chosen = adapter or data.get("adapter")
    if chosen and chosen in overrides:
        data.update(overrides[chosen])
    if valid_keys is not None:
        valid = set(valid_keys)
        unknown = sorted(set(data) - valid)
        for extra in overrides.values():
            unknown += sorted(set(extra) - valid)
        if unknown:
            raise ValueError(
                f"recipe {str(path)!r}: unknown setting(s) {', '.join(sorted(set(unknown)))}; valid settings: "
                f"{', '.join(sorted(valid))}."
            )
    return data
