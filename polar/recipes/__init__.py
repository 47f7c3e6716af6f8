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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(
            f"recipe {str(path)!r} is not readable YAML{line}: {str(err).splitlines()[0]}. Fix the file, or start "
            f"from a shipped recipe ({', '.join(list_recipes())})."
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"recipe {str(path)!r}: expected a mapping of settings, got {type(data).__name__}.")
    overrides = data.pop("adapter_overrides", None) or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(
            f"recipe {str(path)!r}: adapter_overrides must map an adapter name (polar, lora, dora) to a mapping of "
            f"settings, got {overrides!r}."
        )
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
