"""The optional ``transformers`` package: whether it is installed and new enough for kdray, and importing it.

:data:`TRANSFORMERS_MIN` is the oldest version kdray works with, the floor of the ``hf`` extra in pyproject.toml
(a test checks they agree, and runs the language-model tests against that version). It is 4.56 because kdray
loads weights with ``from_pretrained(dtype=...)``, a keyword new in 4.56 (``torch_dtype=`` before); the other APIs
kdray calls (``logits_to_keep`` in a causal LM's forward, ``apply_chat_template(..., add_generation_prompt=True)``,
``output_loading_info=True``, ``transformers.utils.logging``) are older. An older or missing ``transformers`` is a
:class:`~kdray.errors.ConfigError` on the field that asked for it, saying which version is needed.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from typing import Any, Optional

from kdray.errors import ConfigError

TRANSFORMERS_MIN = "4.56"
INSTALL_HINT = "pip install 'kdray[hf]' (needs the optional transformers package)"


def version_tuple(version: str) -> tuple[int, ...]:
    """``"4.56.0.dev0"`` -> ``(4, 56, 0)``: the leading numbers of a version string."""
    m = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def installed_transformers() -> Optional[str]:
    """The version of the ``transformers`` this process imports (or would import), or None when it has none."""
    if "transformers" in sys.modules:
        return str(getattr(sys.modules["transformers"], "__version__", "0"))
    if importlib.util.find_spec("transformers") is None:
        return None
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # importable without metadata (a bare source tree)
        import transformers

        return str(transformers.__version__)


def check_version(version: str, field: str, value: Any) -> None:
    """``version`` is at least :data:`TRANSFORMERS_MIN`, else a ConfigError on ``field`` naming the needed one."""
    if version_tuple(version) < version_tuple(TRANSFORMERS_MIN):
        raise ConfigError(field, value, f"transformers >= {TRANSFORMERS_MIN} (this environment has transformers "
                                        f"{version}; kdray loads models with from_pretrained(dtype=...), new in "
                                        f"4.56): pip install -U 'transformers>={TRANSFORMERS_MIN}'")


def check_transformers(field: str, value: Any, hint: str = INSTALL_HINT) -> None:
    """``transformers`` is installed (else ``hint``) and new enough, without importing it when it is not loaded."""
    version = installed_transformers()
    if version is None:
        raise ConfigError(field, value, hint)
    check_version(version, field, value)


def import_transformers(field: str, value: Any, hint: str = INSTALL_HINT) -> Any:
    """The ``transformers`` module, checked as :func:`check_transformers` does (its own ``__version__``)."""
    check_transformers(field, value, hint)
    import transformers

    check_version(str(transformers.__version__), field, value)
    return transformers
