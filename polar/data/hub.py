"""Hub access with errors that say what to do when the hub cannot be reached."""

from __future__ import annotations

from typing import Any

from polar.loading import is_connection_error


def load_hub_dataset(path: str, name: str | None = None, split: str | None = None, local_hint: str = "") -> Any:
    """``datasets.load_dataset`` with a clear error when the hub is unreachable."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("loading data from the hub needs `datasets`: pip install 'polar-peft[train]'") from err
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised with advice
        if is_connection_error(err) or isinstance(err, (ConnectionError, OSError)):
            hint = local_hint or "pass a local copy of the data instead (--data-dir / --data-file)"
            raise FileNotFoundError(
                f"cannot load dataset {path!r}{f' ({name})' if name else ''} from the Hugging Face hub "
                f"(offline or unreachable: {type(err).__name__}); {hint}."
            ) from err
        raise
