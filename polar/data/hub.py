"""Hub access with errors that say what to do when the hub cannot be reached."""

from __future__ import annotations

from typing import Any


def _is_connection_error(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    markers = (
        "connection", "offline", "resolve", "timed out", "timeout", "max retries", "couldn't reach",
        "could not reach", "network", "name or service not known", "temporary failure", "localentrynotfound",
        "we couldn't connect", "not found on the hub", "doesn't exist on the hub", "cannot find the requested files",
    )
    return any(m in text for m in markers)


def load_hub_dataset(path: str, name: str | None = None, split: str | None = None, local_hint: str = "") -> Any:
    """``datasets.load_dataset`` with a clear error when the hub is unreachable."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("loading data from the hub needs `datasets`: pip install 'polar-peft[train]'") from err
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised with advice
        if _is_connection_error(err) or isinstance(err, (ConnectionError, OSError)):
            hint = local_hint or "pass a local copy of the data instead (--data-dir / --data-file)"
            raise FileNotFoundError(
                f"cannot load dataset {path!r}{f' ({name})' if name else ''} from the Hugging Face hub "
                f"(offline or unreachable: {type(err).__name__}); {hint}."
            ) from err
        raise
